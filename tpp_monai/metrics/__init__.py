"""Evaluation metrics with the conventions of the MedCoSS fine-tuning framework that TPP follows.

* :mod:`.classification`: ACC, macro-OvO AUC, macro F1, and ACC + AUC + F1 for checkpoint selection.
* :mod:`.segmentation`: per-image binary Dice and medpy-style HD95 (pixels), averaged over images.
* :mod:`.organ_tumour`: per-case 3D organ / tumour / mean Dice for LiTS and KiTS19.
* :mod:`.base`: the per-item cumulative metric, :func:`merge_per_item` and :func:`as_percent`.

Plain functions return fractions (0..1) except HD95 (pixels, or the units of ``spacing``); :func:`as_percent`
converts for reporting. The ``*Metric`` classes are MONAI cumulative metrics fed with what a MONAI evaluator
delivers after decollation (lists of channel-first tensors); the ``*Handler`` classes wrap them as
``IgniteMetricHandler`` for ``key_val_metric`` / ``additional_metrics`` in bundle configs, e.g.::

    "key_val_metric": {"val_score": {"_target_": "tpp_monai.metrics.ClassificationMetricHandler", "key": "score"}}
"""

from tpp_monai.metrics.base import as_percent, merge_per_item
from tpp_monai.metrics.classification import (
    ClassificationMetric,
    ClassificationMetricHandler,
    classification_metrics,
    model_selection_score,
)
from tpp_monai.metrics.organ_tumour import (
    OrganTumourHandler,
    OrganTumourMetric,
    organ_tumour_dice,
    organ_tumour_metrics,
)
from tpp_monai.metrics.segmentation import (
    HD95_ONE_EMPTY,
    SegmentationMetric,
    SegMetricHandler,
    dice_score,
    hd95,
    segmentation_metrics,
)

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
