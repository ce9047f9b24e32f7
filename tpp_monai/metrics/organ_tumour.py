"""3D organ / tumour Dice on label maps (0 background, 1 organ, 2 tumour) for LiTS and KiTS19, per case then
averaged over cases.

Organ = label >= 1 (organ including tumour) and tumour = label == 2, as the LiTS evaluation (liver = label >= 1,
lesion = label == 2) and KiTS19's ``starter_code/evaluation.py`` (github.com/neheller/kits19: kidney = label > 0,
tumour = label > 1) define them; mean = (organ + tumour) / 2; Dice 1 when prediction and ground truth are both
empty. The label == 1 organ Dice of UniSeg's ``Upstream/UniSeg_Metrics_test.py`` (github.com/yeerwen/UniSeg) is
reported alongside as ``organ_label1``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from monai.handlers import IgniteMetricHandler

from tpp_monai.metrics.base import ArrayLike, _check_key, _default_transform, _np, _PerItemMetric
from tpp_monai.metrics.segmentation import dice_score

ORGAN_TUMOUR_KEYS = ("organ", "tumour", "mean", "organ_label1")


def organ_tumour_dice(pred_labels: ArrayLike, gt_labels: ArrayLike) -> dict[str, float]:
    """Per-case Dice on label maps (0 background, 1 organ, 2 tumour); see the module docstring for the sources.

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


def _label_map(x: torch.Tensor) -> np.ndarray:
    """[B, C, *spatial] -> int [B, *spatial]: C == 1 is a label map already, C > 1 is one-hot/probabilities."""
    if x.shape[1] == 1:
        return x[:, 0].round().long().cpu().numpy()
    return x.argmax(dim=1).cpu().numpy()


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


class OrganTumourHandler(IgniteMetricHandler):
    """Ignite handler for the per-case-mean "organ", "tumour", "mean" or "organ_label1" Dice.

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
