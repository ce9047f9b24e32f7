"""Explicit Visual Prompting (Liu et al. 2023), ViT variant.

Per-patch prompts built from two frozen-backbone-independent features: a linear "embedding tune" of the raw patch
projection (the patch conv's output, before position embeddings and MedCoSS's tokenizer LayerNorm, as official EVP's
``init_embeddings(self.patch_embed(x))``) and a new patch embedding of the image's high-frequency component (FFT,
zero a centred low-frequency square of side ``2*floor(sqrt(H*W*freq_nums)/2)``, inverse FFT, magnitude). Block i
adds ``shared_up(mlp_i(F_pe + F_hfc))`` to the patch tokens. The Ratio column fits scale factor 4 (``methods.md`` §2.8).

Under MAE masking the prompts are gathered with the same kept indices as the tokens, and the high-frequency
component is computed on the image with the masked patches zeroed, so no masked content leaks into the encoder.
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
class EVPConfig:
    """Args:
    scale_factor: prompt width is embed_dim // scale_factor (4).
    freq_nums: fraction of the spectrum treated as low frequency and removed (0.25).
    """

    scale_factor: int = 4
    freq_nums: float = 0.25


def high_frequency(image: Tensor, freq_nums: float) -> Tensor:
    """|iFFT(FFT(image) with the centred low-frequency square zeroed)|, per channel (EVP's ``fft`` helper)."""
    h, w = image.shape[-2:]
    spectrum = torch.fft.fftshift(torch.fft.fft2(image.float(), norm="forward"), dim=(-2, -1))
    half = int(math.sqrt(h * w * freq_nums) // 2)
    mask = torch.ones(h, w, device=image.device)
    mask[h // 2 - half : h // 2 + half, w // 2 - half : w // 2 + half] = 0
    spectrum = torch.fft.ifftshift(spectrum * mask, dim=(-2, -1))
    return torch.fft.ifft2(spectrum, norm="forward").real.abs().to(image.dtype)


def _zero_masked_patches(image: Tensor, layout: TokenLayout, patch: int) -> Tensor:
    if layout.keep_idx is None:
        return image
    b = image.shape[0]
    gh, gw = layout.grid
    visible = image.new_zeros(b, gh * gw)
    visible.scatter_(1, layout.keep_idx, 1.0)
    visible = (
        visible.view(b, 1, gh, 1, gw, 1).expand(-1, -1, -1, patch, -1, patch).reshape(b, 1, gh * patch, gw * patch)
    )
    return image * visible


class ExplicitPrompts(EncoderTuner):
    def __init__(self, dim: int, depth: int, in_chans: int, patch: int, cfg: EVPConfig) -> None:
        super().__init__()
        if cfg.scale_factor < 1 or dim % cfg.scale_factor:
            raise ConfigError(f"EVP scale_factor must divide embed_dim {dim}, got {cfg.scale_factor}")
        hidden = dim // cfg.scale_factor
        self.patch = patch
        self.freq_nums = cfg.freq_nums
        self.shared_mlp = nn.Linear(hidden, dim)
        self.embedding_generator = nn.Linear(dim, hidden)
        self.lightweight_mlp = nn.ModuleList(nn.Sequential(nn.Linear(hidden, hidden), nn.GELU()) for _ in range(depth))
        self.prompt_generator = nn.Conv2d(in_chans, hidden, kernel_size=patch, stride=patch)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        fan_out = patch * patch * hidden
        nn.init.normal_(self.prompt_generator.weight, 0.0, math.sqrt(2.0 / fan_out))
        nn.init.zeros_(self.prompt_generator.bias)

    def begin(self, x: Tensor, layout: TokenLayout) -> Tensor:
        hfc = high_frequency(_zero_masked_patches(layout.image, layout, self.patch), self.freq_nums)
        hfc_tokens = self.prompt_generator(hfc).flatten(2).transpose(1, 2)  # [B, N, hidden], all patches
        embedding = self.embedding_generator(layout.gather_patches(layout.patch_embedding))  # visible patches
        features = embedding + layout.gather_patches(hfc_tokens)
        layout.cache["evp"] = features
        return x

    def before_block(self, index: int, x: Tensor, layout: TokenLayout) -> Tensor:
        prompt = self.shared_mlp(self.lightweight_mlp[index](layout.cache["evp"]))
        start = layout.patch_start
        return torch.cat([x[:, :start], x[:, start:] + prompt], dim=1)


def inject(model: nn.Module, cfg: EVPConfig) -> EVPConfig:
    model.peft_encoder = ExplicitPrompts(model.embed_dim, model.depth, model.in_chans, model.patch_size, cfg)
    return cfg


SPEC = register_added(
    "evp",
    EVPConfig,
    inject,
    identity_at_init=False,
    summary="EVP: explicit per-patch prompts from patch features and high frequencies (scale factor 4)",
)
