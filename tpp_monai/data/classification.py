"""Datalist builders for the three classification sets: MHIST, Retinal OCT-C8, Chest X-ray PA.

Records: ``{"image": <path relative to the layout root>, "label": <index into DatasetInfo.classes>,
"class_name": <official label>}``. Class indices follow ``DatasetInfo.classes`` (alphabetical, as MedCoSS's
ImageFolder-style loaders number them; ``datasets.md`` §0.1).
"""

from __future__ import annotations

from pathlib import Path

from tpp_monai.data.common import (
    IMAGE_SUFFIXES,
    Builder,
    Built,
    FileChecker,
    check_images,
    cut,
    listdir,
    natural_key,
    read_csv_table,
    rel,
)
from tpp_monai.errors import DatasetError

MHIST_CSV = "annotations.csv"
MHIST_COLUMNS = ("Image Name", "Majority Vote Label", "Partition")
OCT_SPLITS = {"training": "train", "validation": "val", "test": "test"}


def _record(path: str, classes: tuple[str, ...], name: str) -> dict:
    return {"image": path, "label": classes.index(name), "class_name": name}


def _by_image(records: list[dict]) -> list[dict]:
    return sorted(records, key=lambda r: natural_key(r["image"]))


def class_folder_records(folder: Path, classes: tuple[str, ...], root: Path) -> list[dict]:
    """One record per image in ``folder/<class>/``; every class folder must exist and hold only images.

    A folder that is not a class, a missing or empty class folder, or a non-image file stops the build, so a
    wrong download version or a half-extracted archive is caught before any training.
    """
    if not folder.is_dir():
        raise DatasetError(f"{folder}: expected a folder with the class folders {', '.join(classes)}; found nothing")
    unknown = [p.name for p in listdir(folder) if p.is_dir() and p.name not in classes]
    if unknown:
        raise DatasetError(
            f"{folder}: unexpected folder(s) {', '.join(unknown)}; expected only the class folders {', '.join(classes)}"
        )
    records = []
    for name in classes:
        class_dir = folder / name
        if not class_dir.is_dir():
            raise DatasetError(f"{class_dir}: expected the class folder of {name!r}; found nothing")
        files = listdir(class_dir)
        if not files:
            raise DatasetError(
                f"{class_dir}: empty class folder; expected {name!r} images ({', '.join(IMAGE_SUFFIXES)})"
            )
        for p in files:
            if p.is_dir() or p.suffix.lower() not in IMAGE_SUFFIXES:
                raise DatasetError(
                    f"{p}: unexpected {'folder' if p.is_dir() else 'file'} in a class folder; "
                    f"expected only images ({', '.join(IMAGE_SUFFIXES)})"
                )
            records.append(_record(rel(p, root), classes, name))
    return records


def split_per_class(records: list[dict], fractions: tuple[float, ...], seed: int) -> list[list[dict]]:
    """Apply :func:`~tpp_monai.data.common.cut` to each class separately (the paper's "from each category")."""
    parts: list[list[dict]] = [[] for _ in range(len(fractions) + 1)]
    by_path = {r["image"]: r for r in records}
    for label in sorted({r["label"] for r in records}):
        names = [r["image"] for r in records if r["label"] == label]
        for part, chosen in zip(parts, cut(names, fractions, seed)):
            part.extend(by_path[n] for n in chosen)
    return [_by_image(p) for p in parts]


