"""AdaptFormer (Chen et al. 2022): a scaled bottleneck in parallel to every block's MLP.

``x <- x + gamma2 * MLP(norm2(x)) + s * up(dropout(relu(down(x))))`` with ``x`` the stream after the attention
residual (AdaptFormer's ``ffn_option="parallel"``). The Ratio column fits bottleneck 192 (``methods.md`` §2.7).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import Tensor, nn

from tpp_monai.peft.modules import Bottleneck
from tpp_monai.peft.registry import register_added


@dataclass(frozen=True)
class AdaptFormerConfig:
    """Args:
    bottleneck: hidden width; ``None`` = embed_dim // 4 (192 on ViT-B/16, the paper's Ratio).
    scale: fixed output scale ``s`` (0.1).
    dropout: dropout inside the bottleneck (0.1).
    """

    bottleneck: int | None = None
    scale: float = 0.1
    dropout: float = 0.1


class ParallelAdapter(nn.Module):
    def __init__(self, dim: int, hidden: int, scale: float, dropout: float) -> None:
        super().__init__()
        self.adapter = Bottleneck(dim, hidden, "relu", dropout)
        self.scale = scale

    def forward(self, branch: Tensor, stream: Tensor) -> Tensor:
        return self.scale * self.adapter(stream)


def inject(model: nn.Module, cfg: AdaptFormerConfig) -> AdaptFormerConfig:
    cfg = replace(cfg, bottleneck=cfg.bottleneck or max(1, model.embed_dim // 4))
    for block, width in zip(model.encoder_blocks(), model.block_widths()):
        block.peft_deltas["mlp"] = ParallelAdapter(width, cfg.bottleneck, cfg.scale, cfg.dropout)
    return cfg


SPEC = register_added(
    "adaptformer",
    AdaptFormerConfig,
    inject,
    identity_at_init=True,
    summary="AdaptFormer: parallel scaled bottleneck (192) next to every MLP",
    requires=lambda cfg: frozenset({"delta:mlp"}),
)
