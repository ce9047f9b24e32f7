"""LoRA (Hu et al. 2022) on the query and value projections.

MedCoSS fuses q, k and v into one projection (``in_proj_weight`` [3D, D]), so the low-rank updates are added to the
q and v slices of the fused output: ``qkv[:, :D] += s * B_q A_q h`` and ``qkv[:, 2D:] += s * B_v A_v h`` with
``s = alpha / rank``. ``B`` starts at zero: identity at initialisation.

All updates of a block are computed as one stacked low-rank product, with no split and no concatenation of the
activations: ``qkv + [A_q; A_v] h`` through a block-structured ``B`` [3D, T r] (``s B_t`` in the rows of its slice
and the columns of its rank block, zeros where a slice has no update), i.e. two matrix products per block, as
peft's LoRA on a fused ``qkv`` linear. The parameters stay one ``LowRank`` per slice (checkpoint keys
``updates.<slice>.lora_a / lora_b``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tpp_monai.contract import attach_site, site
from tpp_monai.errors import ConfigError
from tpp_monai.peft.modules import LowRank
from tpp_monai.peft.registry import register_added

SLICES = ("q", "k", "v")


@dataclass(frozen=True)
class LoRAConfig:
    """Args:
    rank: rank r of every update (8).
    alpha: scaling numerator; the update is multiplied by alpha / rank (8).
    targets: fused-projection slices that get an update, from ``("q", "k", "v")``.
    """

    rank: int = 8
    alpha: float = 8.0
    targets: tuple[str, ...] = ("q", "v")


class FusedQKVLoRA(nn.Module):
    def __init__(self, dim: int, cfg: LoRAConfig) -> None:
        super().__init__()
        self.dim = dim
        self.rank = cfg.rank
        self.scaling = cfg.alpha / cfg.rank
        self.updates = nn.ModuleDict({t: LowRank(dim, dim, cfg.rank) for t in cfg.targets})

    def stacked_weights(self) -> tuple[Tensor, Tensor]:
        """``A`` [T r, D] (the targets' down-projections stacked) and the block-structured, scaled ``B`` [3D, T r]."""
        ups = list(self.updates.items())
        a = torch.cat([u.lora_a for _, u in ups]) if len(ups) > 1 else ups[0][1].lora_a
        b = ups[0][1].lora_b.new_zeros(len(SLICES) * self.dim, len(ups) * self.rank)
        for col, (name, u) in enumerate(ups):
            row = SLICES.index(name) * self.dim
            b[row : row + self.dim, col * self.rank : (col + 1) * self.rank] = u.lora_b * self.scaling
        return a, b

    def forward(self, qkv: Tensor, h: Tensor) -> Tensor:
        a, b = self.stacked_weights()
        low = F.linear(h, a).flatten(0, -2)  # [N, T r]
        # one fused kernel: qkv + low @ b^T (addmm), no split of qkv and no concatenation of its slices
        out = torch.addmm(qkv.flatten(0, -2), low, b.t().to(low.dtype))
        return out.view(qkv.shape)


def inject(model: nn.Module, cfg: LoRAConfig) -> LoRAConfig:
    targets = tuple(cfg.targets)
    if not targets or set(targets) - set(SLICES) or len(set(targets)) != len(targets):
        raise ConfigError(f"LoRA targets must be distinct names from {list(SLICES)}, got {list(cfg.targets)}")
    cfg = LoRAConfig(rank=cfg.rank, alpha=cfg.alpha, targets=targets)
    for block, width in zip(model.encoder_blocks(), model.block_widths()):
        attach_site(model, block, "qkv", FusedQKVLoRA(width, cfg))
    return cfg


SPEC = register_added(
    "lora",
    LoRAConfig,
    inject,
    identity_at_init=True,
    summary="LoRA rank 8 on the q and v slices of the fused attention projection",
    requires=lambda cfg: frozenset({site("qkv")}),
)
