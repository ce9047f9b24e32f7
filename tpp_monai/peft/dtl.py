"""DTL+ (Fu et al. 2024): a compact side network of low-rank maps whose running sum is fed back into later blocks.

``R <- R + B_i A_i x_i`` for every block input ``x_i``; from the middle block on, after block i the stream receives
``fuse(swish_beta(R))``, where ``fuse`` is a depth-wise 3x3 convolution over the patch grid (class token passes
unchanged) - the DTL+ variant the Ratio column fits (``methods.md`` §2.9). ``B`` starts at zero: identity at init.
Under MAE masking the fusion convolution runs on a grid with zeros at the masked patches.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from tpp_monai.backbones.vit import EncoderTuner, TokenLayout
from tpp_monai.errors import ConfigError
from tpp_monai.peft.modules import LowRank
from tpp_monai.peft.registry import register_added


@dataclass(frozen=True)
class DTLConfig:
    """Args:
    rank: rank of each side map (2).
    start_block: first block (0-indexed) after which the side output is added; ``None`` = depth // 2 (6 on ViT-B).
    beta: swish sharpness, ``z * sigmoid(beta * z)`` (100, the DTL VTAB scripts).
    fusion_kernel: depth-wise fusion kernel (3, DTL+); 0 disables the fusion (plain DTL).
    """

    rank: int = 2
    start_block: int | None = None
    beta: float = 100.0
    fusion_kernel: int = 3


class SideNetwork(EncoderTuner):
    def __init__(self, dim: int, depth: int, cfg: DTLConfig) -> None:
        super().__init__()
        self.start = cfg.start_block
        self.beta = cfg.beta
        self.side = nn.ModuleList(LowRank(dim, dim, cfg.rank) for _ in range(depth))
        k = cfg.fusion_kernel
        self.fusion = nn.Conv2d(dim, dim, k, padding="same", groups=dim, bias=False) if k else None

    def begin(self, x: Tensor, layout: TokenLayout) -> Tensor:
        layout.cache["dtl"] = None
        return x

    def after_block(self, index: int, x: Tensor, block_input: Tensor, layout: TokenLayout) -> Tensor:
        side = self.side[index](block_input)
        residual = side if layout.cache["dtl"] is None else layout.cache["dtl"] + side
        layout.cache["dtl"] = residual
        if index < self.start:
            return x
        act = residual * torch.sigmoid(self.beta * residual)
        if self.fusion is not None:
            start = layout.patch_start
            patches = layout.grid_to_patches(self.fusion(layout.patches_to_grid(act[:, start:])))
            act = torch.cat([act[:, :start], patches], dim=1)
        return x + act


def inject(model: nn.Module, cfg: DTLConfig) -> DTLConfig:
    cfg = replace(cfg, start_block=model.depth // 2 if cfg.start_block is None else cfg.start_block)
    if not 0 <= cfg.start_block < model.depth:
        raise ConfigError(f"DTL start_block must lie in 0..{model.depth - 1}, got {cfg.start_block}")
    if cfg.fusion_kernel < 0 or (cfg.fusion_kernel and cfg.fusion_kernel % 2 == 0):
        raise ConfigError(f"DTL fusion_kernel must be 0 or an odd size, got {cfg.fusion_kernel}")
    model.peft_encoder = SideNetwork(model.embed_dim, model.depth, cfg)
    return cfg


SPEC = register_added(
    "dtl",
    DTLConfig,
    inject,
    identity_at_init=True,
    summary="DTL+: rank-2 side network with a depth-wise fusion conv, fed back from the middle block on",
)
