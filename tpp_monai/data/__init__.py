"""Datasets of the TPP paper: datalists from the official downloads, the transform chains, and demo datasets.

- :data:`DATASETS` / :func:`get_dataset`: one entry per dataset (:class:`DatasetInfo`: facts, recipe, builder, demo);
  adding a dataset is one entry there (:mod:`tpp_monai.data.info`) plus its builder and demo writer.
- :func:`build_datalist` / :func:`write_datalist` / :func:`check_datalist`: official layout -> datalist JSON.
- :func:`subsample_labels`: the seeded per-class label fraction (paper Figure 4).
- :func:`image_transforms`, :func:`train_transforms` (= :func:`deterministic_train_transforms` +
  :func:`random_train_transforms`), :func:`eval_transforms`: the one preprocessing of every workflow.
- :func:`make_demo_dataset`: a small synthetic dataset in a dataset's official layout.

The transform functions import MONAI/torch; they load on first use, so building a datalist stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from tpp_monai.data.common import subsample_labels
from tpp_monai.data.datalist import build_datalist, check_datalist, format_counts, write_datalist
from tpp_monai.data.demo import make_demo_dataset
from tpp_monai.data.info import DATASETS, DatasetInfo, get_dataset

_TRANSFORMS = (
    "image_transforms",
    "train_transforms",
    "deterministic_train_transforms",
    "random_train_transforms",
    "eval_transforms",
)

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "build_datalist",
    "check_datalist",
    "format_counts",
    "get_dataset",
    "make_demo_dataset",
    "subsample_labels",
    "write_datalist",
    *_TRANSFORMS,
]


def __getattr__(name: str) -> Any:
    if name in _TRANSFORMS:
        return getattr(importlib.import_module("tpp_monai.data.transforms"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
