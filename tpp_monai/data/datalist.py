"""Official download -> decathlon-style datalist (``training`` / ``validation`` / ``test``), written and checked.

The datalist holds paths relative to the *layout root*, the folder that holds a dataset's official layout
(``Warwick_QU_Dataset/``, ``QaTa-COV19-v2/``, ``kits19/data/``, ...): pass that folder as ``dataset_dir`` to the
bundles. ``--root`` may also name a folder above it; the builder finds the layout inside.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from tpp_monai.data.common import FileChecker, find_layout_root, natural_key, subsample_labels
from tpp_monai.data.info import DATASETS, get_dataset
from tpp_monai.errors import DatasetError

SPLITS = ("training", "validation", "test")


def locate(dataset: str, root: str | Path) -> Path:
    """The layout root of ``dataset`` in ``root`` (``root`` itself or a folder below it)."""
    builder = get_dataset(dataset).builder
    return find_layout_root(root, builder.is_layout, builder.expected)


def build(
    dataset: str, root: str | Path, seed: int = 0, label_fraction: float | None = None, skip_bad: bool = False
) -> tuple[dict, Path]:
    """:func:`build_datalist` plus the layout root the paths are relative to."""
    info = get_dataset(dataset)
    builder = info.builder
    layout_root = find_layout_root(root, builder.is_layout, builder.expected)
    checker = FileChecker(layout_root, skip_bad=skip_bad, workers=builder.workers)
    built = builder.build(layout_root, seed, checker, info.classes)
    lists = {"training": built.training, "validation": built.validation, "test": built.test}
    split_rule = dict(built.split_rule)
    if label_fraction is not None:
        full = len(lists["training"])
        lists["training"] = subsample_labels(lists["training"], label_fraction, seed)
        split_rule["label_fraction"] = (
            f"training keeps {len(lists['training'])} of {full} records: per class, sorted by image path, "
            "random.Random(seed).shuffle, the first max(1, round(fraction * n)); validation and test untouched"
        )
    datalist = {
        "dataset": info.name,
        "title": info.title,
        "task": info.task,
        "classes": list(info.classes),
        "paths_relative_to": f"the folder holding {builder.expected}",
        "root_layout": built.root_layout,
        "split_rule": split_rule,
        "seed": seed if built.seed_used or label_fraction is not None else None,
        "label_fraction": label_fraction,
        "counts": {k: len(v) for k, v in lists.items()},
        "paper_counts": dict(zip(SPLITS, info.split_counts)),
    }
    strata = _strata(lists)
    if strata:
        datalist["class_counts"] = strata
    datalist |= {"skipped": checker.skipped, "missing": built.missing, "notes": built.notes, **lists}
    return datalist, layout_root


def build_datalist(
    dataset: str, root: str | Path, seed: int = 0, label_fraction: float | None = None, skip_bad: bool = False
) -> dict:
    """Build the datalist of ``dataset`` from its official download at ``root``.

    Args:
        dataset: one of ``DATASETS`` (``mhist, oct_c8, chest_xray_pa, glas, qata, lits, kits``).
        root: the download folder, or the folder of the official layout inside it.
        seed: seed of the random draws (validation carving; label fraction). Recorded in the datalist; ``None``
            there when nothing is drawn at random (OCT-C8 and GlaS without a label fraction).
        label_fraction: keep this seeded per-class fraction of the training records (paper Figure 4).
        skip_bad: skip unreadable files instead of stopping; every skipped file is listed under ``skipped``.

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}`` records (``image``, ``label`` and extra keys,
        paths relative to the layout root) plus metadata: dataset, classes, split_rule, seed, counts, ...

    Raises:
        DatasetError: the folder does not hold the official layout, or a file in it is wrong (the message names it).
    """
    return build(dataset, root, seed, label_fraction, skip_bad)[0]


def _strata(lists: dict[str, list[dict]]) -> dict[str, dict[str, int]]:
    """Per-split counts by class name (classification) or GlaS grade; empty for sets without categories."""
    key = next((k for k in ("class_name", "grade") if any(k in r for v in lists.values() for r in v)), None)
    if key is None:
        return {}
    return {split: dict(sorted(Counter(r[key] for r in records).items())) for split, records in lists.items()}


def write_datalist(datalist: dict, out: str | Path) -> Path:
    """Write a datalist as JSON, records sorted by image path, so one download always gives the same bytes.

    The file is written to a temporary name and renamed, so a reader never sees half a datalist.
    """
    out = Path(out).expanduser()
    data = dict(datalist)
    for split in SPLITS:
        if split in data:
            data[split] = sorted(data[split], key=lambda r: natural_key(str(r.get("image", ""))))
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def check_datalist(datalist_file: str | Path, dataset_dir: str | Path, keys: tuple[str, ...] = SPLITS) -> dict:
    """Load a datalist and make sure every file it names exists under ``dataset_dir``, before training starts.

    Returns the loaded datalist. Raises :class:`DatasetError` naming the first missing file and how many are
    missing; when the files sit in a layout folder below ``dataset_dir``, the message names that folder.
    """
    path = Path(datalist_file).expanduser()
    if not path.is_file():
        raise DatasetError(
            f"{path}: datalist not found; expected a JSON file (write one with `python -m tpp_monai datalist`)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: expected a datalist JSON; could not parse it ({err})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object with {', '.join(keys)}; found a {type(data).__name__}")
    base = Path(dataset_dir).expanduser()
    if not base.is_dir():
        where = data.get("paths_relative_to", "the folder the datalist's paths are relative to")
        raise DatasetError(f"dataset_dir {base}: expected {where}; found {'a file' if base.exists() else 'nothing'}")
    missing: list[str] = []
    for key in keys:
        records = data.get(key)
        if not isinstance(records, list):
            raise DatasetError(
                f"{path}: expected a {key!r} list; found {type(records).__name__ if key in data else 'none'}"
            )
        for i, record in enumerate(records):
            if not isinstance(record, dict) or not isinstance(record.get("image"), str):
                raise DatasetError(f"{path}: {key}[{i}] expected a record with an 'image' path; found {record!r}")
            missing += [
                v for v in (record["image"], record.get("label")) if isinstance(v, str) and not (base / v).exists()
            ]
    if missing:
        hint = ""
        if data.get("dataset") in DATASETS:
            try:
                inner = locate(data["dataset"], base)
            except DatasetError:
                inner = None
            if inner is not None and inner != base and (inner / missing[0]).exists():
                hint = f"; the files are under {inner}: pass that folder as dataset_dir"
        raise DatasetError(
            f"{base / missing[0]}: listed in {path} but not found ({len(missing)} file(s) of the datalist are "
            f"missing under {base}){hint}"
        )
    return data


def format_counts(datalist: dict) -> str:
    """The per-split and per-class counts as a small table (what the ``datalist`` command prints)."""
    counts, paper = datalist["counts"], datalist.get("paper_counts", {})
    lines = [
        f"{datalist['dataset']}: "
        + " / ".join(f"{counts[s]} {s}" for s in SPLITS)
        + (f"   (paper: {'/'.join(str(paper[s]) for s in SPLITS)})" if paper else "")
    ]
    strata = datalist.get("class_counts")
    if strata:
        names = sorted({n for per in strata.values() for n in per})
        width = max(len(n) for n in names) + 2
        lines.append(" " * width + "".join(f"{s:>12}" for s in SPLITS))
        lines += [f"{n:<{width}}" + "".join(f"{strata[s].get(n, 0):>12}" for s in SPLITS) for n in names]
    return "\n".join(lines)
