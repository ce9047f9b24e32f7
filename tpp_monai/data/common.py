"""Shared parts of the datalist builders: layout roots, CSV tables, file checks, seeded splits, label fractions.

Every problem a user can cause ends in one :class:`~tpp_monai.errors.DatasetError` that names the file or folder,
what was expected and what was found. Nothing is dropped silently: with ``skip_bad`` only *unreadable* files are
skipped, and each one is recorded (:class:`FileChecker.skipped`) so the builder can print it and store it in the
datalist.
"""

from __future__ import annotations

import csv
import math
import os
import random
import re
import struct
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from tpp_monai.errors import ConfigError, DatasetError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# Files an unpacked download may carry that are not data: macOS resource forks, Finder and Windows thumbnails.
_JUNK_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini", "__MACOSX"}
_SKIP_HINT = "re-download or re-extract it, or pass --skip-bad to skip unreadable files (each one is listed)"

T = TypeVar("T")


class Unreadable(Exception):
    """A file exists but cannot be decoded (truncated, corrupt, wrong format). ``--skip-bad`` may skip these."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(reason)
        self.path = path


def natural_key(text: str) -> tuple:
    """Sort key that orders ``volume-2`` before ``volume-10`` (numbered names in the official layouts)."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text))


def is_junk(path: Path) -> bool:
    """Hidden files and archive debris (``._x``, ``.DS_Store``, ``__MACOSX``) are not part of any layout."""
    return path.name.startswith(".") or path.name in _JUNK_NAMES


def listdir(folder: Path) -> list[Path]:
    """The folder's entries without junk, in natural order (so every run sees the same order)."""
    return sorted((p for p in folder.iterdir() if not is_junk(p)), key=lambda p: natural_key(p.name))


def rel(path: Path, root: Path) -> str:
    """Path relative to the layout root, with forward slashes (the datalist form)."""
    return path.relative_to(root).as_posix()


def describe_folder(folder: Path, limit: int = 12) -> str:
    """A short listing of a folder for error messages: what was found instead of the expected layout."""
    try:
        entries = listdir(folder)
    except OSError as err:
        return f"an unreadable folder ({err.strerror})"
    if not entries:
        return "an empty folder"
    names = [p.name + ("/" if p.is_dir() else "") for p in entries[:limit]]
    more = f", ... ({len(entries) - limit} more)" if len(entries) > limit else ""
    return ", ".join(names) + more


