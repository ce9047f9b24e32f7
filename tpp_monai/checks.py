"""Checks run at the start of every workflow, before anything is built: one message for all that is wrong.

* :func:`validate_settings`: every setting a user may give (``--epochs``, ``--lr``...) against its type and range,
  and the input files (``--tpp_ckpt``, ``--backbone_ckpt``) for existence.
* :func:`preflight_data`: every image, mask and volume of the datalist splits a workflow reads is opened once:
  readable, the same size (and, for volumes, affine) as its partner, finite values, labels within the classes.
* :func:`preflight_inference`: the same for a folder of inputs; files of another kind are skipped with a note, and
  ``--skip_bad_files true`` skips unreadable ones (each named) instead of stopping.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tpp_monai.data.common import IMAGE_SUFFIXES as IMAGE_SUFFIXES_2D
from tpp_monai.data.common import Unreadable, probe_image, probe_volume, read_mask
from tpp_monai.data.info import get_dataset
from tpp_monai.errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class Rule:
    """The allowed values of one setting: ``kind`` is ``int``, ``number``, ``bool`` or ``size`` (a list of ints);
    ``low``/``high`` bound it (``open_low``/``open_high``: the bound itself excluded); ``optional``: ``None`` too."""

    kind: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    optional: bool = False

    def describe(self) -> str:
        if self.kind == "bool":
            return "True or False"
        noun = {"int": "an integer", "number": "a number", "size": "a list of integers"}[self.kind]
        if self.low is not None and self.high is not None:
            span = f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}{')' if self.open_high else ']'}"
        elif self.low is not None:
            span = f"{'>' if self.open_low else '>='} {self.low:g}"
        else:
            span = ""
        text = f"{noun}{' each' if self.kind == 'size' and span else ''} {span}".strip()
        return f"{text}, or None" if self.optional else text

    def accepts(self, value: object) -> bool:
        if value is None:
            return self.optional
        if self.kind == "bool":
            return isinstance(value, bool) or (isinstance(value, str) and value.lower() == "true")
        if self.kind == "size":
            return isinstance(value, (list, tuple)) and bool(value) and all(self._in_range(v, int) for v in value)
        return self._in_range(value, int if self.kind == "int" else (int, float))

    def _in_range(self, value: object, types: type | tuple[type, ...]) -> bool:
        if isinstance(value, bool) or not isinstance(value, types) or not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.open_high and value == self.high))


COUNT, POSITIVE, NON_NEGATIVE, FLAG = Rule("int", 1), Rule("number", 0, open_low=True), Rule("number", 0), Rule("bool")
SETTINGS: dict[str, Rule] = {
    **dict.fromkeys(("epochs", "tpp_epochs", "iterations", "batch_size", "val_batch_size", "val_interval",
                     "pretext_size", "sw_batch_size"), COUNT),
    "num_workers": Rule("int", 0),
    "seed": Rule("int", 0, 2**32 - 1),
    "lr": POSITIVE,
    "grad_clip": POSITIVE,
    **dict.fromkeys(("weight_decay", "weight_decay_end", "warmup_epochs"), NON_NEGATIVE),
    "mask_ratio": Rule("number", 0, 1, open_high=True),
    "sw_overlap": Rule("number", 0, 1, open_high=True),
    "cache_rate": Rule("number", 0, 1),
    "label_fraction": Rule("number", 0, 1, open_low=True, optional=True),
    "image_size": Rule("size", 1),
    **dict.fromkeys(("resume", "amp", "distributed", "activation_checkpointing", "skip_bad_files"), FLAG),
}  # fmt: skip
INPUT_FILES = {
    "tpp_ckpt": "run pretrain_tpp first (it writes runs/pretrain_tpp/tpp_target/), pass the target-parameter "
    "folder of another run, or fine-tune from randomly initialised target parameters with --tpp_ckpt none",
    "backbone_ckpt": "pass the pre-trained backbone's checkpoint file, or --backbone_ckpt none for random weights",
}


class Unresolved:
    """The value of a setting that depends on a refused registry name (the MAE/DINO learning rate of an unknown
    pretext): :func:`validate_settings` skips it and names the cause once; used as a number it raises the cause."""

    def __init__(self, cause: ConfigError) -> None:
        self.cause = cause

    def __float__(self) -> float:
        raise self.cause

    __int__ = __index__ = __float__

    def __repr__(self) -> str:
        return f"<unresolved: {self.cause}>"


REGISTRY_NAMES = ("dataset_name", "method", "backbone", "pretext")  # settings whose value must name a registry entry


def _registry_lookups() -> dict[str, Callable[[object], object]]:
    """Setting -> the registry lookup its value must pass (each raises a :class:`ConfigError` naming the valid
    entries); the registries are imported only when a workflow checks its settings."""
    from tpp_monai.backbones import get_backbone_spec
    from tpp_monai.peft.registry import get_method
    from tpp_monai.pretext import check_pretext

    return {"dataset_name": lambda v: get_dataset(v, "dataset_name"), "method": lambda v: get_method(v, "method"),
            "backbone": lambda v: get_backbone_spec(v, "backbone"), "pretext": check_pretext}  # fmt: skip


#: inputs that may be a folder: the TPP stage's target-parameter folder (tpp_monai.peft.files)
FOLDER_INPUTS = ("tpp_ckpt",)


def command_line_settings(argv: Sequence[str] | None = None) -> dict:
    """The ``--key value`` overrides of a ``python -m monai.bundle run`` command line, parsed as its CLI (fire)
    parses them; empty in any other program. Settings computed from the data (fine-tuning's ``epochs``) are checked
    from here, since resolving them would build the data pipeline first."""
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if argv is None and not (main_spec and main_spec.name.startswith("monai.bundle")):
        return {}
    from fire.parser import DefaultParseValue

    args, found = list(sys.argv[1:] if argv is None else argv), {}
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        key, has_value, value = arg[2:].partition("=")
        if not has_value and i + 1 < len(args) and not args[i + 1].startswith("--"):
            value, has_value = args[i + 1], True
        if has_value:
            found[key.replace("-", "_")] = DefaultParseValue(value)
    return found


def validate_settings(
    settings: Mapping[str, object], files: Mapping[str, object] | None = None,
    names: Mapping[str, object] | None = None, unresolved: Sequence[str] = (),
) -> None:  # fmt: skip
    """Check ``settings`` (and the command line's values of the other known settings) against :data:`SETTINGS`,
    that every input file in ``files`` exists (``none`` = not used) and that every value of ``names`` (keys of
    :data:`REGISTRY_NAMES`: dataset, PEFT method, backbone, pretext) is a registry entry; one :class:`ConfigError`
    lists all, with the settings that could not be resolved (``unresolved``), so a bad method is named together
    with a bad learning rate."""
    from tpp_monai.network import FROM_MODEL_FILE, is_none

    values = {**{k: v for k, v in command_line_settings().items() if k in SETTINGS}, **settings}
    problems = list(unresolved)
    lookups = _registry_lookups() if names else {}
    for key, value in (names or {}).items():
        if value is None or key not in lookups:
            continue
        try:
            lookups[key](value)
        except ConfigError as err:
            problems.append(str(err))
    for key, value in values.items():
        rule = SETTINGS.get(key)
        if rule is None or rule.accepts(value) or isinstance(value, Unresolved):
            continue
        fix = "; a 'false' on the command line is read as the text 'false', write False" if value == "false" else ""
        problems.append(f"{key} {value!r}: expected {rule.describe()}{fix}")
    for key, value in (files or {}).items():
        if value is None or is_none(value) or value == FROM_MODEL_FILE:  # no file, or every weight from model.pt
            continue
        path = Path(str(value)).expanduser()
        if key in FOLDER_INPUTS and path.is_dir():
            from tpp_monai.peft.files import exists

            if exists(path):
                continue
            problems.append(f"{key} {value}: the folder holds no target parameters; {INPUT_FILES.get(key, '')}")
        elif not path.is_file():
            found = "a folder" if path.is_dir() else "nothing"
            problems.append(f"{key} {value}: not found (expected a file, found {found}); {INPUT_FILES.get(key, '')}")
    if problems:
        raise ConfigError(
            f"{len(problems)} setting(s) cannot be used; nothing was built:\n  "
            + "\n  ".join(p.rstrip("; ") for p in problems)
        )


# --------------------------------------------------------------------------------------------------------------
# Data


VOLUME_SUFFIXES = (".nii", ".nii.gz")
_AFFINE_TOLERANCE_MM = 1e-2


def _finite(values: np.ndarray) -> bool:
    return not np.issubdtype(values.dtype, np.floating) or bool(np.isfinite(values).all())


def _image_2d(path: Path) -> tuple[int, int]:
    """Decode a 2D image (raises :class:`Unreadable`); float images must hold finite values. Returns its size."""
    from PIL import Image

    header = probe_image(path)
    if header.mode == "F":
        with Image.open(path) as im:
            if not _finite(np.asarray(im)):
                raise Unreadable(path, "it holds NaN or infinite pixel values")
    return header.size


def _check_pair_2d(image: Path, mask: Path | None, allowed: tuple[int, ...] | None) -> list[str]:
    """Problems of one 2D record (empty when fine)."""
    problems = []
    size = _problem_or(problems, lambda: _image_2d(image))
    if mask is None:
        return problems
    mask_read = _problem_or(problems, lambda: read_mask(mask))
    if mask_read is None or size is None:
        return problems
    mask_size, values = mask_read
    if mask_size != size:
        problems.append(f"{mask}: mask size {mask_size[0]}x{mask_size[1]} differs from its image {image.name} "
                        f"({size[0]}x{size[1]}); expected the same width x height")  # fmt: skip
    elif allowed is not None and not np.isin(values, allowed).all():
        problems.append(f"{mask}: mask values {_unexpected(values, allowed)} outside the expected {list(allowed)}")
    elif values.size and values.min() < 0:
        problems.append(f"{mask}: negative mask values {_unexpected(values, range(0, int(values.max()) + 1))}")
    return problems


def _unexpected(values: np.ndarray, allowed: Iterable[int]) -> list:
    allowed = set(allowed)
    return [v.item() for v in np.unique(values) if v.item() not in allowed][:8]


def _volume(path: Path) -> tuple[tuple[int, ...], np.ndarray, np.ndarray]:
    """Shape, affine and voxels of a NIfTI volume (raises :class:`Unreadable`)."""
    import nibabel as nib

    probe_volume(path)  # a truncated file fails here with the byte counts
    try:
        img = nib.load(str(path))
        return tuple(int(s) for s in img.shape), np.asarray(img.affine), np.asanyarray(img.dataobj)
    except Exception as err:  # nibabel raises many types (ImageFileError, OSError, EOFError, zlib.error, ...)
        raise Unreadable(path, f"cannot read its voxels ({type(err).__name__}: {err})") from None


def _check_pair_3d(image: Path, label: Path | None, classes: int) -> list[str]:
    """Problems of one 3D record (empty when fine)."""
    problems = []
    read = _problem_or(problems, lambda: _volume(image))
    if read is not None and not _finite(read[2]):
        problems.append(f"{image}: NaN or infinite voxel values ({int((~np.isfinite(read[2])).sum())} voxels)")
    if label is None:
        return problems
    read_label = _problem_or(problems, lambda: _volume(label))
    if read is None or read_label is None:
        return problems
    (shape, affine, _), (label_shape, label_affine, labels) = read, read_label
    if label_shape != shape:
        problems.append(f"{label}: segmentation shape {label_shape} differs from its volume {image.name} {shape}; "
                        "expected the same voxel grid")  # fmt: skip
    elif not np.allclose(label_affine, affine, rtol=0, atol=_AFFINE_TOLERANCE_MM):
        problems.append(f"{label}: affine differs from its volume {image.name}'s (largest difference "
                        f"{np.abs(label_affine - affine).max():.3g} mm); the labels would land on other voxels: "
                        f"write the segmentation with its volume's affine\n      {_rows(label_affine)} vs "
                        f"{_rows(affine)}")  # fmt: skip
    if not _finite(labels) or not np.isin(labels, np.arange(classes)).all():
        problems.append(f"{label}: label values {_unexpected(labels, range(classes))} outside 0..{classes - 1} "
                        "(the dataset's classes)")  # fmt: skip
    return problems


def _rows(affine: np.ndarray) -> str:
    return np.array2string(affine[:3], precision=3, separator=",").replace("\n", "")


def _problem_or(problems: list[str], read):
    try:
        return read()
    except Unreadable as err:
        problems.append(f"{err.path}: unreadable ({err})")
    except DatasetError as err:
        problems.append(str(err))
    return None


def _map(function: Callable, items: list, workers: int) -> list:
    """``[function(item) ...]``, on threads when ``workers > 1`` (decoding and gzip release the GIL)."""
    if workers <= 1 or len(items) <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(function, items))


def _raise_if(problems: list[str], what: str, fix: str) -> None:
    if problems:
        shown = problems[:50] + ([f"... and {len(problems) - 50} more"] if len(problems) > 50 else [])
        raise DatasetError(f"{len(problems)} problem(s) in {what}; nothing was trained or written:\n  "
                           + "\n  ".join(shown) + f"\n{fix}")  # fmt: skip


def preflight_data(
    datalist: str, dataset_dir: str, dataset: str, keys: Sequence[str] = ("training",), labels: bool = True,
    workers: int = 4,
) -> None:  # fmt: skip
    """Open every file of the ``keys`` splits of ``datalist`` once (``labels``: the masks too) and raise one
    :class:`DatasetError` listing every bad file and what is wrong with it."""
    info = get_dataset(dataset, "dataset_name")
    listed = json.loads(Path(datalist).read_text())
    base = Path(dataset_dir)
    jobs = []
    for key in keys:
        for record in listed.get(key, []):
            image = base / record["image"]
            label = base / record["label"] if labels and isinstance(record.get("label"), str) else None
            if info.spatial_dims == 3:
                jobs.append(lambda image=image, label=label: _check_pair_3d(image, label, len(info.classes)))
            else:
                allowed = info.mask_values
                jobs.append(lambda image=image, label=label, allowed=allowed: _check_pair_2d(image, label, allowed))
    problems = [p for found in _map(lambda job: job(), jobs, workers) for p in found]
    _raise_if(problems, f"the {'/'.join(keys)} data of {datalist}",
              "fix or replace these files (or rebuild the datalist without them: `python -m tpp_monai datalist "
              f"{info.name} --root ... --skip-bad`)")  # fmt: skip
    logger.info("preflight: %d %s record(s) of %s read and checked", len(jobs), "/".join(keys), datalist)


def _kind_fits(path: Path, spatial_dims: int) -> bool:
    name = path.name.lower()
    return name.endswith(VOLUME_SUFFIXES) if spatial_dims == 3 else name.endswith(IMAGE_SUFFIXES_2D)


def preflight_inference(files: list[dict], dataset: str, skip_bad_files: object = False, workers: int = 4):
    """The inference inputs of ``files`` (``[{"image": path}]``) that this bundle can read: files of the other
    kind (volumes for a 2D bundle, 2D images or DICOM for a 3D one) are left out with a note; unreadable files stop
    the run with one message naming each, or are left out and named with ``skip_bad_files``."""
    info = get_dataset(dataset, "dataset_name")
    skip = skip_bad_files is True or str(skip_bad_files).lower() == "true"
    fitting = [r for r in files if _kind_fits(Path(r["image"]), info.spatial_dims)]
    other = [Path(r["image"]).name for r in files if r not in fitting]
    if other:
        kind = "3D volumes (.nii, .nii.gz)" if info.spatial_dims == 3 else "2D images"
        logger.warning("skipping %d file(s) that are not %s, the inputs of this bundle: %s", len(other), kind,
                       ", ".join(other))  # fmt: skip
    if info.spatial_dims == 3:
        found = _map(lambda r: _check_pair_3d(Path(r["image"]), None, 0), fitting, workers)
    else:
        found = _map(lambda r: _check_pair_2d(Path(r["image"]), None, None), fitting, workers)
    bad = {r["image"]: problems for r, problems in zip(fitting, found) if problems}
    if bad and not skip:
        _raise_if([p for v in bad.values() for p in v], "the input folder",
                  "fix or remove these files, or pass --skip_bad_files true to skip them")  # fmt: skip
    if bad:
        listed = "\n  ".join(p for v in bad.values() for p in v)
        logger.warning("skipping %d unreadable input(s) (--skip_bad_files):\n  %s", len(bad), listed)
    kept = [r for r in fitting if not bad.get(r["image"])]
    if not kept:
        raise DatasetError(f"no input left to run on: {len(files)} file(s), {len(other)} of another kind, {len(bad)} "
                           "unreadable")  # fmt: skip
    return kept
