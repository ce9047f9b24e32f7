"""SSF (Lian et al. 2022): learned scale and shift of intermediate features.

Placement (the paper's Ratio implies 204 vectors of width 768 on ViT-B/16, fewer than SSF's official placement;
``methods.md`` §2.4 leaves the exact sites open): in every block after ``norm1``, the attention output projection,
``norm2``, ``fc1`` (4x wide) and ``fc2`` (8 units of 768, 96 pairs); plus six global pairs after the patch
projection, at the tokenizer output and on the outputs of the four feature-tap layers (4, 7, 10, 12).

The tap pairs scale and shift the residual stream itself, so blocks after layers 4, 7 and 10 read the transformed
tokens. Official SSF has no such site (its global pair sits after the final norm and feeds only the head); kept on
purpose: the Ratio column counts these pairs in classification and segmentation alike, and the TPP stage's pretext
reads only the encoder output, so pairs that transformed only the UNETR skips would never be pre-trained (and in
classification never trained); on the stream every pair trains in every task and stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from tpp_monai.backbones.vit import EncoderTuner, TokenLayout, default_taps
from tpp_monai.errors import ConfigError
from tpp_monai.peft.modules import ScaleShift
from tpp_monai.peft.registry import register_added

BLOCK_SITES = ("norm1", "qkv", "attn_out", "norm2", "fc1", "fc2")
EMBED_SITES = ("patch", "embed")


@dataclass(frozen=True)
class SSFConfig:
    """Args:
    block_sites: per-block sites, from ``norm1, qkv, attn_out, norm2, fc1, fc2``.
    embed_sites: tokenizer sites, from ``patch, embed``.
    tap_layers: 1-indexed layers whose outputs are scaled and shifted; ``None`` = the UNETR taps (4, 7, 10, 12).
    """

    block_sites: tuple[str, ...] = ("norm1", "attn_out", "norm2", "fc1", "fc2")
    embed_sites: tuple[str, ...] = EMBED_SITES
    tap_layers: tuple[int, ...] | None = None


class TapScaleShift(EncoderTuner):
    def __init__(self, dim: int, layers: tuple[int, ...]) -> None:
        super().__init__()
        self.taps = nn.ModuleDict({str(i): ScaleShift(dim) for i in layers})

    def after_block(self, index: int, x: Tensor, block_input: Tensor, layout: TokenLayout) -> Tensor:
        key = str(index + 1)
        return self.taps[key](x) if key in self.taps else x


def _width(model: nn.Module, site: str) -> int:
    block = model.encoder_blocks()[0]
    return {"qkv": 3 * model.embed_dim, "fc1": block.fc1.out_features}.get(site, model.embed_dim)


def inject(model: nn.Module, cfg: SSFConfig) -> SSFConfig:
    taps = tuple(cfg.tap_layers) if cfg.tap_layers is not None else default_taps(model.depth)
    cfg = SSFConfig(tuple(cfg.block_sites), tuple(cfg.embed_sites), taps)
    for name, allowed in (("block_sites", BLOCK_SITES), ("embed_sites", EMBED_SITES)):
        bad = set(getattr(cfg, name)) - set(allowed)
        if bad:
            raise ConfigError(f"SSF {name} {sorted(bad)} unknown; valid: {', '.join(allowed)}")
    if any(not 1 <= t <= model.depth for t in taps):
        raise ConfigError(f"SSF tap_layers must lie in 1..{model.depth}, got {list(taps)}")
    for block in model.encoder_blocks():
        for site in cfg.block_sites:
            block.peft_sites[site] = ScaleShift(_width(model, site))
    for site in cfg.embed_sites:
        model.peft_embed_sites[site] = ScaleShift(model.embed_dim)
    if taps:
        model.peft_encoder = TapScaleShift(model.embed_dim, taps)
    return cfg


SPEC = register_added(
    "ssf",
    SSFConfig,
    inject,
    identity_at_init=False,
    summary="SSF: scale and shift after 8 units per block plus 6 global units (204 vectors on ViT-B)",
)