def find_layout_root(root: str | Path, is_layout: Callable[[Path], bool], expected: str, max_depth: int = 3) -> Path:
    """Find the folder that holds a dataset's official layout: ``root`` itself or a folder below it.

    Downloads unpack with extra levels (``RetinalOCT_Dataset/RetinalOCT_Dataset/``, ``QaTa-COV19/QaTa-COV19-v2/``,
    ``kits19/data/``), so the search goes breadth-first up to ``max_depth`` levels; the shallowest match wins and two
    matches at the same depth are an error (the user must say which one).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        found = "a file" if root.exists() else "nothing there"
        raise DatasetError(f"dataset root {root}: expected a folder holding {expected}; found {found}")
    level = [root]
    for _ in range(max_depth + 1):
        hits = [d for d in level if is_layout(d)]
        if len(hits) > 1:
            raise DatasetError(
                f"dataset root {root}: expected one folder holding {expected}; found {len(hits)}: "
                f"{', '.join(str(h) for h in hits)}; pass the one you mean as the root"
            )
        if hits:
            return hits[0]
        # A cap keeps a mistaken root (a home folder) from turning into a crawl of the whole disk.
        level = [c for d in level[:200] for c in _subdirs(d)]
    # A folder inside the layout (``QaTa-COV19-v2/Train Set``) is not accepted, but the message says where to point.
    above = next((p for p in root.resolve().parents[:2] if is_layout(p)), None)
    hint = f"; the layout is at {above}: pass that folder" if above else ""
    raise DatasetError(
        f"dataset root {root}: expected a folder holding {expected} (the root or a folder up to {max_depth} "
        f"levels below it); found {describe_folder(root)}{hint}"
    )


def _subdirs(folder: Path) -> list[Path]:
    try:
        return [p for p in listdir(folder) if p.is_dir()]
    except OSError:
        return []


def read_csv_table(path: Path, required: Sequence[str], what: str) -> list[tuple[int, dict[str, str]]]:
    """Read a CSV with a header row into ``(line number, row)`` pairs; names and values are stripped.

    The official tables have quirks this absorbs: GlaS ``Grade.csv`` puts a space before some column names and
    values, and may use old-Mac CR-only line ends (``newline=""`` lets the csv module accept CR, LF and CRLF);
    a UTF-8 byte-order mark is dropped. A missing column or a short row is a :class:`DatasetError`.
    """
    if not path.is_file():
        raise DatasetError(f"{path}: expected {what}; found {'a folder' if path.exists() else 'no such file'}")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except (UnicodeDecodeError, csv.Error) as err:
        raise DatasetError(f"{path}: expected {what} as a UTF-8 CSV; could not parse it ({err})") from None
    if not rows:
        raise DatasetError(f"{path}: expected {what} with a header row; found an empty file")
    header = [h.strip() for h in rows[0][1]]
    missing = [c for c in required if c not in header]
    if missing:
        raise DatasetError(
            f"{path}: missing column(s) {', '.join(repr(c) for c in missing)}; expected columns "
            f"{', '.join(repr(c) for c in required)}; found {', '.join(repr(h) for h in header)}"
        )
    table = []
    for line, row in rows[1:]:
        if len(row) != len(header):
            raise DatasetError(f"{path}, line {line}: expected {len(header)} fields; found {len(row)}: {row}")
        table.append((line, {h: v.strip() for h, v in zip(header, row)}))
    return table


# --------------------------------------------------------------------------------------------------------------
# Reading files cheaply enough for 24,000 images, exactly enough to catch truncated ones.


@dataclass(frozen=True)
class ImageHeader:
    """What the builders need to know about a 2D image: size as (width, height), PIL mode and format."""

    size: tuple[int, int]
    mode: str
    format: str


def probe_image(path: Path) -> ImageHeader:
    """Open a 2D image and prove it is complete without decoding every pixel where a cheaper proof exists.

    PNG: ``verify()`` walks every chunk and checks its CRC, so a truncated or damaged file fails. JPEG: a complete
    file ends with the EOI marker; files that do not are fully decoded (which fails exactly when they are
    truncated). Other formats (BMP, TIFF) are decoded. This keeps a 24,000-image OCT-C8 check at a few seconds.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            header = ImageHeader(im.size, im.mode, im.format or "")
            if header.format == "PNG":
                im.verify()
            elif header.format != "JPEG" or im.fp is None or not _ends_with_eoi(im.fp):
                im.load()
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError) as err:
        raise Unreadable(path, f"cannot decode it as an image ({err})") from None
    return header


def _ends_with_eoi(fp: Any) -> bool:
    """True when a JPEG stream ends with its end-of-image marker (zero padding after it is allowed)."""
    fp.seek(0, os.SEEK_END)
    fp.seek(max(0, fp.tell() - 64))
    return fp.read().rstrip(b"\x00").endswith(b"\xff\xd9")


def mask_mode(im: Any) -> Any:
    """Bring a mask to one channel the way the papers' loaders read it.

    Palette ("P") and integer modes keep their stored values (GlaS instance ids); RGB/LA/1-bit masks become 8-bit
    grey, as ``cv2.imread(path, 0)`` in MedCoSS does for QaTa. Shared by the builder checks and the transforms.
    """
    if im.mode in ("P", "L", "I", "I;16", "I;16B", "I;16L", "I;16N"):
        return im
    return im.convert("L")


