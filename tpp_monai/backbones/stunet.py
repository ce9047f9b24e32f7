"""STU-Net (Huang et al. 2023, "STU-Net: Scalable and Transferable Medical Image Segmentation Models"), the 3D
backbone of the TPP paper's Table 10, with the exact parameter names of the released TotalSegmentator checkpoints.

Facts read from uni-medical/STU-Net ``nnUNet-1.7.1/.../STUNet.py`` and the
v1/v2 ``STUNetTrainer``): six resolution stages of residual blocks (``conv_blocks_context``), down-sampling by the
strided first conv of stages 1-5, nearest up-sampling + 1x1x1 conv (``upsample_layers``), decoder stages on
``cat(upsampled, skip)`` (``conv_blocks_localization``) and five 1x1x1 deep-supervision heads (``seg_outputs``,
index 0 the coarsest). Every conv has a bias, norms are ``InstanceNorm3d(affine=True)``, activations LeakyReLU(0.01),
weights He-initialised as nnU-Net v1 (``InitWeights_He(1e-2)``). The four released sizes reproduce the official
parameter counts exactly (S 14,596,941 ... H 1,457,326,221 with 105 outputs; ``tests/fixtures/keys/stunet_*.json``).

Tasks: ``"seg"`` (logits, optionally the deep-supervision tuple) and ``"features"`` (the TPP pretext stage). The
features model keeps the decoder so that target parameters trained in the pretext stage have the same names as in
the segmentation model; its ``forward`` runs the encoder only and returns the pooled bottleneck ``[B, C]``, and
:meth:`STUNet.forward_features` returns pooled features of the bottleneck and every decoder stage. The TPP-DINO
stage should attach DeSD-style student heads to the decoder levels (``stunet.md`` §3.3 option b): that is what gives
decoder adapters a training signal, which an encoder-only head would not.

PEFT hook: every :class:`BasicResBlock` has a ``peft_sites`` ModuleDict; a module there at ``"conv1"``, ``"conv2"``
or ``"residual"`` adds its output in parallel to that part of the block (see :mod:`tpp_monai.peft.conv_adapter`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tpp_monai.contract import DENSE_FEATURE, GLOBAL_FEATURE, BackboneInterface
from tpp_monai.errors import ConfigError

TASKS = ("seg", "features")
NUM_STAGES = 6
# Strides of the released TotalSegmentator models (plan_files/*.model.pkl, stunet.md §1.3); MedIM hard-codes the same.
DEFAULT_STRIDES = ((2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 1, 2))
DEFAULT_KERNELS = ((3, 3, 3),) * NUM_STAGES  # the STU-Net trainers force 3x3x3 in every stage

_HF = "the Hugging Face repo ziyanhuang/STU-Net or the links in the README of github.com/uni-medical/STU-Net"
# name -> (constructor kwargs, where the weights are); official dims/depths from STUNetTrainer_{small,base,large,huge}
VARIANTS: dict[str, tuple[dict, str]] = {
    f"stunet_{size}": (
        {"dims": list(dims), "depth": [depth] * NUM_STAGES},
        f"download {size_name}_ep4k.model (TotalSegmentator, 4000 epochs) from {_HF}, "
        f"and pass it with --backbone_ckpt /path/to/{size_name}_ep4k.model",
    )
    for size, size_name, dims, depth in (
        ("s", "small", (16, 32, 64, 128, 256, 256), 1),
        ("b", "base", (32, 64, 128, 256, 512, 512), 1),
        ("l", "large", (64, 128, 256, 512, 1024, 1024), 2),
        ("h", "huge", (96, 192, 384, 768, 1536, 1536), 3),
    )
}
VARIANTS["stunet_tiny"] = (
    {"dims": [8, 16, 32, 64, 128, 128], "depth": [1] * NUM_STAGES},
    "small configuration for tests and CPU demos (stunet.md §5.3); no public weights",
)
# Checkpoint entries the loader skips, by reason: the official fine-tuning re-creates the heads (stunet.md §1.7).
CHECKPOINT_UNUSED = {"deep-supervision heads of the checkpoint (fresh seg_outputs are trained)": ("seg_outputs.",)}


class BasicResBlock(nn.Module):
    """STU-Net's ``BasicResBlock``: conv1-norm1-act1-conv2-norm2, plus identity or a 1x1x1 ``conv3`` shortcut
    (no norm), then ``act2``. ``conv1`` and ``conv3`` carry the block's stride."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel: Sequence[int], stride: Sequence[int], use_1x1conv: bool
    ) -> None:
        super().__init__()
        pad = [k // 2 for k in kernel]
        self.in_channels, self.out_channels, self.stride = in_ch, out_ch, tuple(stride)
        # Registration order = official state-dict order: conv1, norm1, conv2, norm2, conv3.
        self.conv1 = nn.Conv3d(in_ch, out_ch, tuple(kernel), stride=tuple(stride), padding=pad)
        self.norm1 = nn.InstanceNorm3d(out_ch, affine=True)
        self.act1 = nn.LeakyReLU(inplace=True)
        self.conv2 = nn.Conv3d(out_ch, out_ch, tuple(kernel), padding=pad)
        self.norm2 = nn.InstanceNorm3d(out_ch, affine=True)
        self.conv3 = nn.Conv3d(in_ch, out_ch, 1, stride=tuple(stride)) if use_1x1conv else None
        self.act2 = nn.LeakyReLU(inplace=True)
        self.peft_sites = nn.ModuleDict()  # PEFT modules in parallel to conv1 / conv2 / the whole block

    def forward(self, x: Tensor) -> Tensor:
        sites = self.peft_sites
        y = self.conv1(x)
        if "conv1" in sites:
            y = y + sites["conv1"](x)
        h = self.act1(self.norm1(y))
        y = self.norm2(self.conv2(h))
        if "conv2" in sites:
            y = y + sites["conv2"](h)
        skip = x if self.conv3 is None else self.conv3(x)
        if "residual" in sites:
            skip = skip + sites["residual"](x)
        return self.act2(y + skip)


class UpsampleLayer(nn.Module):
    """``Upsample_Layer_nearest``: nearest up-sampling by the stage stride and a 1x1x1 conv (``conv``).

    The official code up-samples first; a 1x1x1 conv commutes with nearest up-sampling, so the conv runs first here
    on 8x fewer voxels with the same result.
    """

    def __init__(self, in_ch: int, out_ch: int, scale: Sequence[int]) -> None:
        super().__init__()
        self.scale = tuple(float(s) for s in scale)
        self.conv = nn.Conv3d(in_ch, out_ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(self.conv(x), scale_factor=self.scale, mode="nearest")


def _triples(value: Sequence, count: int, what: str) -> tuple[tuple[int, int, int], ...]:
    try:
        out = tuple(tuple(int(v) for v in t) for t in value)
    except TypeError:
        out = ()
    if len(out) != count or any(len(t) != 3 or min(t) < 1 for t in out):
        hint = " (nnU-Net plans: truncate to 5 or pad with [1, 1, 1], as STUNetTrainer does)" if count == 5 else ""
        raise ConfigError(f"STU-Net {what} must be {count} triples of positive ints{hint}, got {value!r}")
    return out


class STUNet(nn.Module):
    """STU-Net for S/B/L/H (and small test sizes) with the official module names.

    Args:
        input_channels: image channels (1 for CT).
        num_classes: segmentation outputs incl. background (105 for the TotalSegmentator checkpoints, 3 for
            background/organ/tumour). ``out_channels`` is accepted as a synonym (``build_network`` passes it).
        depth: residual blocks per stage (6 ints).
        dims: channels per stage (6 ints).
        pool_op_kernel_sizes: strides of stages 1..5 (5 triples), applied by the first conv of those stages.
        conv_kernel_sizes: conv kernel per stage (6 triples of odd ints).
        task: ``"seg"`` or ``"features"`` (no heads; pooled features for the pretext stage).
        deep_supervision: in training mode, ``forward`` returns the outputs of all 5 heads, full resolution first
            (nnU-Net's order; use with ``monai.losses.DeepSupervisionLoss``). Always off in eval mode. Off by default
            so that ``forward`` returns one tensor unless a workflow asks for the tuple.
    """

    family = "stunet"
    TASKS = TASKS
    backbone_name = ""
    peft_method: str | None = None
    HOOKS = frozenset({"conv:conv1", "conv:conv2", "conv:residual", GLOBAL_FEATURE, DENSE_FEATURE})

    def __init__(
        self,
        input_channels: int = 1,
        num_classes: int = 0,
        depth: Sequence[int] = (1,) * NUM_STAGES,
        dims: Sequence[int] = (32, 64, 128, 256, 512, 512),
        pool_op_kernel_sizes: Sequence[Sequence[int]] = DEFAULT_STRIDES,
        conv_kernel_sizes: Sequence[Sequence[int]] = DEFAULT_KERNELS,
        task: str = "seg",
        out_channels: int = 1,
        deep_supervision: bool = False,
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise ConfigError(f"unknown task {task!r} for STU-Net; valid tasks: {', '.join(TASKS)}")
        depth, dims = [int(d) for d in depth], [int(d) for d in dims]
        if len(depth) != NUM_STAGES or len(dims) != NUM_STAGES or min(depth + dims) < 1:
            raise ConfigError(f"STU-Net needs 6 positive depths and 6 positive dims, got depth={depth}, dims={dims}")
        strides = _triples(pool_op_kernel_sizes, NUM_STAGES - 1, "pool_op_kernel_sizes")
        kernels = _triples(conv_kernel_sizes, NUM_STAGES, "conv_kernel_sizes")
        if any(k % 2 == 0 for t in kernels for k in t):
            raise ConfigError(f"STU-Net conv_kernel_sizes must be odd (same padding), got {kernels}")
        self.task, self.input_channels, self.depth, self.dims = task, int(input_channels), depth, dims
        self.pool_op_kernel_sizes = strides
        self.stride_product = tuple(math.prod(s[a] for s in strides) for a in range(3))
        self.deep_supervision = bool(deep_supervision)
        self.num_classes = self._resolve_classes(num_classes, out_channels) if task == "seg" else 0

        self.conv_blocks_context = nn.ModuleList()
        for s in range(NUM_STAGES):
            cin = self.input_channels if s == 0 else dims[s - 1]
            stride = (1, 1, 1) if s == 0 else strides[s - 1]
            blocks = [BasicResBlock(cin, dims[s], kernels[s], stride, use_1x1conv=True)]
            blocks += [BasicResBlock(dims[s], dims[s], kernels[s], (1, 1, 1), False) for _ in range(depth[s] - 1)]
            self.conv_blocks_context.append(nn.Sequential(*blocks))
        # Decoder level u works at stage 4-u: u = 0 is the deepest (coarsest) level, u = 4 full resolution.
        self.upsample_layers = nn.ModuleList(
            UpsampleLayer(dims[-1 - u], dims[-2 - u], strides[-1 - u]) for u in range(NUM_STAGES - 1)
        )
        self.conv_blocks_localization = nn.ModuleList()
        for u in range(NUM_STAGES - 1):
            c, k = dims[-2 - u], kernels[-2 - u]
            blocks = [BasicResBlock(2 * c, c, k, (1, 1, 1), use_1x1conv=True)]
            blocks += [BasicResBlock(c, c, k, (1, 1, 1), False) for _ in range(depth[-2 - u] - 1)]
            self.conv_blocks_localization.append(nn.Sequential(*blocks))
        if task == "seg":
            self.seg_outputs = nn.ModuleList(
                nn.Conv3d(dims[-2 - u], self.num_classes, 1) for u in range(NUM_STAGES - 1)
            )
        self.apply(_init_he)

    @staticmethod
    def _resolve_classes(num_classes: int, out_channels: int) -> int:
        given = {int(n) for n in (num_classes, out_channels) if int(n) > 1}
        if len(given) > 1:
            raise ConfigError(
                f"STU-Net got num_classes={num_classes} and out_channels={out_channels}; they mean the same "
                "(segmentation outputs incl. background), pass one of them"
            )
        if not given:
            raise ConfigError(
                "STU-Net segmentation needs num_classes (or out_channels) >= 2 outputs including background, "
                "e.g. 3 for background/organ/tumour"
            )
        return given.pop()

    # ----- the backbone contract (tpp_monai.contract) ---------------------------------------------------------------
    def interface(self) -> BackboneInterface:
        return BackboneInterface(
            family=self.family, layout="feature_maps", spatial_dims=3, width=self.dims[-1],
            # the stride of dense_features: the full-resolution decoder output
            in_channels=self.input_channels, patch_size=(1, 1, 1),
            wrap_targets={"conv": ("conv1", "conv2")},
        )  # fmt: skip

    def encoder_blocks(self) -> list[nn.Module]:
        """The residual blocks of the encoder, then of the decoder."""
        parts = (self.conv_blocks_context, self.conv_blocks_localization)
        return [block for part in parts for stage in part for block in stage]

    def block_widths(self) -> list[int]:
        return [b.out_channels for b in self.encoder_blocks()]

    @property
    def feature_dims(self) -> list[int]:
        """Channels of :meth:`forward_features`' levels: the bottleneck, then decoder levels 0 (coarsest) .. 4."""
        return [self.dims[-1], *(self.dims[-2 - u] for u in range(NUM_STAGES - 1))]

    def global_feature_dims(self) -> list[int]:
        return self.feature_dims

    def global_features(self, x: Tensor) -> list[Tensor]:
        """The pooled bottleneck, then the pooled decoder levels 0 .. 4 (heads there train decoder-side targets)."""
        return self.forward_features(x)

    def global_feature(self, x: Tensor) -> Tensor:
        """The pooled bottleneck ``[B, C]`` (the encoder alone)."""
        bottleneck, _ = self._encode(x)
        return bottleneck.mean(dim=(2, 3, 4))

    def dense_features(self, x: Tensor) -> Tensor:
        """The last decoder stage's output ``[B, dims[0], D, H, W]`` at full resolution (what the segmentation head
        reads): masked-image modelling on it trains the adapters of the encoder and the decoder alike."""
        bottleneck, skips = self._encode(x)
        return self._decode(bottleneck, skips)[-1]

    def dense_feature_dim(self) -> int:
        """Channels of :meth:`dense_features`."""
        return self.dims[0]

    def head_parameter_names(self) -> list[str]:
        """The deep-supervision heads ``seg_outputs.*`` (re-created for each task, as the official fine-tuning)."""
        return [n for n, _ in self.named_parameters() if n.startswith("seg_outputs.")]

    def unused_parameter_names(self) -> set[str]:
        """Parameters that ``forward`` in training mode never touches.

        ``features``: the decoder (reached through :meth:`forward_features` only). ``seg`` without deep supervision:
        the four coarse heads.
        """
        if self.task == "features":
            prefixes: tuple[str, ...] = ("upsample_layers.", "conv_blocks_localization.")
        elif not self.deep_supervision:
            prefixes = tuple(f"seg_outputs.{u}." for u in range(NUM_STAGES - 2))
        else:
            prefixes = ()
        return {n for n, _ in self.named_parameters() if prefixes and n.startswith(prefixes)}

    def check_input_size(self, spatial: Sequence[int], task: str | None = None) -> None:
        """Raise a :class:`ConfigError` unless a patch of this spatial size runs through the network (the same rule
        for every ``task``).

        Every axis must be a multiple of the product of the strides along it (otherwise the nearest up-sampling
        cannot meet the skip connection), and the bottleneck needs more than one voxel: InstanceNorm without running
        statistics normalises with the instance's own statistics in eval mode too, so this holds for sliding-window
        ROIs as well.
        """
        spatial = tuple(int(s) for s in spatial)
        if len(spatial) != 3:
            raise ConfigError(f"STU-Net takes 3D inputs [B, C, D, H, W]; got spatial size {spatial}")
        for axis, (size, mult) in enumerate(zip(spatial, self.stride_product)):
            if size % mult:
                fixed = tuple(math.ceil(s / m) * m for s, m in zip(spatial, self.stride_product))
                raise ConfigError(
                    f"STU-Net input of spatial size {spatial}: axis {axis} has {size} voxels, which is not a multiple "
                    f"of {mult} (the stride product {self.stride_product} of pool_op_kernel_sizes); use a patch/ROI "
                    f"size of multiples of {self.stride_product}, e.g. {fixed}"
                )
        bottleneck = tuple(s // m for s, m in zip(spatial, self.stride_product))
        if math.prod(bottleneck) < 2:
            raise ConfigError(
                f"STU-Net input of spatial size {spatial} leaves a {bottleneck} bottleneck; InstanceNorm needs more "
                f"than one voxel (training and inference): double the patch along an axis (multiples of "
                f"{self.stride_product})"
            )

    # ----- forward ---------------------------------------------------------------------------------------------------
    def _encode(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        if x.ndim != 5 or x.shape[1] != self.input_channels:
            raise ConfigError(f"STU-Net expects [B, {self.input_channels}, D, H, W] inputs, got shape {tuple(x.shape)}")
        self.check_input_size(x.shape[2:])
        skips = []
        for stage in self.conv_blocks_context[:-1]:
            x = stage(x)
            skips.append(x)
        return self.conv_blocks_context[-1](x), skips

    def _decode(self, x: Tensor, skips: list[Tensor]) -> list[Tensor]:
        """Decoder stage outputs, level 0 (coarsest) to 4 (full resolution)."""
        outs = []
        for u, (up, stage) in enumerate(zip(self.upsample_layers, self.conv_blocks_localization)):
            x = stage(torch.cat([up(x), skips[-1 - u]], dim=1))  # upsampled first, then skip (official order)
            outs.append(x)
        return outs

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """Globally average-pooled features ``[B, C_l]``: the bottleneck, then decoder levels 0 .. 4.

        For the TPP pretext stage: heads on the decoder levels give decoder-side target parameters a gradient.
        """
        bottleneck, skips = self._encode(x)
        levels = [bottleneck, *self._decode(bottleneck, skips)]
        return [f.mean(dim=(2, 3, 4)) for f in levels]

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        """``seg``: logits ``[B, K, D, H, W]`` (a tuple of 5, full resolution first, with deep supervision in
        training); ``features``: the pooled bottleneck ``[B, C]`` (encoder only)."""
        bottleneck, skips = self._encode(x)
        if self.task == "features":
            return bottleneck.mean(dim=(2, 3, 4))
        levels = self._decode(bottleneck, skips)
        if self.deep_supervision and self.training:
            return tuple(self.seg_outputs[u](levels[u]) for u in reversed(range(len(levels))))
        return self.seg_outputs[-1](levels[-1])


def _init_he(module: nn.Module) -> None:
    """nnU-Net v1 ``InitWeights_He(1e-2)``: Kaiming-normal conv weights (a = 0.01), zero biases."""
    if isinstance(module, nn.Conv3d):
        nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
