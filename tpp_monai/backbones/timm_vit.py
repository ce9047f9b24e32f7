"""The timm/DINO ViT written out with timm's parameter names (``vit_small_patch16_224`` layout), so the Path_DINO
checkpoint loads into it; encoder, heads and PEFT hook points are those of :class:`~tpp_monai.backbones.vit.ViTBase`.
(:mod:`tpp_monai.backbones.timm_models` wraps models of the timm library itself.)"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tpp_monai.backbones.vit import DropPath, ViTBase, ViTBlockBase


class _TimmAttention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)


class _TimmMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)


class TimmBlock(ViTBlockBase):
    """timm ``Block`` parameter layout (``norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2``), LayerNorm eps 1e-6."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _TimmAttention(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _TimmMlp(dim, mlp_dim)
        self.drop_path = DropPath(drop_path)

    @property
    def proj(self) -> nn.Linear:
        return self.attn.proj

    @property
    def fc1(self) -> nn.Linear:
        return self.mlp.fc1

    @property
    def fc2(self) -> nn.Linear:
        return self.mlp.fc2

    def qkv_params(self) -> tuple[Tensor, Tensor | None]:
        return self.attn.qkv.weight, self.attn.qkv.bias

    def qkv_projection(self, h: Tensor) -> Tensor:
        # through the module, so a library that wraps ``attn.qkv`` (peft's LoRA, the bench's peer) takes effect
        return self.attn.qkv(h)


class _PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)


class TimmViT(ViTBase):
    """The timm/DINO ViT (``vit_small_patch16_224`` layout): the Path_DINO checkpoint of Kang et al. 2023 loads into it.

    Position embeddings are learned for a 14x14 grid (+ class token) and bicubically resized for other input sizes
    by DINO's rule (:meth:`_pos_for_grid`).
    """

    family = "timm_vit"
    WRAP_TARGETS: ClassVar[dict[str, tuple[str, ...]]] = {
        "attention": ("attn.qkv",),
        "attention_out": ("attn.proj",),
        "mlp": ("mlp.fc1", "mlp.fc2"),
    }

    def __init__(
        self,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_dim: int | None = None,
        patch_size: int = 16,
        in_chans: int = 3,
        pos_grid: int = 14,
        drop_path: float = 0.0,
        task: str = "features",
        num_classes: int = 0,
        out_channels: int = 1,
    ) -> None:
        super().__init__()
        self.embed_dim, self.depth, self.patch_size, self.in_chans = embed_dim, depth, patch_size, in_chans
        self.num_heads = num_heads
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_grid * pos_grid + 1, embed_dim))
        self.patch_embed = _PatchEmbed(in_chans, embed_dim, patch_size)
        self.blocks = nn.ModuleList(
            TimmBlock(embed_dim, num_heads, mlp_dim or 4 * embed_dim, drop_path) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self._build_head(task, num_classes, out_channels)

    def encoder_blocks(self) -> nn.ModuleList:
        return self.blocks

    def output_norm(self) -> nn.Module:
        return self.norm

    def patch_embedding_conv(self) -> nn.Conv2d:
        return self.patch_embed.proj

    def _pos_for_grid(self, grid: tuple[int, int]) -> Tensor:
        """The patch position table for ``grid``: DINO's ``interpolate_pos_encoding`` rule (the Path_DINO
        checkpoint's own code): unchanged on the trained square grid, else bicubic (no anti-aliasing) with the scale
        factor ``(g + 0.1) / side`` per axis, which sets the sampling positions (not ``size=grid``)."""
        pos = self.pos_embed[:, 1:]
        side = math.isqrt(pos.shape[1])
        if grid == (side, side):
            return pos
        pos = pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        scale = ((grid[0] + 0.1) / side, (grid[1] + 0.1) / side)
        pos = F.interpolate(pos, scale_factor=scale, mode="bicubic", align_corners=False)
        return pos.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)

    def project_patches(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        tokens = self.patch_embed.proj(x)  # [B, D, H/p, W/p]
        return tokens.flatten(2).transpose(1, 2), (tokens.shape[-2], tokens.shape[-1])

    def add_positions(self, patches: Tensor, grid: tuple[int, int]) -> Tensor:
        return patches + self._pos_for_grid(grid)

    def prefix_tokens(self, batch: int) -> Tensor | None:
        return (self.cls_token + self.pos_embed[:, :1]).expand(batch, -1, -1)
