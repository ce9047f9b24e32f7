"""Evaluation metrics with the conventions of the MedCoSS fine-tuning framework that TPP follows.

Conventions (MedCoSS's evaluation code and STU-Net's nnU-Net evaluation):

* Classification (MedCoSS ``Downstream/Dim_2/Chest_XR/main.py``, ``NCT_CRC_HE/main.py``): ACC = overall accuracy of
  the argmax; AUC = ``roc_auc_score(y, softmax_probs, average="macro", multi_class="ovo")``, for a binary task the
  positive-class column; F1 = ``f1_score(y, argmax, average="macro")``; checkpoint selection by ACC + AUC + F1.
* 2D segmentation (MedCoSS ``Downstream/Dim_2/Glas/evaluate.py``, ``QaTa_CoV19/evaluate.py``): per-image binary Dice
  (1 when prediction and ground truth are both empty) and per-image ``medpy.metric.hd95`` in pixel units (500 when
  exactly one is empty, 0 when both are), both averaged over images, not pooled.
* 3D organ/tumour (LiTS, KiTS19): organ = label >= 1 (organ including tumour), tumour = label == 2,
  mean = (organ + tumour) / 2, per case then averaged over cases, Dice 1 for empty/empty; the label == 1 organ
  Dice (UniSeg's reading) is reported alongside as ``organ_label1``.

Plain functions return fractions (0..1) except HD95 (pixels, or the units of ``spacing``); :func:`as_percent`
converts for reporting. The ``*Metric`` classes are MONAI cumulative metrics fed with what a MONAI evaluator
delivers after decollation (lists of channel-first tensors); the ``*Handler`` classes wrap them as
``IgniteMetricHandler`` for ``key_val_metric`` / ``additional_metrics`` in bundle configs, e.g.::

    "key_val_metric": {"val_score": {"_target_": "tpp_monai.metrics.ClassificationMetricHandler", "key": "score"}}
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.handlers import IgniteMetricHandler, from_engine
from monai.metrics import CumulativeIterationMetric
from monai.utils import convert_to_tensor
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure
from sklearn.metrics import f1_score, roc_auc_score

__all__ = [
    "HD95_ONE_EMPTY",
    "ClassificationMetric",
    "ClassificationMetricHandler",
    "OrganTumourHandler",
    "OrganTumourMetric",
    "SegMetricHandler",
    "SegmentationMetric",
    "as_percent",
    "classification_metrics",
    "dice_score",
    "hd95",
    "merge_per_item",
    "model_selection_score",
    "organ_tumour_dice",
    "organ_tumour_metrics",
    "segmentation_metrics",
]

ArrayLike = np.ndarray | torch.Tensor | Sequence

#: HD95 when exactly one of prediction and ground truth is empty (MedCoSS Glas/QaTa ``evaluate.py``).
HD95_ONE_EMPTY = 500.0

CLASSIFICATION_KEYS = ("acc", "auc", "f1", "score")
SEGMENTATION_KEYS = ("dice", "hd95")
ORGAN_TUMOUR_KEYS = ("organ", "tumour", "mean", "organ_label1")


def _np(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _check_key(key: str | None, allowed: Sequence[str], allow_none: bool = True) -> None:
    if key is None and allow_none:
        return
    if key not in allowed:
        raise ValueError(f"unknown metric key {key!r}; valid keys: {', '.join(allowed)}")


# ---------------------------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------------------------


def _prob_matrix(probs: ArrayLike) -> np.ndarray:
    p = _np(probs).astype(np.float64)
    if p.ndim == 1 or (p.ndim == 2 and p.shape[1] == 1):
        # a single sigmoid output is P(positive); expand to the two-column softmax layout used everywhere else
        p = p.reshape(-1)
        p = np.stack([1.0 - p, p], axis=1)
    if p.ndim != 2:
        raise ValueError(f"probs must have shape [N, C] (or [N] for one sigmoid output), got {p.shape}")
    return p


def _label_vector(labels: ArrayLike, num_classes: int) -> np.ndarray:
    y = _np(labels)
    if y.ndim == 2 and y.shape[1] == num_classes and num_classes > 1:
        y = y.argmax(axis=1)  # one-hot labels
    y = y.reshape(-1)
    if not np.all(np.equal(np.mod(y, 1), 0)):
        raise ValueError("labels must be integer class indices (or one-hot rows)")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes - 1}] for {num_classes} probability columns")
    return y


def classification_metrics(probs: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """ACC, AUC and macro F1 as fractions, as MedCoSS ``Chest_XR/main.py`` / ``NCT_CRC_HE/main.py`` compute them.

    ``probs``: [N, C] softmax probabilities (or [N] / [N, 1] sigmoid positive-class probabilities); ``labels``:
    [N] class indices or [N, C] one-hot. AUC is ``roc_auc_score(average="macro", multi_class="ovo")`` for C > 2 and
    the positive-class column (1) for C == 2. When fewer classes occur in ``labels`` than there are columns the AUC is
    undefined (sklearn raises); it is returned as NaN with a warning instead.
    """
    p = _prob_matrix(probs)
    n, c = p.shape
    y = _label_vector(labels, c)
    if y.shape[0] != n:
        raise ValueError(f"{n} probability rows but {y.shape[0]} labels")
    if n == 0:
        raise ValueError("classification_metrics needs at least one sample")
    pred = p.argmax(axis=1)  # ties go to the lowest class index, as with torch.argmax/np.argmax in MedCoSS
    acc = float(np.mean(pred == y))
    # zero_division=0 gives sklearn's default value without its UndefinedMetricWarning
    f1 = float(f1_score(y, pred, average="macro", zero_division=0))

    present = np.unique(y)
    if present.size < c:
        warnings.warn(
            f"AUC is undefined: only classes {present.tolist()} of {c} occur in the labels; reporting NaN",
            RuntimeWarning,
            stacklevel=2,
        )
        auc = math.nan
    elif c == 2:
        # sklearn rejects an (N, 2) score matrix for binary y; column 1 gives the standard binary AUC (methods.md §6.1)
        auc = float(roc_auc_score(y, p[:, 1]))
    else:
        if not np.allclose(p.sum(axis=1), 1.0, rtol=1e-4, atol=1e-6):
            raise ValueError("multi-class AUC needs probabilities whose rows sum to 1; apply softmax to the logits")
        auc = float(roc_auc_score(y, p, average="macro", multi_class="ovo"))
    return {"acc": acc, "auc": auc, "f1": f1}


def model_selection_score(metrics: Mapping[str, float]) -> float:
    """MedCoSS checkpoint selection score: val ACC + val AUC + val F1 (NaN if any of them is NaN)."""
    return float(metrics["acc"]) + float(metrics["auc"]) + float(metrics["f1"])


def as_percent(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Scale fraction-valued entries by 100 for reporting; HD95 (a distance) and non-numeric entries are kept."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        numeric = isinstance(v, (int, float, np.floating)) and not isinstance(v, bool)
        out[k] = 100.0 * float(v) if numeric and k != "hd95" else v
    return out


# ---------------------------------------------------------------------------------------------------------------
# 2D (or n-D) binary segmentation: Dice and medpy-style HD95
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# 3D organ / tumour Dice (LiTS, KiTS19)
# ---------------------------------------------------------------------------------------------------------------


def organ_tumour_dice(pred_labels: ArrayLike, gt_labels: ArrayLike) -> dict[str, float]:
    """Per-case Dice on label maps (0 background, 1 organ, 2 tumour), stunet.md §4.4.

    ``organ`` = Dice of label >= 1 (organ including tumour), ``tumour`` = Dice of label == 2,
    ``mean`` = (organ + tumour) / 2, ``organ_label1`` = Dice of label == 1 only; empty/empty gives 1.
    """
    p, g = _np(pred_labels), _np(gt_labels)
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} differs from ground-truth shape {g.shape}")
    organ = dice_score(p >= 1, g >= 1)
    tumour = dice_score(p == 2, g == 2)
    return {
        "organ": organ,
        "tumour": tumour,
        "mean": (organ + tumour) / 2.0,
        "organ_label1": dice_score(p == 1, g == 1),
    }


def organ_tumour_metrics(preds: Sequence[ArrayLike], gts: Sequence[ArrayLike]) -> dict[str, Any]:
    """Per-case :func:`organ_tumour_dice` averaged over cases; adds ``per_case`` (list of dicts with ``index``)."""
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predictions but {len(gts)} ground truths")
    if len(preds) == 0:
        raise ValueError("organ_tumour_metrics needs at least one case")
    rows = [{"index": i, **organ_tumour_dice(p, g)} for i, (p, g) in enumerate(zip(preds, gts))]
    out: dict[str, Any] = {k: float(np.mean([r[k] for r in rows])) for k in ORGAN_TUMOUR_KEYS}
    out["per_case"] = rows
    return out


# ---------------------------------------------------------------------------------------------------------------
# MONAI cumulative metrics
# ---------------------------------------------------------------------------------------------------------------


def _item_names(data: Any, n: int) -> list[str | None]:
    """Source file names from MetaTensor metadata (``filename_or_obj``), None where there are none."""

    def name_of(meta_value: Any) -> str | None:
        return None if meta_value is None else str(meta_value)

    if isinstance(data, (list, tuple)):
        return [name_of(getattr(d, "meta", {}).get("filename_or_obj")) for d in data]
    value = getattr(data, "meta", {}).get("filename_or_obj")
    if isinstance(value, (list, tuple)) and len(value) == n:
        return [name_of(v) for v in value]
    return [name_of(value) if n == 1 else None for _ in range(n)]


def _plain(data: Any) -> Any:
    # drop MetaTensor metadata (names are read beforehand) and turn numbers/arrays into tensors
    if isinstance(data, (list, tuple)):
        return [convert_to_tensor(d, track_meta=False) for d in data]
    return convert_to_tensor(data, track_meta=False)


class _PerItemMetric(CumulativeIterationMetric):
    """Cumulative metric that remembers item names so that per-item rows can be written (e.g. to a CSV)."""

    columns: tuple[str, ...] = ()

    def __init__(self, key: str | None) -> None:
        self.key = key
        super().__init__()

    def reset(self) -> None:
        self._names: list[str | None] = []
        super().reset()

    def __call__(self, y_pred: Any, y: Any = None, **kwargs: Any) -> Any:  # type: ignore[override]
        if y is None:
            raise ValueError(f"{type(self).__name__} needs the ground truth y")
        n = len(y_pred) if isinstance(y_pred, (list, tuple)) else int(y_pred.shape[0])
        names = _item_names(y, n)
        if all(v is None for v in names):
            names = _item_names(y_pred, n)
        ret = super().__call__(_plain(y_pred), _plain(y), **kwargs)
        self._names.extend(names)
        return ret

    def _local_values(self) -> np.ndarray:
        """This rank's per-item values [N, len(columns)] (names are not gathered across ranks)."""
        if not self._buffers or not self._buffers[0]:
            return np.zeros((0, len(self.columns)))
        return torch.stack(self._buffers[0]).double().cpu().numpy().reshape(len(self._buffers[0]), -1)

    def per_item(self) -> list[dict[str, Any]]:
        """One row per item seen since the last reset, in order: ``{"index", "name", <metric columns>...}``.

        Uses this process's items only (under DDP each rank sees its own shard).
        """
        values = self._local_values()
        return [
            {"index": i, "name": self._names[i] if i < len(self._names) else None}
            | {c: float(v) for c, v in zip(self.columns, row)}
            for i, row in enumerate(values)
        ]


