"""Inference for 2D segmentation as the paper's framework does it (MedCoSS ``Glas/evaluate.py``, ``methods.md`` §6.2).

Sliding window with the training patch as tile and 50 % overlap, Gaussian importance weighting (sigma = 1/4 of the
tile; MONAI's ``sigma_scale``), images smaller than the tile padded with -1, sigmoid probabilities, and for GlaS
the average over the identity, vertical, horizontal and both flips.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer, SlidingWindowInferer
from torch import Tensor

from tpp_monai.engines import plain_tensor


class PlainInferer(Inferer):
    """``network(inputs)`` on a plain tensor, the output carrying the input's metadata (for savers and metrics)."""

    def __call__(self, inputs: Tensor, network: Callable[..., Tensor], *args: object, **kwargs: object) -> Tensor:
        out = network(plain_tensor(inputs), *args, **kwargs)
        return _with_meta(out, inputs)


def _with_meta(out: Tensor, like: Tensor) -> Tensor:
    if isinstance(like, MetaTensor) and not isinstance(out, MetaTensor):
        out = MetaTensor(out, meta=like.meta, applied_operations=like.applied_operations)
    return out


class SegmentationInferer(Inferer):
    """Sliding-window sigmoid probabilities, optionally averaged over flips.

    Args:
        roi_size: tile size (the training patch).
        overlap: tile overlap (0.5).
        flips: spatial-axis tuples to flip (axes of the ``[B, C, H, W]`` input, e.g. ``[(2,), (3,), (2, 3)]``);
            the unflipped pass is always included.
        sw_batch_size: tiles per forward pass.
    """

    def __init__(
        self, roi_size: Sequence[int], overlap: float = 0.5, flips: Sequence[Sequence[int]] = (), sw_batch_size: int = 4
    ) -> None:
        super().__init__()
        self.window = SlidingWindowInferer(
            roi_size=tuple(roi_size), sw_batch_size=sw_batch_size, overlap=overlap, mode="gaussian",
            sigma_scale=0.25, padding_mode="constant", cval=-1.0,
        )  # fmt: skip
        self.flips = [tuple(f) for f in flips]

    def __call__(self, inputs: Tensor, network: Callable[..., Tensor], *args: object, **kwargs: object) -> Tensor:
        x = plain_tensor(inputs)
        prob = torch.sigmoid(self.window(x, network, *args, **kwargs))
        for axes in self.flips:
            flipped = self.window(torch.flip(x, axes), network, *args, **kwargs)
            prob = prob + torch.flip(torch.sigmoid(flipped), axes)
        return _with_meta(prob / (1 + len(self.flips)), inputs)