def build_mhist(root: Path, seed: int, checker: FileChecker, classes: tuple[str, ...]) -> Built:
    """MHIST: ``annotations.csv`` gives label and official partition (train 2,175 / test 977); 20% of each class of
    the official train partition is drawn for validation with a seeded shuffle (paper §4.1) -> 1740/435/977."""
    csv_path, images = root / MHIST_CSV, root / "images"
    table = read_csv_table(csv_path, MHIST_COLUMNS, "the MHIST annotation table")
    on_disk = {p.name for p in listdir(images)}
    partitions: dict[str, list[dict]] = {"train": [], "test": []}
    listed: set[str] = set()
    for line, row in table:
        name, label, part = row["Image Name"], row["Majority Vote Label"].upper(), row["Partition"].lower()
        where = f"{csv_path}, line {line}"
        if label not in classes:
            raise DatasetError(f"{where}: unexpected label {label!r} for {name}; expected one of {', '.join(classes)}")
        if part not in partitions:
            raise DatasetError(f"{where}: unexpected partition {part!r} for {name}; expected 'train' or 'test'")
        if name in listed:
            raise DatasetError(f"{where}: {name} is listed twice; expected one row per image")
        if name not in on_disk:
            raise DatasetError(f"{images / name}: listed in {where}; expected the image there; found no such file")
        listed.add(name)
        partitions[part].append(_record(f"images/{name}", classes, label))
    extra = sorted(on_disk - listed, key=natural_key)
    if extra:
        raise DatasetError(
            f"{images / extra[0]}: not listed in {csv_path} ({len(extra)} such file(s)); expected a row for every image"
        )
    partitions = check_images(checker, partitions)
    training, validation = split_per_class(partitions["train"], (0.8,), seed)
    return Built(
        training,
        validation,
        _by_image(partitions["test"]),
        split_rule={
            "test": "official: Partition == 'test' in annotations.csv",
            "training": "official Partition == 'train', minus the validation draw",
            "validation": "carved from the official train partition: per class, sorted names, "
            "random.Random(seed).shuffle, the last n - int(0.8 n) of each class",
        },
        root_layout="images/*.png + annotations.csv (columns Image Name, Majority Vote Label, Partition)",
    )


def build_oct_c8(root: Path, seed: int, checker: FileChecker, classes: tuple[str, ...]) -> Built:
    """Retinal OCT-C8: the official ``train/``, ``val/`` and ``test/`` class folders unchanged (18400/2800/2800)."""
    lists = {key: class_folder_records(root / folder, classes, root) for key, folder in OCT_SPLITS.items()}
    lists = check_images(checker, lists)
    return Built(
        *(_by_image(lists[k]) for k in OCT_SPLITS),
        split_rule={key: f"official: the {folder}/ class folders" for key, folder in OCT_SPLITS.items()},
        root_layout="{train,val,test}/{AMD,CNV,CSR,DME,DR,DRUSEN,MH,NORMAL}/*.jpg",
        seed_used=False,
    )


def build_chest_xray_pa(root: Path, seed: int, checker: FileChecker, classes: tuple[str, ...]) -> Built:
    """Chest X-ray PA (Mendeley V1, 1,525 images per class): no official split; per class 70/10/20 with a seeded
    shuffle (paper §4.1). ``int(0.7 n)`` train, ``int(0.2 n)`` test, the rest validation -> 3201/459/915."""
    records = class_folder_records(root, classes, root)
    records = check_images(checker, {"all": records})["all"]
    training, test, validation = split_per_class(records, (0.7, 0.2), seed)
    notes = ["metadata.csv is not read: the class folders are the labels"] if (root / "metadata.csv").exists() else []
    return Built(
        training,
        validation,
        test,
        split_rule={
            "training": "per class: sorted paths, random.Random(seed).shuffle, the first int(0.7 n)",
            "test": "per class: the next int(0.2 n) of the same shuffle",
            "validation": "per class: the remaining n - int(0.7 n) - int(0.2 n) (153 of 1525)",
        },
        root_layout="{covid,normal,pneumonia}/*.{png,jpg,jpeg} (+ metadata.csv, unused)",
        notes=notes,
    )


def _has_dirs(*names: str):
    return lambda d: all((d / n).is_dir() for n in names)


MHIST_BUILDER = Builder(
    lambda d: (d / MHIST_CSV).is_file() and (d / "images").is_dir(),
    "images/ and annotations.csv (the MHIST download)",
    build_mhist,
)
OCT_C8_BUILDER = Builder(
    _has_dirs(*OCT_SPLITS.values()),
    "train/, val/ and test/ (Retinal OCT-C8: RetinalOCT_Dataset/RetinalOCT_Dataset/)",
    build_oct_c8,
)
CHEST_XRAY_PA_BUILDER = Builder(
    _has_dirs("covid", "normal", "pneumonia"),
    "covid/, normal/ and pneumonia/ (the Mendeley V1 Chest X-ray PA download)",
    build_chest_xray_pa,
)
