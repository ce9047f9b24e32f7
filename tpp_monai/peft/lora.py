"""LoRA (Hu et al. 2022) on the query and value projections.

MedCoSS fuses q, k and v into one projection (``in_proj_weight`` [3D, D]), so the low-rank updates are added to the
q and v slices of the fused output: ``qkv[:, :D] += s * B_q A_q h`` and ``qkv[:, 2D:] += s * B_v A_v h`` with
``s = alpha / rank``. ``B`` starts at zero: identity at initialisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

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
        self.scaling = cfg.alpha / cfg.rank
        self.updates = nn.ModuleDict({t: LowRank(dim, dim, cfg.rank) for t in cfg.targets})

    def forward(self, qkv: Tensor, h: Tensor) -> Tensor:
        parts = list(qkv.split(self.dim, dim=-1))
        for name, update in self.updates.items():
            i = SLICES.index(name)
            parts[i] = parts[i] + self.scaling * update(h)
        return torch.cat(parts, dim=-1)


def inject(model: nn.Module, cfg: LoRAConfig) -> LoRAConfig:
    targets = tuple(cfg.targets)
    if not targets or set(targets) - set(SLICES) or len(set(targets)) != len(targets):
        raise ConfigError(f"LoRA targets must be distinct names from {list(SLICES)}, got {list(cfg.targets)}")
    cfg = LoRAConfig(rank=cfg.rank, alpha=cfg.alpha, targets=targets)
    for block in model.encoder_blocks():
        block.peft_sites["qkv"] = FusedQKVLoRA(model.embed_dim, cfg)
    return cfg


SPEC = register_added(
    "lora",
    LoRAConfig,
    inject,
    identity_at_init=True,
    summary="LoRA rank 8 on the q and v slices of the fused attention projection",
)
