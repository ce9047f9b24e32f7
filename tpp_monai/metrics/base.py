"""Plumbing shared by the metric modules: array conversion, key checks, the per-item cumulative metric, row joins."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.handlers import IgniteMetricHandler, from_engine
from monai.metrics import CumulativeIterationMetric
from monai.utils import convert_to_tensor

ArrayLike = np.ndarray | torch.Tensor | Sequence


def _np(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _check_key(key: str | None, allowed: Sequence[str], allow_none: bool = True) -> None:
    if key is None and allow_none:
        return
    if key not in allowed:
        raise ValueError(f"unknown metric key {key!r}; valid keys: {', '.join(allowed)}")


def as_percent(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Scale fraction-valued entries by 100 for reporting; HD95 (a distance) and non-numeric entries are kept."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        numeric = isinstance(v, (int, float, np.floating)) and not isinstance(v, bool)
        out[k] = 100.0 * float(v) if numeric and k != "hd95" else v
    return out


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

    def aggregate(self) -> float | dict[str, float]:  # type: ignore[override]
        """The mean of every column over the items (``key``: that column's mean alone)."""
        buf = self.get_buffer()
        if buf is None:
            raise ValueError(f"{type(self).__name__} has no data; call it on at least one batch first")
        means = {c: float(v) for c, v in zip(self.columns, buf.double().mean(dim=0))}
        return means if self.key is None else means[self.key]

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


def _default_transform(output_transform: Callable | None) -> Callable:
    return from_engine(["pred", "label"]) if output_transform is None else output_transform
