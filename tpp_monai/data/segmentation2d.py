"""Datalist builders for the 2D segmentation sets: GlaS and QaTa-COV19-v2.

Records: ``{"image": <image path>, "label": <mask path>, ...}``, both relative to the layout root. Masks stay as
published (GlaS instance ids, QaTa 0/255); the transforms binarise them (``datasets.md`` §0.2).
"""

from __future__ import annotations

import re
from pathlib import Path

from tpp_monai.data.common import (
    IMAGE_SUFFIXES,
    Builder,
    Built,
    FileChecker,
    check_groups,
    cut,
    listdir,
    natural_key,
    probe_image,
    read_csv_table,
    read_mask,
    rel,
    unexpected_values,
)
from tpp_monai.errors import DatasetError

GLAS_CSV = "Grade.csv"
GLAS_COLUMNS = ("name", "patient ID", "grade (GlaS)")
GLAS_GRADES = ("benign", "malignant")
_GLAS_NAME = re.compile(r"^(train|testA|testB)_\d+$")
QATA_SETS = {"train": "Train Set", "test": "Test Set"}
QATA_MASK_VALUES = (0, 255)


def check_pair(root: Path, record: dict, allowed: tuple[int, ...] | None = None) -> None:
    """An image and its mask must both decode, have the same size, and (if ``allowed``) only allowed mask values."""
    image, mask = root / record["image"], root / record["label"]
    image_size = probe_image(image).size
    mask_size, values = read_mask(mask)
    if mask_size != image_size:
        raise DatasetError(
            f"{mask}: mask size {mask_size[0]}x{mask_size[1]} differs from its image {image.name} "
            f"({image_size[0]}x{image_size[1]}); expected the same width x height"
        )
    if allowed is not None:
        bad = unexpected_values(values, allowed)
        if bad:
            raise DatasetError(
                f"{mask}: unexpected mask value(s) {bad[:8]}; expected only {list(allowed)} (background, foreground)"
            )


def _checked(checker: FileChecker, groups: dict[str, list[dict]], allowed: tuple[int, ...] | None = None) -> dict:
    passed = check_groups(checker, groups, lambda r: check_pair(checker.root, r, allowed))
    return {key: sorted(records, key=lambda r: natural_key(r["image"])) for key, records in passed.items()}


def build_glas(root: Path, seed: int, checker: FileChecker, classes: tuple[str, ...] = ()) -> Built:
    """GlaS: ``Grade.csv`` names every image; test = testA + testB (80); validation = the MedCoSS rule per GlaS
    grade: string-sorted train names, the last ``n - int(0.8 n)`` (``Glas/DSDataset.py``), giving exactly 67/18/80
    and the membership in ``data_lists/glas.json``. The rule is deterministic: no seed."""
    csv_path = root / GLAS_CSV
    table = read_csv_table(csv_path, GLAS_COLUMNS, "the GlaS grade table")
    records: dict[str, dict] = {}
    for line, row in table:
        name, grade, patient = row["name"], row["grade (GlaS)"].lower(), row["patient ID"]
        where = f"{csv_path}, line {line}"
        if not _GLAS_NAME.match(name):
            raise DatasetError(f"{where}: unexpected image name {name!r}; expected train_N, testA_N or testB_N")
        if grade not in GLAS_GRADES:
            raise DatasetError(
                f"{where}: unexpected grade {grade!r} for {name}; expected one of {', '.join(GLAS_GRADES)}"
            )
        if not patient.isdigit():
            raise DatasetError(f"{where}: unexpected patient ID {patient!r} for {name}; expected an integer")
        if name in records:
            raise DatasetError(f"{where}: {name} is listed twice; expected one row per image")
        image, mask = root / f"{name}.bmp", root / f"{name}_anno.bmp"
        if not image.is_file():
            raise DatasetError(f"{image}: listed in {where}; expected the image there; found no such file")
        if not mask.is_file():
            raise DatasetError(f"{image}: image without its mask; expected {mask.name} next to it; found no such file")
        records[name] = {
            "image": image.name,
            "label": mask.name,
            "name": name,
            "grade": grade,
            "patient_id": int(patient),
        }
    known = {f for r in records.values() for f in (r["image"], r["label"])}
    extra = [p for p in listdir(root) if p.suffix.lower() == ".bmp" and p.name not in known]
    if extra:
        raise DatasetError(
            f"{extra[0]}: not listed in {csv_path} ({len(extra)} such file(s)); expected a row per image"
        )
    good = {r["name"] for r in _checked(checker, {"all": list(records.values())})["all"]}
    train = [n for n in records if n.startswith("train_") and n in good]
    val_names: list[str] = []
    for grade in GLAS_GRADES:
        val_names += cut([n for n in train if records[n]["grade"] == grade], (0.8,), None)[1]

    def pick(names: list[str]) -> list[dict]:
        return sorted((records[n] for n in names), key=lambda r: natural_key(r["name"]))

    return Built(
        pick([n for n in train if n not in val_names]),
        pick(val_names),
        pick([n for n in records if n.startswith("test") and n in good]),
        split_rule={
            "test": "official: testA_* + testB_* (Grade.csv)",
            "training": "official train_* minus the validation cut",
            "validation": "carved from train_* by the MedCoSS rule (Glas/DSDataset.py): per GlaS grade, "
            "sorted() names as strings, the last n - int(0.8 n); deterministic, no seed",
        },
        root_layout="{train,testA,testB}_N.bmp + {...}_N_anno.bmp (instance masks) + Grade.csv",
        seed_used=False,
    )


