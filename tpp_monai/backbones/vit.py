"""Vision-transformer machinery shared by the MedCoSS and timm/DINO backbones, with the hook points PEFT methods use
(their names and the rest of the contract: :mod:`tpp_monai.contract`).

Both backbones keep the exact parameter names of their public checkpoints, so each defines its own embedding and
block modules (MedCoSS: :mod:`~tpp_monai.backbones.medcoss`, timm/DINO: :mod:`~tpp_monai.backbones.timm_vit`);
everything else (the block forward, the encoder loop with masking, prompts and feature taps, and the classification /
segmentation heads, the latter's decoder in :mod:`~tpp_monai.backbones.unetr2d`) is written once here.

PEFT methods plug in at two levels (see :mod:`tpp_monai.peft`):

* **block sites**: ``block.peft_sites[site]`` transforms an intermediate tensor, ``forward(out, inp) -> out``, at the
  sites ``norm1, qkv, attn_out, norm2, fc1, fc2``; ``block.peft_deltas[branch]`` returns an extra term added to the
  residual stream after the ``attn`` or ``mlp`` branch, ``forward(branch_out, stream) -> delta``.
* **embedding sites**: ``model.peft_embed_sites[site]`` transforms the patch tokens right after the patch projection
  (``patch``) and at the tokenizer output (``embed``), ``forward(tokens) -> tokens``.
* **encoder hooks**: ``model.peft_encoder`` (an :class:`EncoderTuner`) sees the token sequence before and after every
  block (prompts, per-layer prompts, side networks).

Every module a method adds lives in a container whose name starts with ``peft``; that naming is what
:func:`tpp_monai.contract.is_peft_parameter` relies on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from tpp_monai.backbones.unetr2d import UNETR_MODULES, build_unetr_decoder, unetr_decode
from tpp_monai.contract import DENSE_FEATURE, DROPS_TOKENS, GLOBAL_FEATURE, VIT_HOOKS, BackboneInterface
from tpp_monai.errors import ConfigError

TASKS = ("cls", "seg", "features")


@dataclass
class TokenLayout:
    """Where things sit in the token sequence ``[prefix | prompts | patches]`` during one forward pass.

    Args:
        grid: patch grid of the full image: (rows, cols), or (depth, rows, cols) for 3D ViTs.
        num_prefix: class tokens in front (0 or 1).
        keep_idx: ``[B, n]`` indices of the visible patches when the input is masked (MAE), else ``None``.
        num_prompts: prompt tokens currently inserted after the prefix (set by prompt methods).
        image: the input image, for methods that derive prompts from pixels (EVP).
        patch_embedding: ``[B, N, D]`` raw patch projection of all patches (before position embeddings, the
            tokenizer's norm and masking), for methods that read it (EVP's embedding tune).
    """

    grid: tuple[int, ...]
    num_prefix: int
    keep_idx: Tensor | None = None
    num_prompts: int = 0
    image: Tensor | None = None
    patch_embedding: Tensor | None = None
    cache: dict = field(default_factory=dict)

    @property
    def patch_start(self) -> int:
        return self.num_prefix + self.num_prompts

    def patches_to_grid(self, patches: Tensor) -> Tensor:
        """``[B, n, C]`` patch tokens (visible ones when masked) -> ``[B, C, *grid]`` with zeros at masked cells."""
        b, _, c = patches.shape
        if self.keep_idx is None:
            return patches.transpose(1, 2).reshape(b, c, *self.grid)
        full = patches.new_zeros(b, math.prod(self.grid), c)
        full.scatter_(1, self.keep_idx.unsqueeze(-1).expand(-1, -1, c), patches)
        return full.transpose(1, 2).reshape(b, c, *self.grid)

    def grid_to_patches(self, grid: Tensor) -> Tensor:
        """Inverse of :meth:`patches_to_grid`: ``[B, C, *grid]`` -> ``[B, n, C]`` (gathering the visible cells)."""
        tokens = grid.flatten(2).transpose(1, 2)
        if self.keep_idx is None:
            return tokens
        return torch.gather(tokens, 1, self.keep_idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))

    def gather_patches(self, per_patch: Tensor) -> Tensor:
        """Select the visible patches of a ``[B, N, C]`` tensor computed for all patches."""
        if self.keep_idx is None:
            return per_patch
        return torch.gather(per_patch, 1, self.keep_idx.unsqueeze(-1).expand(-1, -1, per_patch.shape[-1]))


class EncoderTuner(nn.Module):
    """Base class of encoder-level PEFT modules; every hook is the identity by default."""

    def begin(self, x: Tensor, layout: TokenLayout) -> Tensor:
        return x

    def before_block(self, index: int, x: Tensor, layout: TokenLayout) -> Tensor:
        return x

    def after_block(self, index: int, x: Tensor, block_input: Tensor, layout: TokenLayout) -> Tensor:
        return x


class DropPath(nn.Module):
    """Stochastic depth per sample (as in timm and MedCoSS); the identity in eval mode."""

    def __init__(self, prob: float = 0.0) -> None:
        super().__init__()
        self.prob = float(prob)

    def forward(self, x: Tensor) -> Tensor:
        if self.prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)  # scale the [B, 1, 1] mask, not the activations: one full-size op instead of two


class ViTBlockBase(nn.Module):
    """Pre-LN transformer block forward with PEFT sites; subclasses own the parameters (and their names).

    Subclasses set ``norm1, norm2, fc1, fc2, proj`` (modules), ``num_heads``, ``drop_path`` and implement
    :meth:`qkv_params` and :meth:`layer_scale`.
    """

    num_heads: int

    def __init__(self) -> None:
        super().__init__()
        self.peft_sites = nn.ModuleDict()
        self.peft_deltas = nn.ModuleDict()

    def qkv_params(self) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def qkv_projection(self, h: Tensor) -> Tensor:
        """The fused q/k/v projection ``[B, L, D] -> [B, L, 3D]``."""
        weight, bias = self.qkv_params()
        return F.linear(h, weight, bias)

    def layer_scale(self, branch: str, x: Tensor) -> Tensor:
        return x

    def _site(self, name: str, out: Tensor, inp: Tensor) -> Tensor:
        if name in self.peft_sites:
            return self.peft_sites[name](out, inp)
        return out

    def attention(self, h: Tensor) -> Tensor:
        """Multi-head self-attention through PyTorch's fused scaled-dot-product kernel. ``h: [B, L, D]``."""
        b, length, dim = h.shape
        qkv = self._site("qkv", self.qkv_projection(h), h)  # [B, L, 3D]
        qkv = qkv.view(b, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        # unbind, not qkv[0..2]: its backward stacks the three gradients at once, where three selects would each
        # zero-fill and add a full [3, B, heads, L, hd] buffer
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, L, hd]
        return out.transpose(1, 2).reshape(b, length, dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self._site("norm1", self.norm1(x), x)
        attn = self.attention(h)
        a = self._site("attn_out", self.proj(attn), attn)
        stream = x
        x = x + self.drop_path(self.layer_scale("attn", a))
        if "attn" in self.peft_deltas:
            x = x + self.peft_deltas["attn"](a, stream)
        h = self._site("norm2", self.norm2(x), x)
        f = self._site("fc1", self.fc1(h), h)
        f = F.gelu(f)
        f = self._site("fc2", self.fc2(f), f)
        stream = x
        x = x + self.drop_path(self.layer_scale("mlp", f))
        if "mlp" in self.peft_deltas:
            x = x + self.peft_deltas["mlp"](f, stream)
        return x


def default_taps(depth: int) -> tuple[int, ...]:
    """UNETR feature taps: layers 4, 7, 10, 12 of a 12-layer encoder (1-indexed), scaled to other depths."""
    taps = sorted({max(1, round(depth * k / 12)) for k in (4, 7, 10)} | {depth})
    if len(taps) != 4:
        raise ConfigError(f"a segmentation backbone needs at least 4 encoder layers, got depth={depth}")
    return tuple(taps)


@dataclass
class EncoderOutput:
    """Result of :meth:`ViTBase.forward_features`.

    ``tokens`` is ``[B, P + n, D]`` (prefix tokens, then patch tokens; prompts removed); ``taps`` holds the patch
    tokens ``[B, n, D]`` after each requested layer.
    """

    tokens: Tensor
    num_prefix: int
    taps: list[Tensor]
    layout: TokenLayout

    @property
    def patches(self) -> Tensor:
        return self.tokens[:, self.num_prefix :]


def run_block(block: nn.Module, x: Tensor, checkpointing: bool) -> Tensor:
    """``block(x)``, recomputed in the backward pass instead of keeping its activations when ``checkpointing``
    (training with autograd on only; the RNG state is restored, so DropPath draws the same mask twice)."""
    if checkpointing and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
    return block(x)


def set_activation_checkpointing(model: nn.Module, enabled: bool = True) -> int:
    """Switch activation checkpointing of the transformer blocks (ViT encoders, the MAE decoder) in ``model`` on or
    off: less memory for one extra forward pass of each block in training. Returns how many modules it set."""
    count = 0
    for module in model.modules():
        if hasattr(type(module), "activation_checkpointing"):
            module.activation_checkpointing = bool(enabled)
            count += 1
    return count


class ViTBase(nn.Module):
    """A ViT backbone with an optional task head: ``task="cls"`` (pooled head), ``"seg"`` (UNETR) or ``"features"``.

    Subclasses build the embedding and blocks and implement :meth:`embed`, :meth:`prefix_tokens` and
    :attr:`blocks`; they call :meth:`_build_head` at the end of ``__init__``.
    """

    family: str = ""
    TASKS: ClassVar[tuple[str, ...]] = TASKS
    backbone_name: str = ""
    peft_method: str | None = None
    activation_checkpointing: bool = False  # see set_activation_checkpointing
    HOOKS = VIT_HOOKS | {GLOBAL_FEATURE, DROPS_TOKENS, DENSE_FEATURE}
    #: module-name suffixes of the tunable linear layers per role (for wrapping methods); set by each family
    WRAP_TARGETS: ClassVar[dict[str, tuple[str, ...]]] = {}
    embed_dim: int
    depth: int
    patch_size: int
    in_chans: int

    def __init__(self) -> None:
        super().__init__()
        self.peft_embed_sites = nn.ModuleDict()
        self.peft_encoder: EncoderTuner | None = None

    def _embed_site(self, name: str, tokens: Tensor) -> Tensor:
        if name in self.peft_embed_sites:
            return self.peft_embed_sites[name](tokens)
        return tokens

    # ----- the backbone contract (tpp_monai.contract) --------------------------------------------------------------
    def interface(self) -> BackboneInterface:
        return BackboneInterface(
            family=self.family, layout="tokens", spatial_dims=2, width=self.embed_dim, in_channels=self.in_chans,
            patch_size=(self.patch_size, self.patch_size), wrap_targets=dict(self.WRAP_TARGETS),
        )  # fmt: skip

    def block_widths(self) -> list[int]:
        return [self.embed_dim] * len(self.encoder_blocks())

    def global_feature_dims(self) -> list[int]:
        return [self.embed_dim]

    def global_feature(self, x: Tensor) -> Tensor:
        """Mean of the patch tokens (prompts and class token excluded), ``[B, D]``."""
        return self.forward_features(x).patches.mean(dim=1)

    def global_features(self, x: Tensor) -> list[Tensor]:
        return [self.global_feature(x)]

    def dense_features(self, x: Tensor) -> Tensor:
        """The last layer's patch tokens as a map ``[B, D, H/p, W/p]``."""
        out = self.forward_features(x, with_prefix=False)
        return out.layout.patches_to_grid(out.patches)

    # ----- subclass API -------------------------------------------------------------------------------------------
    def encoder_blocks(self) -> nn.ModuleList:
        """The transformer blocks, in order."""
        raise NotImplementedError

    def output_norm(self) -> nn.Module | None:
        """LayerNorm applied after the last block (timm/DINO), or ``None`` (MedCoSS has none)."""
        return None

    def project_patches(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """The raw patch projection ``[B, N, D]`` (patch conv, flattened) and the patch grid."""
        raise NotImplementedError

    def add_positions(self, patches: Tensor, grid: tuple[int, int]) -> Tensor:
        """Patch tokens with position information (and the tokenizer's norm, if any) from the raw projection."""
        raise NotImplementedError

    def prefix_tokens(self, batch: int) -> Tensor | None:
        """Class token(s) to put in front, ``[B, P, D]``, or ``None``."""
        raise NotImplementedError

    def patch_embedding_conv(self) -> nn.Conv2d:
        """The 2D patch-embedding convolution (methods that derive prompts from pixels mirror its geometry)."""
        raise NotImplementedError

    def unused_parameter_names(self) -> set[str]:
        """Parameters that a 2D forward pass never touches (they exist only for checkpoint compatibility)."""
        return set()

    def embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Patch tokens with position information, ``[B, N, D]``, and the patch grid."""
        patches, grid = self.project_patches(x)
        return self._tokens_from_patches(patches, grid), grid

    def _tokens_from_patches(self, patches: Tensor, grid: tuple[int, int]) -> Tensor:
        return self._embed_site("embed", self.add_positions(self._embed_site("patch", patches), grid))

    # ----- heads ----------------------------------------------------------------------------------------------------
    def _build_head(self, task: str, num_classes: int, out_channels: int, feature_size: int = 16) -> None:
        if task not in TASKS:
            raise ConfigError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
        self.task = task
        self.num_classes = num_classes
        if task == "cls":
            if num_classes < 2:
                raise ConfigError(f"classification needs num_classes >= 2, got {num_classes}")
            # MedCoSS classification head: mean of patch tokens -> LayerNorm(eps 1e-6) -> Linear (methods.md §1.3)
            self.fc_norm = nn.LayerNorm(self.embed_dim, eps=1e-6)
            self.head = nn.Linear(self.embed_dim, num_classes)
            nn.init.xavier_uniform_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        elif task == "seg":
            self.taps = default_taps(self.depth)
            build_unetr_decoder(self, self.in_chans, out_channels, self.embed_dim, feature_size)

    def head_parameter_names(self) -> list[str]:
        """Names of the task-head parameters (always trained in fine-tuning, never target parameters)."""
        prefixes = {"cls": ("fc_norm.", "head."), "seg": UNETR_MODULES, "features": ()}[self.task]
        return [n for n, _ in self.named_parameters() if n.startswith(tuple(p.rstrip(".") + "." for p in prefixes))]

    # ----- forward ----------------------------------------------------------------------------------------------------
    def forward_features(
        self, x: Tensor, keep_idx: Tensor | None = None, taps: Sequence[int] = (), with_prefix: bool | None = None
    ) -> EncoderOutput:
        """Run the encoder. ``keep_idx`` (``[B, n]``) keeps only those patches (MAE); ``taps`` are 1-indexed layers
        whose patch tokens are returned. ``with_prefix`` overrides whether the class token is prepended."""
        patches, grid = self.project_patches(x)
        tokens = self._tokens_from_patches(patches, grid)
        if keep_idx is not None:
            tokens = torch.gather(tokens, 1, keep_idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        prefix = self.prefix_tokens(tokens.shape[0]) if with_prefix is not False else None
        if prefix is None and with_prefix:
            raise ConfigError(f"{type(self).__name__} built for task {self.task!r} has no class token")
        num_prefix = 0 if prefix is None else prefix.shape[1]
        if prefix is not None:
            tokens = torch.cat([prefix, tokens], dim=1)
        layout = TokenLayout(grid=grid, num_prefix=num_prefix, keep_idx=keep_idx, image=x, patch_embedding=patches)
        tuner = self.peft_encoder
        if tuner is not None:
            tokens = tuner.begin(tokens, layout)
        tap_set, tapped = set(taps), []
        blocks = self.encoder_blocks()
        ckpt = self.activation_checkpointing and self.training
        for i, block in enumerate(blocks):
            if tuner is not None:
                tokens = tuner.before_block(i, tokens, layout)
                block_input = tokens
                tokens = tuner.after_block(i, run_block(block, tokens, ckpt), block_input, layout)
            else:
                tokens = run_block(block, tokens, ckpt)
            if i + 1 in tap_set and i + 1 != len(blocks):
                tapped.append(tokens[:, layout.patch_start :])
        norm = self.output_norm()
        if norm is not None:
            tokens = norm(tokens)
        if layout.num_prompts:
            tokens = torch.cat([tokens[:, :num_prefix], tokens[:, layout.patch_start :]], dim=1)
            layout.num_prompts = 0
        if len(blocks) in tap_set:
            tapped.append(tokens[:, num_prefix:])
        return EncoderOutput(tokens=tokens, num_prefix=num_prefix, taps=tapped, layout=layout)

    def forward(self, x: Tensor) -> Tensor:
        """Task output: class logits ``[B, C]``, segmentation logits ``[B, C, H, W]`` or pooled features ``[B, D]``."""
        if self.task == "seg":
            out = self.forward_features(x, taps=self.taps)
            return unetr_decode(self, x, out.taps, out.layout.grid)
        out = self.forward_features(x)
        pooled = out.patches.mean(dim=1)
        if self.task == "features":
            return pooled
        return self.head(self.fc_norm(pooled))
