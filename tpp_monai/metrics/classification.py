"""Classification ACC / AUC / macro F1 as MedCoSS ``Downstream/Dim_2/Chest_XR/main.py`` and ``NCT_CRC_HE/main.py``
compute them, with ACC + AUC + F1 as the checkpoint-selection score."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from monai.handlers import IgniteMetricHandler
from sklearn.metrics import f1_score, roc_auc_score

from tpp_monai.metrics.base import ArrayLike, _check_key, _default_transform, _np, _PerItemMetric

CLASSIFICATION_KEYS = ("acc", "auc", "f1", "score")


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
        # sklearn rejects an (N, 2) score matrix for binary y; column 1 (the positive class) gives the standard
        # binary AUC
        auc = float(roc_auc_score(y, p[:, 1]))
    else:
        if not np.allclose(p.sum(axis=1), 1.0, rtol=1e-4, atol=1e-6):
            raise ValueError("multi-class AUC needs probabilities whose rows sum to 1; apply softmax to the logits")
        auc = float(roc_auc_score(y, p, average="macro", multi_class="ovo"))
    return {"acc": acc, "auc": auc, "f1": f1}


def model_selection_score(metrics: Mapping[str, float]) -> float:
    """MedCoSS checkpoint selection score: val ACC + val AUC + val F1 (NaN if any of them is NaN)."""
    return float(metrics["acc"]) + float(metrics["auc"]) + float(metrics["f1"])


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