def _qata_pairs(root: Path, folder: str) -> list[dict]:
    images_dir, masks_dir = root / folder / "Images", root / folder / "Ground-truths"
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise DatasetError(
                f"{d}: expected this folder of the QaTa-COV19-v2 layout; found {'a file' if d.exists() else 'nothing'}"
            )
    images = [p for p in listdir(images_dir) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise DatasetError(f"{images_dir}: empty; expected the {folder} chest X-ray images (*.png)")
    masks = {p.name for p in listdir(masks_dir)}
    records = []
    for image in images:
        mask = masks_dir / f"mask_{image.name}"
        if mask.name not in masks:
            raise DatasetError(
                f"{image}: image without its mask; expected {rel(mask, root)} (Ground-truths/mask_<image name>); "
                "found no such file"
            )
        records.append({"image": rel(image, root), "label": rel(mask, root)})
    orphans = sorted(masks - {f"mask_{p.name}" for p in images}, key=natural_key)
    if orphans:
        raise DatasetError(
            f"{masks_dir / orphans[0]}: mask without its image ({len(orphans)} such file(s)); expected "
            f"Images/{orphans[0].removeprefix('mask_')}"
        )
    return records


def build_qata(root: Path, seed: int, checker: FileChecker, classes: tuple[str, ...] = ()) -> Built:
    """QaTa-COV19-v2: ``Test Set`` is the test split (2113); ``Train Set`` (7145) is cut 80/20 into training and
    validation as MedCoSS ``Preprocess/QaTav2.py`` does (``random.seed(0)`` + shuffle, first ``int(0.8 n)``), but
    on ``sorted()`` names instead of the filesystem's ``os.listdir`` order, so the split is the same everywhere."""
    pairs = _checked(checker, {key: _qata_pairs(root, folder) for key, folder in QATA_SETS.items()}, QATA_MASK_VALUES)
    by_image = {r["image"]: r for r in pairs["train"]}
    parts = cut(by_image, (0.8,), seed)
    training, validation = ([by_image[n] for n in sorted(p, key=natural_key)] for p in parts)
    return Built(
        training,
        validation,
        pairs["test"],
        split_rule={
            "test": "official: Test Set",
            "training": "Train Set: sorted image paths, random.Random(seed).shuffle, the first int(0.8 n)",
            "validation": "carved from Train Set: the remaining n - int(0.8 n) of the same shuffle (MedCoSS "
            "Preprocess/QaTav2.py with seed 0, on sorted names instead of os.listdir order)",
        },
        root_layout="QaTa-COV19-v2/{Train Set,Test Set}/{Images/<name>.png, Ground-truths/mask_<name>.png}",
    )


GLAS_BUILDER = Builder(
    lambda d: (d / GLAS_CSV).is_file(),
    "Grade.csv and the {train,testA,testB}_N.bmp + _anno.bmp files (GlaS: Warwick_QU_Dataset/)",
    build_glas,
)
QATA_BUILDER = Builder(
    lambda d: all((d / f).is_dir() for f in QATA_SETS.values()),
    "'Train Set/' and 'Test Set/' (QaTa-COV19/QaTa-COV19-v2/ of the Kaggle download)",
    build_qata,
)
