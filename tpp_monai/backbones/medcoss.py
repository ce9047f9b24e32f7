"""MedCoSS ViT-B/16 (Ye et al., CVPR 2024), the TPP paper's main backbone, with the exact MedCoSS parameter names.

A faithful re-implementation of ``Unified_Model`` from the MedCoSS downstream code (``methods.md`` §1): a
Uni-Perceiver-style tokenizer (``video_embed``: 2D patch conv, a 1-D raster-indexed spatial position table sized for
512x512 inputs plus an 8-row temporal table whose row is drawn at random in training, then LayerNorm), 12 pre-LN
encoder layers (``fused_encoder``) with a fused q/k/v projection (``torch.nn.MultiheadAttention`` parameter names),
LayerScale on both branches and DropPath 0.1, and no final norm. The unused 3D patch embedding and 3D position tables
exist as in the public checkpoints, so both load strictly.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from tpp_monai.backbones.vit import DropPath, ViTBase, ViTBlockBase
from tpp_monai.errors import ConfigError


class _SpatioTemporalPosition(nn.Module):
    """``Divide_ST_POS``: a learned spatial table indexed 0..N-1 in raster order plus a learned temporal table."""

    def __init__(self, num_positions: int, num_frames: int, dim: int) -> None:
        super().__init__()
        self.spatial_pos_embed = nn.Embedding(num_positions, dim)
        self.temporal_pos_embed = nn.Embedding(num_frames, dim)

    def forward(self, num_tokens: int) -> Tensor:
        if num_tokens > self.spatial_pos_embed.num_embeddings:
            raise ConfigError(
                f"the input has {num_tokens} patches but the MedCoSS position table holds "
                f"{self.spatial_pos_embed.num_embeddings}; use an image size of at most 512x512 (patch 16)"
            )
        device = self.spatial_pos_embed.weight.device
        # In training MedCoSS adds a random temporal row (a mild augmentation); row 0 in eval.
        if self.training:
            frame = torch.randint(0, self.temporal_pos_embed.num_embeddings, (1,), device=device)
        else:
            frame = torch.zeros(1, dtype=torch.long, device=device)
        return self.spatial_pos_embed.weight[:num_tokens] + self.temporal_pos_embed(frame)


class _VideoEmbedding(nn.Module):
    """``VideoBaseEmbedding`` of the MedCoSS fine-tuning code (without the two unused pre-training tables).

    A parameter container: :meth:`MedCoSSViT.embed` runs the 2D path (conv -> flatten -> + position -> LayerNorm).
    """

    def __init__(self, dim: int, patch: int, in_chans: int, max_size_2d: int = 512, max_size_3d: int = 256) -> None:
        super().__init__()
        self.patch_size = patch
        self.embeddings_norm = nn.LayerNorm(dim)
        self.embeddings_st_pos_2D = _SpatioTemporalPosition((max_size_2d // patch) ** 2, 8, dim)
        self.embeddings_st_pos_3D = _SpatioTemporalPosition((max_size_3d // patch) ** 3, 8, dim)
        self.embeddings = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)
        self.embeddings_3D = nn.Conv3d(1, dim, kernel_size=patch, stride=patch)


class MedCoSSLayer(ViTBlockBase):
    """One MedCoSS ``TransformerEncoderLayer`` (pre-LN, LayerScale, DropPath, GELU)."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, drop_path: float, layer_scale_init: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.gamma_1 = nn.Parameter(torch.full((dim,), layer_scale_init))
        self.gamma_2 = nn.Parameter(torch.full((dim,), layer_scale_init))
        # Kept as nn.MultiheadAttention for its parameter names (in_proj_weight, in_proj_bias, out_proj); the forward
        # computes attention itself so that PEFT methods can reach the fused projection (LoRA on the q and v slices).
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.linear1 = nn.Linear(dim, mlp_dim)
        self.linear2 = nn.Linear(mlp_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.drop_path = DropPath(drop_path)

    @property
    def proj(self) -> nn.Linear:
        return self.self_attn.out_proj

    @property
    def fc1(self) -> nn.Linear:
        return self.linear1

    @property
    def fc2(self) -> nn.Linear:
        return self.linear2

    def qkv_params(self) -> tuple[Tensor, Tensor | None]:
        return self.self_attn.in_proj_weight, self.self_attn.in_proj_bias

    def layer_scale(self, branch: str, x: Tensor) -> Tensor:
        return x * (self.gamma_1 if branch == "attn" else self.gamma_2)


class _Encoder(nn.Module):
    def __init__(self, layers: list[MedCoSSLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)


class MedCoSSViT(ViTBase):
    """MedCoSS ViT with an optional task head.

    Args:
        embed_dim, depth, num_heads, mlp_dim, patch_size: encoder geometry (ViT-B/16: 768, 12, 12, 3072, 16).
        in_chans: image channels (3 in all MedCoSS 2D models).
        drop_path: stochastic depth of every layer (0.1 in MedCoSS).
        layer_scale_init: LayerScale start value before pre-training (1e-3 in MedCoSS).
        task: ``"cls"`` (class token + mean-pooled patch tokens -> ``fc_norm`` -> ``head``, the Chest_XR model),
            ``"seg"`` (no class token; UNETR-2D decoder fed by layers 4, 7, 10, 12, the GlaS model) or
            ``"features"`` (class token, no head: the encoder used by the self-supervised TPP stage).
        num_classes: classifier outputs (``task="cls"``).
        out_channels: segmentation output channels (``task="seg"``; 1 sigmoid channel in MedCoSS).
    """

    family = "medcoss"
    # the fused q/k/v projection is a raw parameter (self_attn.in_proj_weight), not a module a wrapper can replace
    WRAP_TARGETS: ClassVar[dict[str, tuple[str, ...]]] = {
        "attention_out": ("self_attn.out_proj",),
        "mlp": ("linear1", "linear2"),
    }

    def __init__(
        self,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_dim: int = 3072,
        patch_size: int = 16,
        in_chans: int = 3,
        drop_path: float = 0.1,
        layer_scale_init: float = 1e-3,
        task: str = "features",
        num_classes: int = 0,
        out_channels: int = 1,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ConfigError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.depth, self.patch_size, self.in_chans = embed_dim, depth, patch_size, in_chans
        self.num_heads = num_heads
        if task != "seg":  # the MedCoSS segmentation model has no class token
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            nn.init.normal_(self.cls_token, std=0.02)
        self.fused_encoder = _Encoder(
            [MedCoSSLayer(embed_dim, num_heads, mlp_dim, drop_path, layer_scale_init) for _ in range(depth)]
        )
        self.video_embed = _VideoEmbedding(embed_dim, patch_size, in_chans)
        self._init_linear_and_norm()
        self._build_head(task, num_classes, out_channels)

    def _init_linear_and_norm(self) -> None:
        # MedCoSS init: xavier-uniform Linear with zero bias, LayerNorm weight 1 / bias 0 (nn.MultiheadAttention's
        # packed projection is xavier-initialised by PyTorch already).
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def encoder_blocks(self) -> nn.ModuleList:
        return self.fused_encoder.layers

    def patch_embedding_conv(self) -> nn.Conv2d:
        return self.video_embed.embeddings

    def project_patches(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        if x.ndim != 4:
            raise ConfigError(f"the 2D MedCoSS model expects [B, C, H, W] images, got shape {tuple(x.shape)}")
        if x.shape[-1] % self.patch_size or x.shape[-2] % self.patch_size:
            raise ConfigError(
                f"image size {tuple(x.shape[-2:])} is not divisible by the patch size {self.patch_size}; "
                "resize the images to a multiple of it (the paper uses 224x224, GlaS 512x512)"
            )
        tokens = self.video_embed.embeddings(x)  # [B, D, H/p, W/p]
        return tokens.flatten(2).transpose(1, 2), (int(tokens.shape[-2]), int(tokens.shape[-1]))

    def add_positions(self, patches: Tensor, grid: tuple[int, int]) -> Tensor:
        emb = self.video_embed
        return emb.embeddings_norm(patches + emb.embeddings_st_pos_2D(patches.shape[1]))

    def prefix_tokens(self, batch: int) -> Tensor | None:
        # MedCoSS prepends the class token after the tokenizer, without a position embedding.
        cls = getattr(self, "cls_token", None)
        return None if cls is None else cls.expand(batch, -1, -1)

    def unused_parameter_names(self) -> set[str]:
        """Parameters a 2D forward never touches: the 3D patch embedding and the 3D position tables."""
        return {
            n
            for n, _ in self.named_parameters()
            if n.startswith(("video_embed.embeddings_3D.", "video_embed.embeddings_st_pos_3D."))
        }
