"""TPP with MAE (paper §3.2, §4.2): the frozen backbone and its target parameters encode the visible 25 % of
patches, a decoder reconstructs the masked ones, and the loss is the MSE on masked patches against per-patch
normalised pixels (MedCoSS ``Unified_Model.forward_loss`` with ``norm_pix_loss``).

The decoder has the MedCoSS MAE shape (``decoder_embed`` 768->512, ``mask_token``, a learned
``decoder_pos_embed_2D`` for 196 patches + class token, 8 timm blocks of width 512 with 16 heads, ``decoder_norm``,
``decoder_pred_2D`` 512->16*16*3) and the MedCoSS parameter names, so it is inherited from the MedCoSS pre-training
checkpoint. The paper freezes the inherited decoder for classification datasets and updates it for segmentation
datasets (§5.5); ``random`` trains a freshly initialised one.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from tpp_monai.backbones.checkpoint import load_into
from tpp_monai.backbones.vit import TimmBlock, ViTBase, run_block
from tpp_monai.errors import ConfigError

DECODER_MODES = ("random", "freeze", "update")


def patchify(images: Tensor, patch: int) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, N, p*p*C]`` in raster patch order, pixels ordered (row, col, channel) as MedCoSS."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def random_masking(batch: int, num_patches: int, mask_ratio: float, device: torch.device) -> tuple[Tensor, ...]:
    """Per-sample random masking by argsort of noise (MAE). Returns ``keep_idx [B, n]``, ``ids_restore [B, N]`` and
    ``mask [B, N]`` (1 = masked)."""
    keep = int(num_patches * (1 - mask_ratio))
    if not 0 < keep < num_patches:
        raise ConfigError(f"mask_ratio {mask_ratio} leaves {keep} of {num_patches} patches visible; use 0 < ratio < 1")
    noise = torch.rand(batch, num_patches, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :keep] = 0
    return ids_shuffle[:, :keep], ids_restore, torch.gather(mask, 1, ids_restore)


def sincos_2d(dim: int, grid: int) -> Tensor:
    """MAE's 2D sine-cosine position table ``[grid * grid, dim]`` (half the channels for rows, half for columns).

    A decoder whose position table starts at zeros, as MedCoSS's, sees every mask token alike until that table
    has been learnt; this start gives the hidden positions distinct queries from the first step. (It did not move the
    demo's flat TPP loss: there the hidden patches' normalised pixels are not predicted at the demo's budget, see
    ``tpp_monai.data.demo``.)
    """
    if dim % 4:
        raise ConfigError(f"MAE decoder width {dim} must be a multiple of 4 for the 2D sin-cos position table")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")  # fmt: skip
    parts = [f(pos.reshape(-1, 1) * omega) for pos in (rows, cols) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1).float()


class MAEDecoder(nn.Module):
    """The MedCoSS MAE decoder (2D path), with its checkpoint parameter names."""

    activation_checkpointing: bool = False  # see tpp_monai.backbones.vit.set_activation_checkpointing

    def __init__(
        self, embed_dim: int, num_patches: int, dim: int = 512, depth: int = 8, heads: int = 16, patch: int = 16,
        in_chans: int = 3,
    ) -> None:  # fmt: skip
        super().__init__()
        self.num_patches = num_patches
        self.decoder_embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_pos_embed_2D = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.decoder_blocks = nn.ModuleList(TimmBlock(dim, heads, 4 * dim) for _ in range(depth))
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_pred_2D = nn.Linear(dim, patch * patch * in_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        with torch.no_grad():  # MAE's fixed 2D sin-cos table as the start of MedCoSS's learned one (zeros there)
            self.decoder_pos_embed_2D[0, 1:] = sincos_2d(dim, round(num_patches**0.5))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def load_inherited(self, tensors: Mapping[str, Tensor], source: str = "the backbone checkpoint") -> None:
        """Copy the decoder tensors of a MedCoSS pre-training checkpoint (kept by ``build_network``)."""
        state = {k: v for k, v in tensors.items() if k != "cls_token"}
        if not state:
            raise ConfigError(
                f"{source} holds no MAE decoder to inherit; use mae_decoder 'random' (trains a new decoder), or pass "
                "the MedCoSS pre-training checkpoint (checkpoint-299.pth), which holds one"
            )
        pos = state.get("decoder_pos_embed_2D")
        if pos is not None and pos.shape[1] != self.num_patches + 1:
            raise ConfigError(
                f"the inherited MAE decoder was trained for {pos.shape[1] - 1} patches but the pretext images give "
                f"{self.num_patches}; set the pretext image size to 224x224 (14x14 patches) as MedCoSS did"
            )
        load_into(self, state, [k for k, _ in self.named_parameters()], {}, path=source)

    def forward(self, tokens: Tensor, ids_restore: Tensor) -> Tensor:
        """``tokens [B, 1 + n, D]`` (class token + visible patches, shuffled order) -> ``[B, N, p*p*C]``."""
        x = self.decoder_embed(tokens)
        b, n = x.shape[0], ids_restore.shape[1]
        mask_tokens = self.mask_token.expand(b, n + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # unshuffle
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed_2D
        ckpt = self.activation_checkpointing and self.training
        for block in self.decoder_blocks:
            x = run_block(block, x, ckpt)
        return self.decoder_pred_2D(self.decoder_norm(x))[:, 1:]


class MAEPretext(nn.Module):
    """Encoder (backbone + PEFT, task ``features``) + MAE decoder. ``forward(images) -> (pred, mask)``.

    Args:
        encoder: a backbone built with ``task="features"`` (it prepends its class token, as MedCoSS's MAE does).
        decoder_mode: ``"freeze"``/``"update"`` inherit the decoder from ``encoder.mae_checkpoint``; ``"random"``
            trains a new one.
        image_size: pretext input size (square, a multiple of the patch size).
        mask_ratio: fraction of patches hidden from the encoder (0.75).
        decoder: ``dim``, ``depth``, ``heads`` of the decoder (the backbone spec's ``mae_decoder``).
    """

    def __init__(
        self, encoder: ViTBase, decoder_mode: str, image_size: int, mask_ratio: float = 0.75,
        decoder: Mapping | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        if decoder_mode not in DECODER_MODES:
            raise ConfigError(f"unknown mae_decoder {decoder_mode!r}; valid: {', '.join(DECODER_MODES)}")
        if image_size % encoder.patch_size:
            raise ConfigError(f"MAE image size {image_size} is not a multiple of the patch size {encoder.patch_size}")
        self.encoder = encoder
        self.patch = encoder.patch_size
        self.mask_ratio = mask_ratio
        self.decoder_mode = decoder_mode
        geometry = {"dim": 512, "depth": 8, "heads": 16, **dict(decoder or {})}
        num_patches = (image_size // self.patch) ** 2
        self.decoder = MAEDecoder(encoder.embed_dim, num_patches, patch=self.patch, in_chans=encoder.in_chans,
                                  **geometry)  # fmt: skip
        if decoder_mode != "random":
            self.decoder.load_inherited(getattr(encoder, "mae_checkpoint", {}))
        self.decoder.requires_grad_(decoder_mode != "freeze")

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        b = images.shape[0]
        n = (images.shape[-2] // self.patch) * (images.shape[-1] // self.patch)
        keep, ids_restore, mask = random_masking(b, n, self.mask_ratio, images.device)
        tokens = self.encoder.forward_features(images, keep_idx=keep, with_prefix=True).tokens
        return self.decoder(tokens, ids_restore), mask

    def pretext_state_names(self) -> list[str]:
        """Tensors besides the target parameters that a resume needs: the decoder when it is trained."""
        if self.decoder_mode == "freeze":
            return []
        return [f"decoder.{n}" for n, _ in self.decoder.named_parameters()]


class MaskedPatchLoss(nn.Module):
    """MSE on the masked patches; targets normalised per patch by their mean and variance (``norm_pix_loss``)."""

    def __init__(self, patch: int, norm_pix: bool = True) -> None:
        super().__init__()
        self.patch = patch
        self.norm_pix = norm_pix

    def forward(self, output: tuple[Tensor, Tensor], images: Tensor) -> Tensor:
        pred, mask = output
        target = patchify(images, self.patch)
        if self.norm_pix:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred.float() - target.float()) ** 2).mean(dim=-1)  # [B, N], per patch
        return (loss * mask).sum() / mask.sum()