class ClassificationMetric(_PerItemMetric):
    """Cumulative ACC / AUC / macro F1 (see :func:`classification_metrics`).

    Items: ``y_pred`` [C] probabilities (logits with ``softmax=True``; [1] for one sigmoid output) and ``y`` a class
    index (0-d, [1]) or one-hot [C]. ``aggregate()`` returns the float for ``key`` ("acc", "auc", "f1" or "score" =
    ACC + AUC + F1, MedCoSS's model-selection score), or the dict of all four when ``key`` is None.
    """

    def __init__(self, key: str | None = "score", softmax: bool = False) -> None:
        _check_key(key, CLASSIFICATION_KEYS)
        self.softmax = softmax
        super().__init__(key)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> Any:
        b = y_pred.shape[0]
        probs = y_pred.reshape(b, -1).double()
        if self.softmax:
            probs = torch.softmax(probs, dim=1)
        labels = y.reshape(b, -1)  # type: ignore[union-attr]
        c = probs.shape[1]
        if labels.shape[1] == c and c > 1:
            labels = labels.argmax(dim=1)
        elif labels.shape[1] == 1:
            labels = labels[:, 0].round()
        else:
            raise ValueError(
                f"label of shape {tuple(labels.shape[1:])} matches neither an index nor {c} one-hot values"
            )
        return probs, labels.long()

    def _arrays(self, local: bool = False) -> tuple[np.ndarray, np.ndarray]:
        if local:
            buf = [torch.stack(b) for b in self._buffers] if self._buffers and self._buffers[0] else None
        else:
            buf = self.get_buffer()
        if buf is None:
            raise ValueError(f"{type(self).__name__} has no data; call it on at least one batch first")
        probs, labels = buf
        return probs.cpu().numpy(), labels.cpu().numpy()

    def aggregate(self) -> float | dict[str, float]:  # type: ignore[override]
        m: dict[str, float] = classification_metrics(*self._arrays())
        m["score"] = model_selection_score(m)
        return m if self.key is None else m[self.key]

    def per_item(self) -> list[dict[str, Any]]:
        """Per-image rows ``{"index", "name", "label", "pred", "correct", "prob_0", ...}`` (this process's items)."""
        if not self._buffers or not self._buffers[0]:
            return []
        probs, labels = self._arrays(local=True)
        probs = _prob_matrix(probs)
        rows = []
        for i, (p, y) in enumerate(zip(probs, labels)):
            pred = int(p.argmax())
            row = {"index": i, "name": self._names[i] if i < len(self._names) else None}
            row |= {"label": int(y), "pred": pred, "correct": float(pred == int(y))}
            row |= {f"prob_{j}": float(v) for j, v in enumerate(p)}
            rows.append(row)
        return rows


