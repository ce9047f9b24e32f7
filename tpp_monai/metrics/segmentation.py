"""Binary (2D or n-D) segmentation Dice and medpy-style HD95 per image, averaged over images, as MedCoSS
``Downstream/Dim_2/Glas/evaluate.py`` and ``QaTa_CoV19/evaluate.py`` compute them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from monai.handlers import IgniteMetricHandler
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure

from tpp_monai.metrics.base import ArrayLike, _check_key, _default_transform, _np, _PerItemMetric

#: HD95 when exactly one of prediction and ground truth is empty (MedCoSS Glas/QaTa ``evaluate.py``).
HD95_ONE_EMPTY = 500.0

SEGMENTATION_KEYS = ("dice", "hd95")


def _mask(x: ArrayLike) -> np.ndarray:
    return _np(x).astype(bool)


def dice_score(pred: ArrayLike, gt: ArrayLike) -> float:
    """Binary Dice 2|P∩G| / (|P| + |G|); 1.0 when both are empty (MedCoSS Glas/QaTa ``evaluate.py``)."""
    p, g = _mask(pred), _mask(gt)
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} differs from ground-truth shape {g.shape}")
    denom = int(p.sum()) + int(g.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, g).sum()) / denom


def _crop_to_union(p: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Everything outside the bounding box of P ∪ G is background, and binary_erosion treats outside-the-array as
    # background too (border_value=0), so cropping to that box changes neither the surfaces nor the distances between
    # them; it only makes the EDT cost scale with the objects instead of the whole (3D) image.
    coords = np.nonzero(p | g)
    sl = tuple(slice(int(c.min()), int(c.max()) + 1) for c in coords)
    return p[sl], g[sl]


def _surface(mask: np.ndarray) -> np.ndarray:
    # medpy: surface = mask XOR (mask eroded once with the connectivity-1 structuring element)
    return mask ^ binary_erosion(mask, structure=generate_binary_structure(mask.ndim, 1), iterations=1)


def hd95(pred: ArrayLike, gt: ArrayLike, spacing: float | Sequence[float] | None = None) -> float:
    """95th percentile Hausdorff distance exactly as ``medpy.metric.hd95(pred, gt, voxelspacing=spacing)``.

    The 95th percentile (numpy linear interpolation) of the concatenation of both directed surface-distance sets,
    in voxels when ``spacing`` is None. Edge cases of MedCoSS Glas/QaTa ``evaluate.py``: exactly one of P and G
    empty -> 500, both empty -> 0.

    MONAI's ``HausdorffDistanceMetric(percentile=95)`` is not used: it returns the maximum of the two *directed*
    95th percentiles, which is not medpy's percentile of the union (e.g. 8.55 vs 8.5 for a pixel at the end of a
    10-pixel line), and it returns NaN/inf rather than 500/0 for empty masks.
    """
    p, g = _mask(pred), _mask(gt)
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} differs from ground-truth shape {g.shape}")
    p_any, g_any = bool(p.any()), bool(g.any())
    if not p_any and not g_any:
        return 0.0
    if p_any != g_any:
        return HD95_ONE_EMPTY
    p, g = _crop_to_union(p, g)
    sp, sg = _surface(p), _surface(g)
    d_pg = distance_transform_edt(~sg, sampling=spacing)[sp]
    d_gp = distance_transform_edt(~sp, sampling=spacing)[sg]
    return float(np.percentile(np.concatenate([d_pg, d_gp]), 95))


def segmentation_metrics(
    preds: Sequence[ArrayLike], gts: Sequence[ArrayLike], spacing: float | Sequence[float] | None = None
) -> dict[str, Any]:
    """Mean over images (not pooled) of per-image Dice and HD95 of binary masks.

    Returns ``{"dice": float, "hd95": float, "per_image": [{"index", "dice", "hd95"}, ...]}``.
    """
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predictions but {len(gts)} ground truths")
    if len(preds) == 0:
        raise ValueError("segmentation_metrics needs at least one image")
    rows = [
        {"index": i, "dice": dice_score(p, g), "hd95": hd95(p, g, spacing)} for i, (p, g) in enumerate(zip(preds, gts))
    ]
    return {
        "dice": float(np.mean([r["dice"] for r in rows])),
        "hd95": float(np.mean([r["hd95"] for r in rows])),
        "per_image": rows,
    }


def _foreground(x: torch.Tensor) -> np.ndarray:
    """[B, C, *spatial] -> bool [B, *spatial]: C == 1 is thresholded at 0.5 (MedCoSS rounds), C > 1 uses argmax > 0."""
    if x.shape[1] == 1:
        return (x[:, 0] > 0.5).cpu().numpy()
    return (x.argmax(dim=1) > 0).cpu().numpy()


class SegmentationMetric(_PerItemMetric):
    """Cumulative per-image Dice and/or HD95 of binary masks, averaged over images (:func:`segmentation_metrics`).

    Items are channel-first: [1, *spatial] masks or sigmoid probabilities (foreground > 0.5), or [C >= 2, *spatial]
    one-hot/softmax (foreground = argmax > 0). Only ``key`` is computed per image ("dice" or "hd95"), so HD95 costs
    nothing unless asked for; ``key=None`` computes both and ``aggregate()`` returns ``{"dice", "hd95"}``.
    """

    def __init__(self, key: str | None = "dice", spacing: float | Sequence[float] | None = None) -> None:
        _check_key(key, SEGMENTATION_KEYS)
        self.spacing = spacing
        self.columns = SEGMENTATION_KEYS if key is None else (key,)
        super().__init__(key)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        preds, gts = _foreground(y_pred), _foreground(y)  # type: ignore[arg-type]
        fns: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
            "dice": dice_score,
            "hd95": lambda p, g: hd95(p, g, self.spacing),
        }
        values = [[fns[c](p, g) for c in self.columns] for p, g in zip(preds, gts)]
        return torch.tensor(values, dtype=torch.float64)


class SegMetricHandler(IgniteMetricHandler):
    """Ignite handler for the per-image-mean "dice" or "hd95" of binary masks (MedCoSS Glas/QaTa ``evaluate.py``).

    Only the chosen metric is computed, so attach an "hd95" handler only where HD95 is wanted. With ``save_details``
    the per-image values land in ``engine.state.metric_details[name]`` ([N, 1]) for ``MetricsSaver``.
    """

    def __init__(
        self,
        key: str = "dice",
        output_transform: Callable | None = None,
        spacing: float | Sequence[float] | None = None,
        save_details: bool = True,
    ) -> None:
        _check_key(key, SEGMENTATION_KEYS, allow_none=False)
        super().__init__(
            metric_fn=SegmentationMetric(key=key, spacing=spacing),
            output_transform=_default_transform(output_transform),
            save_details=save_details,
        )
