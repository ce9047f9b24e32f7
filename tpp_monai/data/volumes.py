"""Datalist builders for the 3D CT sets: LiTS and KiTS19 (paper §5.4, Table 10).

Records: ``{"image": <CT volume>, "label": <segmentation>, "case": <MOTS/MedCoSS case id>}`` with labels
0 background, 1 organ (liver / kidney), 2 tumour. The test lists are the fixed ones of TPP's lab (MedCoSS / MOTS,
``stunet.md`` §4.2); neither list has a validation set, so one is carved from the training cases with a seeded
shuffle (``int(0.8 n)`` stay in training: LiTS 83/21, KiTS19 134/34).

The lists name cases, not files, so a download that lacks some listed cases still builds (the demo volumes rely on
this): the missing ones are printed as a warning and recorded under ``missing``. Files that are present are all
checked: pairs, shapes, voxel sizes, completeness and label values (every segmentation is read once; about a
second per real case, spread over a few threads).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from tpp_monai.data.common import (
    Builder,
    Built,
    FileChecker,
    cut,
    listdir,
    natural_key,
    probe_volume,
    read_label_volume,
    rel,
    unexpected_values,
)
from tpp_monai.errors import DatasetError

LABEL_VALUES = (0, 1, 2)
# MedCoSS Downstream/Dim_3/MOTS/data_list/0Liver/0Liver_test.txt (= DoDNet MOTS_test.txt): liver_N == volume-N.
# fmt: off
LITS_TEST = (0, 4, 9, 13, 17, 21, 26, 30, 35, 44, 49, 53, 58, 62, 67, 71, 76, 80, 85, 94, 99, 102, 107, 111, 116, 120,
             125)
# fmt: on
LITS_CASES = 131
KITS_LABELLED = 210  # case_00000 .. case_00209; case_00210 .. case_00299 are the unlabelled KiTS19 test set
KITS_TEST_EVERY = 5  # MOTS / DoDNet: case_00000, case_00005, ... are the test cases
_VOLUME = re.compile(r"^volume-(\d+)\.nii(\.gz)?$")
_SEGMENTATION = re.compile(r"^segmentation-(\d+)\.nii(\.gz)?$")
_MSD = re.compile(r"^liver_(\d+)\.nii(\.gz)?$")
_KITS_CASE = re.compile(r"^case_(\d{5})$")


def check_volume_pair(root: Path, record: dict) -> None:
    """Both files complete, same voxel grid (shape and voxel size), and only the labels 0/1/2 in the mask."""
    image, label = root / record["image"], root / record["label"]
    a, b = probe_volume(image), probe_volume(label)
    if a.shape != b.shape:
        raise DatasetError(
            f"{label}: mask shape {b.shape} differs from its image {image.name} {a.shape}; expected the same"
        )
    if not np.allclose(a.zooms, b.zooms, rtol=1e-3, atol=1e-3):
        raise DatasetError(
            f"{label}: voxel size {b.zooms} differs from its image {image.name} {a.zooms}; expected the same grid"
        )
    bad = unexpected_values(read_label_volume(label), LABEL_VALUES)
    if bad:
        raise DatasetError(
            f"{label}: unexpected label value(s) {bad[:8]}; expected only 0 (background), 1 (organ), 2 (tumour)"
        )


def _split_cases(
    checker: FileChecker, records: dict[int, dict], universe: range, is_test, seed: int, name: str
) -> tuple[list[dict], list[dict], list[dict], list[str]]:
    """Check the pairs, then: fixed test cases, seeded validation cut of the rest; also the listed cases absent."""
    pairs = [records[n] for n in sorted(records)]
    by_case = {r["case"]: r for r, _ in checker.run(pairs, lambda r: check_volume_pair(checker.root, r))}
    train_ids, val_ids = cut([c for c, r in by_case.items() if not is_test(r["id"])], (0.8,), seed)

    def pick(cases) -> list[dict]:
        return [{k: v for k, v in by_case[c].items() if k != "id"} for c in sorted(cases, key=natural_key)]

    missing = [name.format(n) for n in universe if n not in records]
    return pick(train_ids), pick(val_ids), pick(c for c, r in by_case.items() if is_test(r["id"])), missing


def _lits_codalab(d: Path) -> bool:
    return any(_VOLUME.match(p.name) for p in d.glob("volume-*")) or any(
        _VOLUME.match(p.name) for p in d.glob("*/volume-*")
    )


def _lits_msd(d: Path) -> bool:
    return (d / "imagesTr").is_dir() and (d / "labelsTr").is_dir()


def _numbered(files: list[Path], pattern: re.Pattern) -> dict[int, Path]:
    found: dict[int, Path] = {}
    for p in files:
        m = pattern.match(p.name)
        if not m:
            continue
        n = int(m.group(1))
        if n in found:
            raise DatasetError(f"{p}: a second file for case {n} (the first is {found[n]}); expected one per case")
        if n >= LITS_CASES:
            raise DatasetError(
                f"{p}: case {n} is not a LiTS training case; expected numbers 0..{LITS_CASES - 1} "
                "(the 131 labelled volumes the MedCoSS list covers)"
            )
        found[n] = p
    return found


def _pair_up(images: dict[int, Path], labels: dict[int, Path], expected_label: str, root: Path) -> dict[int, dict]:
    for n, image in images.items():
        if n not in labels:
            raise DatasetError(
                f"{image}: image without its mask; expected {expected_label.format(n)}; found no such file"
            )
    for n, label in labels.items():
        if n not in images:
            raise DatasetError(f"{label}: mask without its image volume; expected the CT of case {n}; found none")
    return {
        n: {"image": rel(images[n], root), "label": rel(labels[n], root), "case": f"liver_{n}", "id": n} for n in images
    }


def build_lits(root: Path, seed: int, checker: FileChecker, classes: tuple[str, ...] = ()) -> Built:
    """LiTS: the MedCoSS 104/27 list (``lits_medcoss_split.json``; ``liver_N`` is the CodaLab ``volume-N``),
    validation carved from the 104 with a seeded shuffle. Reads the CodaLab layout (``Training Batch 1/2/
    volume-N.nii`` + ``segmentation-N.nii``) or the MSD Task03_Liver layout (``imagesTr/liver_N.nii.gz``)."""
    codalab, msd = _lits_codalab(root), _lits_msd(root)
    if codalab and msd:
        raise DatasetError(
            f"{root}: expected one LiTS layout; found both CodaLab volume-N.nii files and MSD imagesTr/labelsTr; "
            "pass a folder with only one of them"
        )
    notes = []
    if msd:
        images = _numbered(listdir(root / "imagesTr"), _MSD)
        labels = _numbered(listdir(root / "labelsTr"), _MSD)
        records = _pair_up(images, labels, "labelsTr/liver_{}.nii.gz", root)
        layout = "MSD Task03_Liver: imagesTr/liver_N.nii.gz + labelsTr/liver_N.nii.gz"
        if (root / "imagesTs").is_dir():
            notes.append("imagesTs/ (unlabelled MSD test volumes) is not used")
    else:
        files = [p for p in root.rglob("*.nii*") if not any(part.startswith(".") for part in p.relative_to(root).parts)]
        images, labels = _numbered(files, _VOLUME), _numbered(files, _SEGMENTATION)
        records = _pair_up(images, labels, "segmentation-{}.nii next to it", root)
        layout = "CodaLab: Training Batch 1/volume-N.nii + segmentation-N.nii (N 0..27), Training Batch 2 (N 28..130)"
        unlabelled = [p for p in files if p.name.startswith("test-volume-")]
        if unlabelled:
            notes.append(f"{len(unlabelled)} test-volume-N.nii file(s) (unlabelled LiTS test set) are not used")
    training, validation, test, missing = _split_cases(
        checker, records, range(LITS_CASES), lambda n: n in LITS_TEST, seed, "liver_{}"
    )
    return Built(
        training,
        validation,
        test,
        split_rule={
            "test": "fixed: the 27 cases of MedCoSS 0Liver_test.txt (= DoDNet MOTS), liver_N == volume-N",
            "training": "the other 104 cases minus the validation cut",
            "validation": "carved from the 104 training cases: sorted case ids, random.Random(seed).shuffle, "
            "the last n - int(0.8 n) (MedCoSS has no validation list)",
        },
        root_layout=layout,
        notes=notes,
        missing=missing,
    )


def _kits_layout(d: Path) -> bool:
    return any(_KITS_CASE.match(p.name) and p.is_dir() for p in d.glob("case_*"))


def build_kits(root: Path, seed: int, checker: FileChecker, classes: tuple[str, ...] = ()) -> Built:
    """KiTS19: ``case_XXXXX/{imaging,segmentation}.nii.gz``; only case_00000..case_00209 are labelled. Test = every
    fifth case (MOTS/DoDNet, ``kits_mots_split.json``): 168/42; validation carved from the 168 with a seeded
    shuffle."""
    records: dict[int, dict] = {}
    unlabelled = []
    for case_dir in listdir(root):
        m = _KITS_CASE.match(case_dir.name)
        if not m or not case_dir.is_dir():
            continue
        n = int(m.group(1))
        if n >= KITS_LABELLED:
            unlabelled.append(case_dir.name)
            continue
        image, label = case_dir / "imaging.nii.gz", case_dir / "segmentation.nii.gz"
        if not image.is_file():
            raise DatasetError(
                f"{image}: expected the CT of {case_dir.name} (the kits19 repository ships only the masks; "
                "`python -m starter_code.get_imaging` downloads the CTs); found no such file"
            )
        if not label.is_file():
            raise DatasetError(f"{image}: image without its mask; expected {rel(label, root)}; found no such file")
        records[n] = {"image": rel(image, root), "label": rel(label, root), "case": case_dir.name, "id": n}
    notes = (
        [f"{len(unlabelled)} unlabelled KiTS19 test case(s) (case_00210..case_00299) are not used"]
        if unlabelled
        else []
    )
    training, validation, test, missing = _split_cases(
        checker, records, range(KITS_LABELLED), lambda n: n % KITS_TEST_EVERY == 0, seed, "case_{:05d}"
    )
    return Built(
        training,
        validation,
        test,
        split_rule={
            "test": "fixed: every 5th case, case_00000, case_00005, ..., case_00205 (DoDNet MOTS lists)",
            "training": "the other 168 labelled cases minus the validation cut",
            "validation": "carved from the 168 training cases: sorted case ids, random.Random(seed).shuffle, "
            "the last n - int(0.8 n) (MOTS has no validation list)",
        },
        root_layout="kits19/data/case_XXXXX/{imaging,segmentation}.nii.gz (axis 0 = slices)",
        notes=notes,
        missing=missing,
    )


LITS_BUILDER = Builder(
    lambda d: _lits_codalab(d) or _lits_msd(d),
    "volume-N.nii + segmentation-N.nii (LiTS CodaLab: 'Training Batch 1/2') or imagesTr/ + labelsTr/ (MSD Task03)",
    build_lits,
    workers=4,
)
KITS_BUILDER = Builder(
    _kits_layout,
    "case_XXXXX/ folders with imaging.nii.gz + segmentation.nii.gz (kits19/data/)",
    build_kits,
    workers=4,
)