def _foreground(x: torch.Tensor) -> np.ndarray:
    """[B, C, *spatial] -> bool [B, *spatial]: C == 1 is thresholded at 0.5 (MedCoSS rounds), C > 1 uses argmax > 0."""
    if x.shape[1] == 1:
        return (x[:, 0] > 0.5).cpu().numpy()
    return (x.argmax(dim=1) > 0).cpu().numpy()


def _label_map(x: torch.Tensor) -> np.ndarray:
    """[B, C, *spatial] -> int [B, *spatial]: C == 1 is a label map already, C > 1 is one-hot/probabilities."""
    if x.shape[1] == 1:
        return x[:, 0].round().long().cpu().numpy()
    return x.argmax(dim=1).cpu().numpy()


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

    def aggregate(self) -> float | dict[str, float]:  # type: ignore[override]
        buf = self.get_buffer()
        if buf is None:
            raise ValueError(f"{type(self).__name__} has no data; call it on at least one batch first")
        means = {c: float(v) for c, v in zip(self.columns, buf.double().mean(dim=0))}
        return means if self.key is None else means[self.key]


class OrganTumourMetric(_PerItemMetric):
    """Cumulative per-case organ / tumour / mean / organ_label1 Dice (:func:`organ_tumour_dice`), averaged over cases.

    Items: [1, *spatial] label maps (0/1/2) or [3, *spatial] one-hot/softmax (argmax). All four Dice values are
    cheap, so all are kept per case; ``aggregate()`` returns the one named by ``key`` (dict of all when None).
    """

    columns = ORGAN_TUMOUR_KEYS

    def __init__(self, key: str | None = "mean") -> None:
        _check_key(key, ORGAN_TUMOUR_KEYS)
        super().__init__(key)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        preds, gts = _label_map(y_pred), _label_map(y)  # type: ignore[arg-type]
        values = []
        for p, g in zip(preds, gts):
            d = organ_tumour_dice(p, g)
            values.append([d[c] for c in self.columns])
        return torch.tensor(values, dtype=torch.float64)

    def aggregate(self) -> float | dict[str, float]:  # type: ignore[override]
        buf = self.get_buffer()
        if buf is None:
            raise ValueError(f"{type(self).__name__} has no data; call it on at least one batch first")
        means = {c: float(v) for c, v in zip(self.columns, buf.double().mean(dim=0))}
        return means if self.key is None else means[self.key]


