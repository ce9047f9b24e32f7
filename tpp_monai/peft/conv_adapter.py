"""Conv-Adapter (Chen et al., CVPR 2024 workshop / arXiv 2208.07463) for STU-Net, the PEFT method of TPP's Table 10.

The module follows the released ``ConvAdapter`` ("Design 2 v4", Hhhhhhao/Conv-Adapter
``models/tuning_modules/conv_adapter.py``) in 3D: a grouped k x k x k conv
``C_in -> C_in/gamma`` with ``groups = C_in/gamma`` (each output channel filters gamma input channels), an activation,
a 1x1x1 conv to ``C_out`` and a learnable per-channel scale. Released names ``conv1/act/conv2/se`` are called
``down/act/up/scale`` here. Initialisation as released: the released ResNet's init loop runs after the adapters are
built and re-initialises every conv, theirs included (``models/backbones/resnet.py``: Kaiming normal, ``fan_out``,
ReLU gain, zero bias), so both adapter convs get ``N(0, 2 / fan_out)`` weights and zero biases here too; the scale
starts at 1.0, so the adapted network differs from the pre-trained one before training (``identity_at_init=False``);
``scale_init=0`` gives an exact identity at the start instead.

Placement (``stunet.md`` §2.4; TPP does not say which it used): default ``"conv2"``, Conv-Parallel on the second conv
of every residual block, in the encoder and the decoder. It is the 3D analogue of the released ResNet-Bottleneck
placement (the only one the released code runs): the adapter reads the ``act1`` output, the input of ``conv2``, and
its output is added after ``norm2``, before the residual sum. ``"conv1"`` adds ``A(x)`` to ``conv1(x)`` (before
``norm1``, which partly normalises the adapter away) and ``"residual"`` adds ``A(x)`` to the shortcut; both carry the
block stride. Activation LeakyReLU(0.01) as STU-Net's own.

Target parameters: the adapters (plus the InstanceNorm affine parameters with ``train_norms``, the analogue of the
released ``conv_adapt_norm`` variant).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from tpp_monai.contract import is_peft_parameter
from tpp_monai.errors import ConfigError
from tpp_monai.peft.registry import MethodSpec, register

PLACEMENTS = ("conv1", "conv2", "residual")
PARTS = ("encoder", "decoder")
_ACTIVATIONS = {"leaky_relu": lambda: nn.LeakyReLU(0.01), "relu": nn.ReLU, "gelu": nn.GELU}


@dataclass(frozen=True)
class ConvAdapterConfig:
    """Args:
    placement: ``"conv2"`` (parallel to conv2, default), ``"conv1"`` or ``"residual"`` (parallel to the block).
    reduction: compression factor gamma: hidden width ``C_in // gamma`` (released default 8).
    kernel_size: kernel of the grouped conv (odd; released default 3).
    parts: where the adapters go, from ``("encoder", "decoder")``.
    activation: ``"leaky_relu"`` (STU-Net's), ``"relu"`` or ``"gelu"``.
    scale_init: initial per-channel scale (1.0 as released; 0.0 = identity at initialisation).
    train_norms: also train the InstanceNorm affine parameters (target parameters then).
    """

    placement: str = "conv2"
    reduction: int = 8
    kernel_size: int = 3
    parts: tuple[str, ...] = PARTS
    activation: str = "leaky_relu"
    scale_init: float = 1.0
    train_norms: bool = False


class ConvAdapter3d(nn.Module):
    """``scale * up(act(down(x)))``: grouped k^3 conv ``C_in -> C_in/gamma`` (``groups = C_in/gamma``), 1^3 conv."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        reduction: int,
        kernel_size: int = 3,
        stride: tuple[int, ...] = (1, 1, 1),
        activation: str = "leaky_relu",
        scale_init: float = 1.0,
    ) -> None:
        super().__init__()
        width = max(1, in_ch // reduction)
        if in_ch % width:
            raise ConfigError(
                f"Conv-Adapter reduction {reduction} gives width {width} for {in_ch} input channels, which does not "
                "divide them (groups = width); choose a reduction that divides the channel counts, e.g. a power of 2"
            )
        self.down = nn.Conv3d(in_ch, width, kernel_size, stride=stride, padding=kernel_size // 2, groups=width)
        self.act = _ACTIVATIONS[activation]()
        self.up = nn.Conv3d(width, out_ch, 1)
        self.scale = nn.Parameter(torch.full((1, out_ch, 1, 1, 1), float(scale_init)))
        for conv in (self.down, self.up):  # the released init (module docstring)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.act(self.down(x))) * self.scale


def _blocks(model: nn.Module, parts: tuple[str, ...]) -> list[nn.Module]:
    stages = {"encoder": model.conv_blocks_context, "decoder": model.conv_blocks_localization}
    return [block for part in parts for stage in stages[part] for block in stage]


def inject(model: nn.Module, cfg: ConvAdapterConfig) -> ConvAdapterConfig:
    cfg = replace(cfg, parts=tuple(cfg.parts), reduction=int(cfg.reduction), kernel_size=int(cfg.kernel_size))
    if cfg.placement not in PLACEMENTS:
        raise ConfigError(f"Conv-Adapter placement {cfg.placement!r} unknown; valid: {', '.join(PLACEMENTS)}")
    if not cfg.parts or set(cfg.parts) - set(PARTS):
        raise ConfigError(f"Conv-Adapter parts must be a non-empty subset of {list(PARTS)}, got {list(cfg.parts)}")
    if cfg.reduction < 1:
        raise ConfigError(f"Conv-Adapter reduction must be >= 1, got {cfg.reduction}")
    if cfg.kernel_size < 1 or cfg.kernel_size % 2 == 0:
        raise ConfigError(f"Conv-Adapter kernel_size must be odd (same padding), got {cfg.kernel_size}")
    if cfg.activation not in _ACTIVATIONS:
        raise ConfigError(f"Conv-Adapter activation {cfg.activation!r} unknown; valid: {', '.join(_ACTIVATIONS)}")
    for block in _blocks(model, cfg.parts):
        if cfg.placement == "conv2":  # reads act1's output: out -> out channels, stride 1
            cin, stride = block.out_channels, (1, 1, 1)
        else:  # reads the block input: in -> out channels with the block's stride
            cin, stride = block.in_channels, block.stride
        block.peft_sites[cfg.placement] = ConvAdapter3d(
            cin, block.out_channels, cfg.reduction, cfg.kernel_size, stride, cfg.activation, cfg.scale_init
        )
    return cfg


def _target(model: nn.Module, name: str) -> bool:
    if is_peft_parameter(name):
        return True
    if not getattr(model, "peft_options", {}).get("train_norms"):
        return False
    return ".norm1." in name or ".norm2." in name


SPEC = register(
    MethodSpec(
        name="conv_adapter",
        config=ConvAdapterConfig,
        inject=inject,
        target=_target,
        attach="slot",
        # an unknown placement needs nothing here: inject names the valid ones
        requires=lambda cfg: frozenset({f"conv:{cfg.placement}"} if cfg.placement in PLACEMENTS else ()),
        identity_at_init=False,  # scale starts at 1.0 as released; true only with scale_init=0
        pretrainable=True,
        summary="Conv-Adapter: grouped-conv bottleneck (gamma 8) parallel to conv2 of every STU-Net residual block",
    )
)