def read_mask(path: Path) -> tuple[tuple[int, int], np.ndarray]:
    """Decode a 2D mask: ``((width, height), values)``; failures raise :class:`Unreadable`."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            size = im.size
            values = np.asarray(mask_mode(im))
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError) as err:
        raise Unreadable(path, f"cannot decode it as a mask image ({err})") from None
    return size, values


@dataclass(frozen=True)
class VolumeHeader:
    """Shape and voxel size of a NIfTI volume, read from its header."""

    shape: tuple[int, ...]
    zooms: tuple[float, ...]


def probe_volume(path: Path) -> VolumeHeader:
    """Read a NIfTI header and check the file holds all the voxels the header promises, without reading them.

    ``.nii``: the file size must reach ``vox_offset + voxels x itemsize``. ``.nii.gz``: gzip stores the unpacked
    size (mod 2**32) in its last 4 bytes; when it disagrees (a truncated file, or an unusual multi-member gzip) the
    data are unpacked for real, which fails exactly when the file is damaged.
    """
    import nibabel as nib

    try:
        img = nib.load(str(path))
        header = img.header
        shape = tuple(int(s) for s in img.shape)
        need = int(header.get_data_offset()) + int(np.prod(shape)) * header.get_data_dtype().itemsize
        if path.name.endswith(".gz"):
            with path.open("rb") as f:
                f.seek(-4, os.SEEK_END)
                stored = struct.unpack("<I", f.read(4))[0]
            if stored != need % 2**32:
                np.asanyarray(img.dataobj)
        elif path.stat().st_size < need:
            raise Unreadable(path, f"truncated: the header needs {need} bytes; the file has {path.stat().st_size}")
        zooms = tuple(float(z) for z in header.get_zooms()[: len(shape)])
    except Unreadable:
        raise
    except Exception as err:  # nibabel raises many types (ImageFileError, OSError, EOFError, zlib.error, ...)
        raise Unreadable(path, f"cannot read it as NIfTI ({type(err).__name__}: {err})") from None
    return VolumeHeader(shape, zooms)


def read_label_volume(path: Path) -> np.ndarray:
    """Read a NIfTI segmentation's voxels; failures raise :class:`Unreadable`."""
    import nibabel as nib

    try:
        return np.asanyarray(nib.load(str(path)).dataobj)
    except Exception as err:  # see probe_volume
        raise Unreadable(path, f"cannot read its voxels ({type(err).__name__}: {err})") from None


def unexpected_values(values: np.ndarray, allowed: Iterable[int]) -> list[float]:
    """The values in ``values`` outside ``allowed`` (empty when all are allowed); fast for big uint8 volumes."""
    allowed = sorted(allowed)
    if np.issubdtype(values.dtype, np.integer) and values.size and allowed == list(range(allowed[0], allowed[-1] + 1)):
        if values.min() >= allowed[0] and values.max() <= allowed[-1]:
            return []
    elif np.isin(values, allowed).all():
        return []
    found = np.unique(values)
    return [v.item() for v in found if v not in allowed]


# --------------------------------------------------------------------------------------------------------------
# Running checks over many files: unreadable files either stop the build or are skipped and listed.


@dataclass
class FileChecker:
    """Runs a check over many files and applies the ``skip_bad`` policy to :class:`Unreadable` ones.

    Args:
        root: the layout root (messages and the skipped list show paths relative to it).
        skip_bad: skip unreadable files (and everything that needs them) instead of stopping.
        workers: threads; the 3D checks unpack gzip and read big files, which releases the GIL.
    """

    root: Path
    skip_bad: bool = False
    workers: int = 1
    skipped: list[dict[str, str]] = field(default_factory=list)

    def run(self, items: Sequence[T], check: Callable[[T], Any]) -> list[tuple[T, Any]]:
        """Check every item; returns ``(item, result)`` for the items that passed, in order.

        The first problem in item order stops the build: a :class:`DatasetError` from ``check`` as it is, an
        unreadable file with a message that names it and how many others are unreadable (unless ``skip_bad``; then
        the item is left out and the file is recorded in :attr:`skipped`).
        """

        def outcome(item: T) -> Any:
            try:
                return check(item)
            except (Unreadable, DatasetError) as err:
                return err

        if self.workers > 1 and len(items) > 1:
            with ThreadPoolExecutor(self.workers) as pool:
                outcomes = list(pool.map(outcome, items))
        else:
            outcomes = [outcome(item) for item in items]
        unreadable = [o for o in outcomes if isinstance(o, Unreadable)]
        for o in outcomes:
            if isinstance(o, DatasetError):
                raise o
            if isinstance(o, Unreadable) and not self.skip_bad:
                others = f" ({len(unreadable) - 1} more unreadable file(s) after it)" if len(unreadable) > 1 else ""
                raise DatasetError(f"{o.path}: expected a complete, readable file; {o}{others}; {_SKIP_HINT}")
        self.skipped.extend({"path": rel(o.path, self.root), "reason": str(o)} for o in unreadable)
        return [(item, o) for item, o in zip(items, outcomes) if not isinstance(o, Unreadable)]


