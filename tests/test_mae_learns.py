"""The MAE pretext learns where the hidden patches are predictable from the visible ones: a guard against bugs
that keep the visible content from the prediction (or the target from the loss), which leave the loss at the ~1.0
of predicting each hidden patch's mean (the level the demo's TPP stage stays at)."""

from __future__ import annotations

import math

import torch

from tpp_monai.backbones import build_backbone, get_backbone_spec
from tpp_monai.pretext.mae import MAEPretext, MaskedPatchLoss, patchify


def ramp_images(batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Grey linear ramps with a random direction and contrast per image: every patch, normalised per patch, is the
    same ramp, so the visible patch determines all hidden ones exactly."""
    angle = torch.rand(batch, generator=generator) * 2 * math.pi
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    ramp = torch.cos(angle)[:, None, None] * xx + torch.sin(angle)[:, None, None] * yy
    contrast = torch.rand(batch, 1, 1, 1, generator=generator) + 0.5
    return ramp[:, None].expand(-1, 3, -1, -1) * contrast


def test_mae_with_all_parameters_learns_ramp_images() -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    encoder = build_backbone("medcoss_vit_tiny", task="features")
    net = MAEPretext(encoder, "random", 32, decoder=get_backbone_spec("medcoss_vit_tiny").mae_decoder)
    net.requires_grad_(True)
    loss_fn = MaskedPatchLoss(encoder.patch_size)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    # predicting each hidden patch's mean (zeros after norm_pix) scores 1 - 1/(values per patch), computed here
    mean_level = 1 - 1 / patchify(ramp_images(1, 32, generator), encoder.patch_size).shape[-1]
    losses = []
    for _ in range(200):
        images = ramp_images(16, 32, generator)
        loss = loss_fn(net(images), images)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    first, last = sum(losses[:10]) / 10, sum(losses[-20:]) / 20
    assert first > 0.9 * mean_level, f"an untrained MAE should start near the patch-mean level, got {first:.3f}"
    assert last < 0.3 * mean_level, f"MAE loss {first:.3f} -> {last:.3f}: hidden ramp patches are predictable"
