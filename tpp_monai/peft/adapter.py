"""Adapter (Houlsby et al. 2019): a serial bottleneck after the attention and the MLP sub-layers of every block.

The paper's Ratio column fits two adapters per block with bottleneck 76 (``methods.md`` §2.6, §3.3). Placement
(option ``layer_scale``):

* ``"inside"`` (default): adapter-bert's placement, the adapter transforms the sub-layer's output ``h`` (after the
  sub-layer's own projection, where adapter-bert calls ``adapter_fn``) before anything of the residual step, so
  MedCoSS's LayerScale and DropPath act on it as on the sub-layer: ``x + drop_path(gamma * (h + A(h)))``. It is what
  inserting adapter-bert's adapter into MedCoSS's layer code gives; the TPP paper names no other.
* ``"outside"``: ``x + drop_path(gamma * h) + A(h)``: LayerScale on the frozen path only, so a small pre-trained
  ``gamma`` does not damp the adapter. Equal to ``"inside"`` where there is no LayerScale (timm/DINO ViTs) and
  DropPath is off.

Zero-initialised up-projection (``init="lora"``, default): identity at initialisation in both placements.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import Tensor, nn

from tpp_monai.contract import attach_site, site
from tpp_monai.errors import ConfigError
from tpp_monai.peft.modules import Bottleneck
from tpp_monai.peft.registry import register_added

PLACEMENTS = ("inside", "outside")
# the block site whose output an "inside" adapter transforms, per sub-layer
_SUBLAYER_OUTPUT_SITE = {"attn": "attn_out", "mlp": "fc2"}


@dataclass(frozen=True)
class AdapterConfig:
    """Args:
    bottleneck: hidden width; ``None`` = embed_dim // 10 (76 on ViT-B/16, the paper's Ratio).
    positions: sub-layers that get an adapter, from ``("attn", "mlp")``.
    activation: ``"relu"`` or ``"gelu"``.
    init: ``"lora"`` (zero up-projection, identity at init) or ``"houlsby"`` (adapter-bert's truncated N(0, 1e-3)).
    layer_scale: ``"inside"`` (adapter-bert's placement, default) or ``"outside"`` MedCoSS's LayerScale (module
        docstring).
    """

    bottleneck: int | None = None
    positions: tuple[str, ...] = ("attn", "mlp")
    activation: str = "relu"
    init: str = "lora"
    layer_scale: str = "inside"


class SerialAdapter(nn.Module):
    """``A(h)``, joined to the residual stream next to the sub-layer (``block.peft_deltas``, placement "outside")."""

    def __init__(self, dim: int, hidden: int, act: str, init: str) -> None:
        super().__init__()
        self.adapter = Bottleneck(dim, hidden, act, init=init)

    def forward(self, branch: Tensor, stream: Tensor) -> Tensor:
        return self.adapter(branch)


class SublayerAdapter(SerialAdapter):
    """``h + A(h)`` on the sub-layer output (a ``block.peft_sites`` transform, placement "inside")."""

    def forward(self, out: Tensor, inp: Tensor) -> Tensor:
        return out + self.adapter(out)


def inject(model: nn.Module, cfg: AdapterConfig) -> AdapterConfig:
    cfg = replace(cfg, bottleneck=cfg.bottleneck or max(1, model.embed_dim // 10), positions=tuple(cfg.positions))
    bad = set(cfg.positions) - {"attn", "mlp"}
    if bad or not cfg.positions:
        raise ConfigError(f"adapter positions must be a non-empty subset of ['attn', 'mlp'], got {list(cfg.positions)}")
    if cfg.layer_scale not in PLACEMENTS:
        raise ConfigError(f"adapter layer_scale {cfg.layer_scale!r} unknown; valid: {', '.join(PLACEMENTS)}")
    for block, width in zip(model.encoder_blocks(), model.block_widths()):
        for pos in cfg.positions:
            if cfg.layer_scale == "inside":
                attach_site(model, block, _SUBLAYER_OUTPUT_SITE[pos],
                            SublayerAdapter(width, cfg.bottleneck, cfg.activation, cfg.init))  # fmt: skip
            else:
                block.peft_deltas[pos] = SerialAdapter(width, cfg.bottleneck, cfg.activation, cfg.init)
    return cfg


def _hooks(cfg: AdapterConfig) -> frozenset[str]:
    if cfg.layer_scale == "inside":
        return frozenset(site(_SUBLAYER_OUTPUT_SITE[p]) for p in cfg.positions if p in _SUBLAYER_OUTPUT_SITE)
    if cfg.layer_scale == "outside":
        return frozenset(f"delta:{p}" for p in cfg.positions if p in _SUBLAYER_OUTPUT_SITE)
    return frozenset()  # an unknown placement: inject names the valid ones


SPEC = register_added(
    "adapter",
    AdapterConfig,
    inject,
    identity_at_init=True,
    summary="Houlsby adapter: two serial bottlenecks (76) per block",
    requires=_hooks,
)