def check_groups(checker: FileChecker, groups: dict[str, list[dict]], check: Callable[[dict], Any]) -> dict[str, list]:
    """Check the records of several lists in one pass (so an error can count every unreadable file); returns each
    list without the records whose files were skipped."""
    passed = {id(r) for r, _ in checker.run([r for records in groups.values() for r in records], check)}
    return {key: [r for r in records if id(r) in passed] for key, records in groups.items()}


def check_images(checker: FileChecker, groups: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """:func:`check_groups` with :func:`probe_image` on each record's ``image``."""
    return check_groups(checker, groups, lambda r: probe_image(checker.root / r["image"]))


# --------------------------------------------------------------------------------------------------------------
# Splits: sort first, then (optionally) a seeded shuffle, then a cut, as MedCoSS does.


def cut(names: Iterable[str], fractions: Sequence[float], seed: int | None) -> list[list[str]]:
    """The MedCoSS split rule: ``sorted()`` names, a ``random.Random(seed).shuffle`` unless ``seed`` is None, then
    consecutive parts of ``int(f * n)`` names for each fraction ``f``, and a last part with the rest.

    ``int()`` of the float product is kept on purpose: it is what MedCoSS computes, and it reproduces the paper's
    counts (GlaS 29+38 of 37+48, QaTa 5716 of 7145, Chest X-ray 1067/305 of 1525); the rest takes what ``int``
    leaves, so nothing is lost to rounding.
    """
    order = sorted(names)
    if seed is not None:
        random.Random(seed).shuffle(order)
    parts, start = [], 0
    for f in fractions:
        k = int(f * len(order))
        parts.append(order[start : start + k])
        start += k
    return [*parts, order[start:]]


def subsample_labels(records: list[dict], fraction: float, seed: int) -> list[dict]:
    """Keep a seeded, per-class stratified ``fraction`` of the training records (the paper's Figure 4 experiment).

    Strata: the integer class label for classification, the GlaS grade (benign/malignant, the categories its
    validation split is drawn per) where records carry one, otherwise one stratum. Per stratum: records sorted by
    image path, shuffled with ``random.Random(seed)``, and the first ``max(1, round_half_up(fraction * n))``
    kept, so for one seed a smaller fraction is always a subset of a larger one. Record order is preserved.
    """
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"label fraction must be in (0, 1]; got {fraction}")
    strata: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        key = r["label"] if isinstance(r.get("label"), int) else r.get("grade", "")
        strata.setdefault(str(key), []).append(i)
    keep: set[int] = set()
    for key in sorted(strata):
        members = sorted(strata[key], key=lambda i: records[i]["image"])
        random.Random(seed).shuffle(members)
        n_keep = min(len(members), max(1, math.floor(fraction * len(members) + 0.5)))
        keep.update(members[:n_keep])
    return [dict(r) for i, r in enumerate(records) if i in keep]


@dataclass(frozen=True)
class Builder:
    """How to find and read one dataset's official layout (the ``builder`` of its entry in
    :data:`tpp_monai.data.info.DATASETS`).

    Args:
        is_layout: true for the folder that holds the layout (used to accept an outer download folder).
        expected: the layout in words, for the error when no such folder is found.
        build: ``build(layout_root, seed, checker, classes)`` reads the layout root and returns the three lists (see
            :class:`Built`); ``classes`` are the entry's, in label-index order.
        workers: threads for the file checks (see :class:`FileChecker`).
    """

    is_layout: Callable[[Path], bool]
    expected: str
    build: Callable[[Path, int, FileChecker, tuple[str, ...]], Built]
    workers: int = 1


@dataclass
class Built:
    """What a builder found: the three lists plus how they were made (becomes the datalist's metadata).

    ``notes`` name what the download holds but the datalist does not use (unlabelled test volumes, ...);
    ``missing`` the cases of a fixed list that the download lacks.
    """

    training: list[dict]
    validation: list[dict]
    test: list[dict]
    split_rule: dict[str, str]
    root_layout: str
    seed_used: bool = True
    notes: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
