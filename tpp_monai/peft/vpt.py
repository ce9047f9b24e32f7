"""Visual Prompt Tuning (Jia et al. 2022), deep variant: every block gets its own prompt tokens.

The token sequence is ``[class token?, prompts, patches]``; before block i the previous prompt outputs are replaced
by block i's prompts. Prompts never reach a head or decoder: the encoder removes them before returning, and feature
taps (UNETR skips) carry patch tokens only. The Ratio column fits 10 prompts per layer (``methods.md`` §2.3).

Prompt dropout draws a mask per sample (official VPT). Unlike official VPT, whose ``train()`` keeps the frozen
encoder in eval mode, the frozen backbone trains in train mode with MedCoSS's DropPath 0.1 active, as for every
method here (the project-wide rule, :mod:`tpp_monai.peft`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tpp_monai.backbones.vit import EncoderTuner, TokenLayout
from tpp_monai.errors import ConfigError
from tpp_monai.peft.registry import register_added


@dataclass(frozen=True)
class VPTConfig:
    """Args:
    num_tokens: prompts per layer (10).
    deep: a prompt set per block (True) or only before the first block (False).
    dropout: dropout on the prompts (0.0).
    """

    num_tokens: int = 10
    deep: bool = True
    dropout: float = 0.0


class DeepPrompts(EncoderTuner):
    def __init__(self, dim: int, depth: int, patch_fan_in: int, cfg: VPTConfig) -> None:
        super().__init__()
        if cfg.num_tokens < 1:
            raise ConfigError(f"VPT num_tokens must be >= 1, got {cfg.num_tokens}")
        self.num_tokens = cfg.num_tokens
        self.deep = cfg.deep
        # VPT's init: uniform with the xavier bound computed from the patch fan-in (0.0625 on ViT-B/16).
        bound = math.sqrt(6.0 / (patch_fan_in + dim))
        self.prompts = nn.Parameter(torch.empty(depth if cfg.deep else 1, cfg.num_tokens, dim).uniform_(-bound, bound))
        self.dropout = nn.Dropout(cfg.dropout)

    def _prompt(self, index: int, batch: int) -> Tensor:
        # dropout after the batch expansion, as official VPT: every sample draws its own mask
        return self.dropout(self.prompts[index].unsqueeze(0).expand(batch, -1, -1))

    def begin(self, x: Tensor, layout: TokenLayout) -> Tensor:
        p = layout.num_prefix
        layout.num_prompts = self.num_tokens
        return torch.cat([x[:, :p], self._prompt(0, x.shape[0]), x[:, p:]], dim=1)

    def before_block(self, index: int, x: Tensor, layout: TokenLayout) -> Tensor:
        if not self.deep or index == 0:
            return x
        p = layout.num_prefix
        return torch.cat([x[:, :p], self._prompt(index, x.shape[0]), x[:, layout.patch_start :]], dim=1)


def inject(model: nn.Module, cfg: VPTConfig) -> VPTConfig:
    fan_in = model.in_chans * model.patch_size**2
    model.peft_encoder = DeepPrompts(model.embed_dim, model.depth, fan_in, cfg)
    return cfg


SPEC = register_added("vpt", VPTConfig, inject, identity_at_init=False, summary="deep VPT: 10 prompt tokens per block")
