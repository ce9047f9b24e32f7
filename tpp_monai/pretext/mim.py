"""TPP with masked-image modelling for backbones that cannot drop tokens (Swin, CNNs), after SimMIM (Xie et al.,
CVPR 2022, ``microsoft/SimMIM`` ``models/simmim.py``), in 2D and 3D.

* Masking at the input: the image is split into cells of ``mask_patch`` pixels (SimMIM: 32 at 192-224 px; here
  16 voxels per axis in 3D), ``ceil(mask_ratio * cells)`` of them per image are chosen at random (SimMIM's
  ``MaskGenerator``, ratio 0.6), and their pixels are replaced by a learnable mask value: one learned patch of the
  backbone's stride, tiled over the masked cells. On a ViT the patch embedding turns that patch into one learned
  token, which is SimMIM's ``mask_token`` (inserted there after the patch embedding); on a CNN with stride 1 it is a
  learned value per channel. The backbone sees every position, masked or not, so any ``feature:dense`` backbone
  feeds it.
* A light decoder, as SimMIM's: a 1x1 convolution from the dense feature map (``dense_features``, stride
  ``interface().patch_size``) to ``stride * in_channels`` channels and a pixel shuffle back to the input resolution.
* The loss: L1 between the reconstruction and the input on the masked pixels only, divided by the channel count
  (SimMIM's ``loss_recon``); the gradients' global norm is clipped at 5 (SimMIM's ``TRAIN.CLIP_GRAD``).

The mask value and the decoder are the pretext's own tensors (trained, saved for resume, discarded afterwards); the
backbone's target parameters are what the stage exports.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tpp_monai.errors import ConfigError
from tpp_monai.pretext.mae import as_size

#: SimMIM's mask cell in 2D (``DATA.MASK_PATCH_SIZE``) and this project's in 3D, per axis, in pixels / voxels.
DEFAULT_MASK_PATCH = {2: 32, 3: 16}
# mask_patch None: DEFAULT_MASK_PATCH, rounded up to the stride; clip_grad: SimMIM's global gradient-norm clipping
# (TRAIN.CLIP_GRAD 5.0), 0 = none
MIM_DEFAULTS = {"mask_patch": None, "mask_ratio": 0.6, "clip_grad": 5.0}


def mim_options(options: Mapping | None) -> dict:
    """The MIM options with their defaults; an unknown key is refused."""
    from tpp_monai.errors import unknown_choice

    options = dict(options or {})
    unknown = set(options) - set(MIM_DEFAULTS)
    if unknown:
        raise unknown_choice("MIM option", sorted(unknown)[0], MIM_DEFAULTS, "mim")
    out = {**MIM_DEFAULTS, **options}
    if not 0 < float(out["mask_ratio"]) < 1:
        raise ConfigError(f"mim mask_ratio {out['mask_ratio']!r} must lie strictly between 0 and 1 (SimMIM: 0.6)")
    return out


def mask_geometry(
    size: Sequence[int], stride: Sequence[int], mask_patch: int | Sequence[int] | None, mask_ratio: float
) -> tuple[tuple[int, ...], int]:
    """``(mask_patch per axis, masked cells per image)`` for an input of ``size``, or a :class:`ConfigError` saying
    which value does not fit: cells must be multiples of the backbone's stride and tile the input exactly."""
    dims = len(size)
    if mask_patch is None:
        cell = tuple(math.ceil(DEFAULT_MASK_PATCH[dims] / s) * s for s in stride)
    else:
        cell = as_size(mask_patch, dims, "mim mask_patch")
    if any(c % s for c, s in zip(cell, stride)):
        raise ConfigError(f"mim mask_patch {list(cell)} is not a multiple of the backbone's stride {list(stride)} "
                          "(dense features are one value per stride cell)")  # fmt: skip
    if any(n % c for n, c in zip(size, cell)):
        fixed = [max(c, round(n / c) * c) for n, c in zip(size, cell)]
        raise ConfigError(f"the MIM input size {list(size)} is not a multiple of the mask cell {list(cell)}; use a "
                          f"pretext size of multiples of it (e.g. {fixed}) or another mim mask_patch")  # fmt: skip
    cells = math.prod(n // c for n, c in zip(size, cell))
    count = math.ceil(cells * float(mask_ratio))  # SimMIM's MaskGenerator rounds up
    if not 0 < count < cells:
        raise ConfigError(f"mim mask_ratio {mask_ratio} masks {count} of {cells} cells of {list(cell)} in a "
                          f"{list(size)} input; use a smaller mask_patch or another ratio (some cells must stay "
                          "visible and some masked)")  # fmt: skip
    return cell, count


def pixel_shuffle(x: Tensor, factors: Sequence[int]) -> Tensor:
    """``[B, C * prod(r), *g] -> [B, C, *(g * r)]`` with one factor per axis (torch's ``pixel_shuffle`` channel
    order: channel ``c * prod(r) + offset``, offsets in raster order). ``torch.nn.PixelShuffle`` is 2D only and MONAI's
    ``pixelshuffle`` takes one factor for every axis; backbone strides differ per axis (STU-Net's (16, 16, 32))."""
    factors = [int(f) for f in factors]
    b, channels, *grid = x.shape
    d, r = len(grid), math.prod(factors)
    if channels % r:
        raise ValueError(f"{channels} channels do not split into factors {factors}")
    x = x.reshape(b, channels // r, *factors, *grid)
    x = x.permute(0, 1, *(v for i in range(d) for v in (2 + d + i, 2 + i)))  # b, c, g1, r1, g2, r2, ...
    return x.reshape(b, channels // r, *(g * f for g, f in zip(grid, factors)))


def _upsample_cells(mask: Tensor, cell: Sequence[int]) -> Tensor:
    for axis, c in enumerate(cell):
        mask = mask.repeat_interleave(int(c), dim=2 + axis)
    return mask


def random_cell_mask(batch: int, cells: Sequence[int], count: int, device: torch.device) -> Tensor:
    """``[B, 1, *cells]`` float mask with exactly ``count`` ones per sample, at random (argsort of noise)."""
    n = math.prod(cells)
    chosen = torch.argsort(torch.rand(batch, n, device=device), dim=1)[:, :count]
    mask = torch.zeros(batch, n, device=device).scatter_(1, chosen, 1.0)
    return mask.reshape(batch, 1, *cells)


def probe_dense(encoder: nn.Module, size: Sequence[int]) -> tuple[int, tuple[int, ...]]:
    """``(channels, grid)`` of ``encoder.dense_features`` at ``size``: the backbone's ``dense_feature_dim()`` where it
    has one, else one forward of a zero image (evaluation mode, no gradient, random state restored)."""
    iface = encoder.interface()
    grid = tuple(n // s for n, s in zip(size, iface.patch_size))
    if hasattr(encoder, "dense_feature_dim"):
        return int(encoder.dense_feature_dim()), grid
    was_training = encoder.training
    device = next(encoder.parameters()).device
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        encoder.eval()
        try:
            out = encoder.dense_features(torch.zeros(1, iface.in_channels, *size, device=device))
        finally:
            encoder.train(was_training)
    if tuple(out.shape[2:]) != grid:
        raise ConfigError(f"{type(encoder).__name__}.dense_features gave a {list(out.shape[2:])} map for a "
                          f"{list(size)} input, not {list(grid)} at its stride {list(iface.patch_size)}")  # fmt: skip
    return int(out.shape[1]), grid


class MIMPretext(nn.Module):
    """Encoder (backbone + PEFT, task ``features``) + mask value + light decoder. ``forward(images) -> (rec, mask)``
    with ``rec`` the reconstruction ``[B, C, *S]`` and ``mask`` ``[B, 1, *S]`` (1 = masked pixel).

    Args:
        encoder: a backbone with ``feature:dense``.
        image_size: pretext input size, an int (square / cube) or one per axis.
        mask_patch: mask cell per axis (int or one per axis), a multiple of the backbone's stride; ``None``: 32 in 2D
            (SimMIM), 16 in 3D, rounded up to the stride.
        mask_ratio: fraction of cells masked (SimMIM: 0.6).
    """

    def __init__(
        self, encoder: nn.Module, image_size: int | Sequence[int], mask_patch: int | Sequence[int] | None = None,
        mask_ratio: float = 0.6,
    ) -> None:  # fmt: skip
        super().__init__()
        iface = encoder.interface()
        size = as_size(image_size, iface.spatial_dims, "MIM image size")
        self.stride = tuple(int(s) for s in iface.patch_size)
        if any(n % s for n, s in zip(size, self.stride)):
            raise ConfigError(f"MIM image size {list(size)} is not a multiple of the backbone's stride "
                              f"{list(self.stride)}")  # fmt: skip
        self.cell, self.count = mask_geometry(size, self.stride, mask_patch, mask_ratio)
        self.encoder = encoder
        self.in_channels = iface.in_channels
        channels, _ = probe_dense(encoder, size)
        conv = nn.Conv2d if iface.spatial_dims == 2 else nn.Conv3d
        # the learnable mask value: one patch of the stride, tiled over the masked cells (zeros: the mean intensity
        # of z-scored inputs)
        self.mask_token = nn.Parameter(torch.zeros(1, self.in_channels, *self.stride))
        self.decoder = conv(channels, math.prod(self.stride) * self.in_channels, kernel_size=1)

    def mask(self, images: Tensor) -> Tensor:
        """A random pixel mask ``[B, 1, *S]`` for ``images``."""
        cells = [n // c for n, c in zip(images.shape[2:], self.cell)]
        return _upsample_cells(random_cell_mask(images.shape[0], cells, self.count, images.device), self.cell)

    def masked_input(self, images: Tensor, mask: Tensor) -> Tensor:
        """``images`` with the masked pixels replaced by the tiled mask value."""
        tiles = [n // s for n, s in zip(images.shape[2:], self.stride)]
        fill = self.mask_token.to(images.dtype).repeat(1, 1, *tiles)
        return images * (1 - mask) + fill * mask

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        mask = self.mask(images)
        features = self.encoder.dense_features(self.masked_input(images, mask))
        rec = pixel_shuffle(self.decoder(features), self.stride)
        if rec.shape[2:] != images.shape[2:]:
            raise ConfigError(f"MIM reconstruction of size {list(rec.shape[2:])} for an input of "
                              f"{list(images.shape[2:])}: the backbone's dense features are not at its stride "
                              f"{list(self.stride)}")  # fmt: skip
        return rec, mask

    def pretext_state_names(self) -> list[str]:
        """Tensors besides the target parameters that a resume needs: the mask value and the decoder."""
        return ["mask_token", *(f"decoder.{n}" for n, _ in self.decoder.named_parameters())]


class MaskedPixelLoss(nn.Module):
    """SimMIM's loss: L1 on the masked pixels only, ``sum(|x - rec| * mask) / (sum(mask) + 1e-5) / channels``."""

    def forward(self, output: tuple[Tensor, Tensor], images: Tensor) -> Tensor:
        rec, mask = output
        l1 = F.l1_loss(rec.float(), images.float(), reduction="none")
        return (l1 * mask).sum() / (mask.sum() + 1e-5) / images.shape[1]