def merge_per_item(*metrics: _PerItemMetric | IgniteMetricHandler) -> list[dict[str, Any]]:
    """Join the :meth:`per_item` rows of several metrics (or handlers) fed with the same items, by index.

    E.g. a Dice handler and an HD95 handler give rows ``{"index", "name", "dice", "hd95"}`` for a per-image CSV.
    """
    tables = [getattr(m, "metric_fn", m).per_item() for m in metrics]
    if not tables:
        return []
    n = len(tables[0])
    if any(len(t) != n for t in tables):
        raise ValueError(f"metrics saw different numbers of items: {[len(t) for t in tables]}")
    rows = []
    for i in range(n):
        row: dict[str, Any] = {}
        for t in tables:
            for k, v in t[i].items():
                if k == "name" and v is None and row.get("name") is not None:
                    continue  # keep a name another metric found
                row[k] = v
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Ignite handlers for SupervisedEvaluator configs
# ---------------------------------------------------------------------------------------------------------------


def _default_transform(output_transform: Callable | None) -> Callable:
    return from_engine(["pred", "label"]) if output_transform is None else output_transform


class ClassificationMetricHandler(IgniteMetricHandler):
    """Ignite handler for one of "acc", "auc", "f1", "score" (ACC + AUC + F1, MedCoSS checkpoint selection).

    ``output_transform`` defaults to ``from_engine(["pred", "label"])``; ``pred`` must hold softmax probabilities
    unless ``softmax=True``. ``save_details`` is off by default because the buffer is (probs, labels), not per-image
    scores; use ``handler.metric_fn.per_item()`` for a per-image table.
    """

    def __init__(
        self,
        key: str = "score",
        output_transform: Callable | None = None,
        softmax: bool = False,
        save_details: bool = False,
    ) -> None:
        _check_key(key, CLASSIFICATION_KEYS, allow_none=False)
        super().__init__(
            metric_fn=ClassificationMetric(key=key, softmax=softmax),
            output_transform=_default_transform(output_transform),
            save_details=save_details,
        )


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


class OrganTumourHandler(IgniteMetricHandler):
    """Ignite handler for the per-case-mean "organ", "tumour", "mean" or "organ_label1" Dice (stunet.md §4.4).

    With ``save_details`` the per-case [N, 4] values (organ, tumour, mean, organ_label1) go to
    ``engine.state.metric_details[name]``.
    """

    def __init__(
        self,
        key: str = "mean",
        output_transform: Callable | None = None,
        save_details: bool = True,
    ) -> None:
        _check_key(key, ORGAN_TUMOUR_KEYS, allow_none=False)
        super().__init__(
            metric_fn=OrganTumourMetric(key=key),
            output_transform=_default_transform(output_transform),
            save_details=save_details,
        )
