"""Fixture trees in each dataset's official layout with the official file counts, made of tiny files.

Written independently of ``tpp_monai.data.synthetic`` (the demo writers) from the datasets' published layouts, so the
builders are tested against the documented layouts rather than against the project's own demo writer. Every file
is a real, decodable image or NIfTI volume (8x8 pixels, 4x4x2 voxels); identical bytes are written many times so
that 24,000 OCT-C8 files take about a second.

``splits/`` holds verbatim copies of the published MedCoSS (GlaS, LiTS) and MOTS (KiTS) splits.

Run ``python tests/data_fixtures/official.py data_lists`` to rewrite the shipped ``data_lists/`` from these trees.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS_DIR = Path(__file__).resolve().parent / "splits"
# MHIST partition x class counts: train 2175 = 1545 HP + 630 SSA, test 977 = 617 HP + 360 SSA (datasets.md §1).
MHIST_COUNTS = {("train", "HP"): 1545, ("train", "SSA"): 630, ("test", "HP"): 617, ("test", "SSA"): 360}
OCT_CLASSES = ("AMD", "CNV", "CSR", "DME", "DR", "DRUSEN", "MH", "NORMAL")
OCT_COUNTS = {"train": 2300, "val": 350, "test": 350}
CHEST_PER_CLASS = 1525
QATA_COUNTS = {"Train Set": 7145, "Test Set": 2113}


def load_split(name: str) -> dict:
    return json.loads((SPLITS_DIR / f"{name}.json").read_text())


def encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def rgb(size: tuple[int, int] = (8, 8), value: int = 128) -> np.ndarray:
    return np.full((*size, 3), value, np.uint8)


_FIRST_COPY: dict[bytes, Path] = {}


def write(path: Path, data: bytes) -> Path:
    """Write ``data``; repeated contents become hard links to the first copy (4x faster than writing; the official
    trees are never modified, so shared contents are safe)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    first = _FIRST_COPY.get(data)
    try:
        if first is None or not first.exists():
            raise OSError
        os.link(first, path)
    except OSError:
        path.write_bytes(data)
        _FIRST_COPY[data] = path
    return path


def mhist_name(i: int) -> str:
    return "MHIST_" + "".join(chr(97 + (i // 26**k) % 26) for k in (2, 1, 0)) + ".png"


def mhist(base: Path) -> Path:
    """``mhist/images/MHIST_aaa.png ...`` (3,152) + ``annotations.csv`` with the official header."""
    root = base / "mhist"
    png = encode(rgb(), "PNG")
    rows = []
    # interleave classes and partitions, as the real table does, so name order says nothing about the split
    pool = [key for key, n in MHIST_COUNTS.items() for _ in range(n)]
    for i, k in enumerate(np.random.default_rng(0).permutation(len(pool))):
        partition, label = pool[k]
        name = mhist_name(i)
        write(root / "images" / name, png)
        rows.append(f"{name},{label},{6 if label == 'SSA' else 1},{partition}")
    header = "Image Name,Majority Vote Label,Number of Annotators who Selected SSA (Out of 7),Partition"
    (root / "annotations.csv").write_text("\n".join([header, *rows]) + "\n")
    return root


def oct_c8(base: Path) -> Path:
    """``RetinalOCT_Dataset/RetinalOCT_Dataset/{train,val,test}/<CLASS>/<class>_<split>_<n>.jpg`` (24,000)."""
    root = base / "RetinalOCT_Dataset" / "RetinalOCT_Dataset"
    jpg = encode(rgb(), "JPEG")
    for split, n in OCT_COUNTS.items():
        for name in OCT_CLASSES:
            for i in range(n):
                write(root / split / name / f"{name.lower()}_{split}_{1001 + i}.jpg", jpg)
    return base / "RetinalOCT_Dataset"


def chest_xray_pa(base: Path) -> Path:
    """``COVID19_Pneumonia_Normal_Chest_Xray_PA_Dataset/{covid,normal,pneumonia}/`` 1,525 each + metadata.csv."""
    root = base / "COVID19_Pneumonia_Normal_Chest_Xray_PA_Dataset"
    grey_png, rgb_jpg = encode(np.full((8, 8), 90, np.uint8), "PNG"), encode(rgb(), "JPEG")
    for i in range(CHEST_PER_CLASS):
        ext = (".jpeg", ".jpg", ".png")[i % 3]
        write(
            root / "covid" / f"{i:08X}-FAFC-480D-88B6-1459C51481AF-1068x817{ext}",
            grey_png if ext == ".png" else rgb_jpg,
        )
        write(root / "normal" / f"{i:08d}_000.png", grey_png)
        write(root / "pneumonia" / f"{i:08d}_001.png", grey_png)
    (root / "metadata.csv").write_text("FILE NAME,FORMAT,SIZE,URL\n")
    return root


def glas_grade_csv(grades: dict) -> bytes:
    """``Grade.csv`` as published: leading spaces in two column names and their values, rows sorted as strings,
    old-Mac CR line ends."""
    header = "name,patient ID, grade (GlaS), grade (Sirinukunwattana et al. 2015)"
    rows = [
        f"{n},{g['patient_id']}, {g['grade_glas']}, {g['grade_sirinukunwattana']}" for n, g in sorted(grades.items())
    ]
    return ("\r".join([header, *rows]) + "\r").encode()


def glas(base: Path) -> Path:
    """``Warwick_QU_Dataset/{train,testA,testB}_N.bmp`` + ``_anno.bmp`` instance masks (165 pairs) + Grade.csv."""
    root = base / "Warwick_QU_Dataset"
    grades = load_split("glas_medcoss_split")["grades"]
    image = encode(rgb(), "BMP")
    mask = np.zeros((8, 8), np.uint8)
    mask[1:3, 1:3], mask[5:7, 4:7] = 1, 2  # two gland instances
    anno = encode(mask, "BMP")
    for name in grades:
        write(root / f"{name}.bmp", image)
        write(root / f"{name}_anno.bmp", anno)
    write(root / "Grade.csv", glas_grade_csv(grades))
    return root


def qata(base: Path) -> Path:
    """``QaTa-COV19/QaTa-COV19-v2/{Train Set,Test Set}/{Images,Ground-truths}`` (7,145 + 2,113 pairs), next to the
    older ``QaTa-COV19-v1/`` the Kaggle download also holds (the builder must pick v2)."""
    v2 = base / "QaTa-COV19" / "QaTa-COV19-v2"
    image = encode(np.full((8, 8), 100, np.uint8), "PNG")
    m = np.zeros((8, 8), np.uint8)
    m[2:5, 2:5] = 255
    mask = encode(m, "PNG")
    for folder, n in QATA_COUNTS.items():
        for i in range(n):
            name = f"covid_{i + 1}.png" if i % 2 else f"sub-S{10000 + i}_ses-E{20000 + i}_run-1_bp-chest_vp-ap_dx.png"
            write(v2 / folder / "Images" / name, image)
            write(v2 / folder / "Ground-truths" / f"mask_{name}", mask)
    write(base / "QaTa-COV19" / "QaTa-COV19-v1" / "Images" / "covid_1.png", image)
    (base / "QaTa-COV19" / "QaTa-COV19-v1" / "Ground-truths").mkdir()
    return base / "QaTa-COV19"


def nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([0.8, 0.8, 2.5, 1.0]) if affine is None else affine), str(path))
    return path


def tiny_label(shape: tuple[int, ...] = (4, 4, 2)) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    label[1:3, 1:3, :] = 1
    label[1, 1, 0] = 2
    return label


def lits(base: Path, layout: str = "codalab") -> Path:
    """LiTS with all 131 labelled cases: CodaLab ``LiTS/Training Batch 1|2/volume-N.nii`` + ``segmentation-N.nii``,
    or MSD ``Task03_Liver/{imagesTr,labelsTr}/liver_N.nii.gz`` (with its ``._`` debris and ``imagesTs/``)."""
    image, label = np.zeros((4, 4, 2), np.int16), tiny_label()
    if layout == "codalab":
        root = base / "LiTS"
        for n in range(131):
            batch = root / ("Training Batch 1" if n <= 27 else "Training Batch 2")
            nifti(batch / f"volume-{n}.nii", image)
            nifti(batch / f"segmentation-{n}.nii", label)
        nifti(root / "Test Data" / "test-volume-0.nii", image)
        return root
    root = base / "Task03_Liver"
    for n in range(131):
        nifti(root / "imagesTr" / f"liver_{n}.nii.gz", image)
        nifti(root / "labelsTr" / f"liver_{n}.nii.gz", label)
        write(root / "imagesTr" / f"._liver_{n}.nii.gz", b"\x00\x05\x16\x07 macOS resource fork")
    nifti(root / "imagesTs" / "liver_132.nii.gz", image)
    (root / "dataset.json").write_text("{}\n")
    return root


def kits(base: Path) -> Path:
    """``kits19/data/case_00000..case_00299``: 210 labelled cases (imaging + segmentation, axis 0 = slices) and 90
    unlabelled test cases (imaging only), plus ``kits.json``; the repository folder ``kits19/`` is returned."""
    root = base / "kits19" / "data"
    affine = np.array([[0, 0, -0.78, 0], [0, -0.78, 0, 0], [-3.0, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
    image, label = np.zeros((2, 4, 4), np.float32), tiny_label((2, 4, 4))
    for n in range(300):
        case = root / f"case_{n:05d}"
        nifti(case / "imaging.nii.gz", image, affine)
        if n < 210:
            nifti(case / "segmentation.nii.gz", label, affine)
    (root / "kits.json").write_text(json.dumps([{"case_id": f"case_{n:05d}"} for n in range(210)]) + "\n")
    return base / "kits19"


WRITERS = {
    "mhist": mhist,
    "oct_c8": oct_c8,
    "chest_xray_pa": chest_xray_pa,
    "glas": glas,
    "qata": qata,
    "lits": lits,
    "kits": kits,
}
SHIPPED_LISTS = ("glas", "lits", "kits")  # exact memberships; the other sets ship their rule only
RULE_KEYS = ("dataset", "title", "task", "classes", "paths_relative_to", "root_layout", "split_rule", "seed", "counts")


def rule_of(datalist: dict) -> dict:
    """The part of a datalist that documents how the split is made (``data_lists/<dataset>.rule.json``)."""
    return {k: datalist[k] for k in RULE_KEYS}


def write_data_lists(out: Path) -> None:
    """Rewrite ``data_lists/``: full datalists for GlaS, LiTS, KiTS19, rule files for all seven datasets."""
    from tpp_monai.data import build_datalist, write_datalist

    with tempfile.TemporaryDirectory() as tmp:
        for name, writer in WRITERS.items():
            datalist = build_datalist(name, writer(Path(tmp) / name), seed=0)
            if name in SHIPPED_LISTS:
                datalist = {k: v for k, v in datalist.items() if k not in ("missing", "skipped", "notes")}
                write_datalist(datalist, out / f"{name}.json")
            write_datalist(rule_of(datalist), out / f"{name}.rule.json")
            print(f"{name}: {datalist['counts']}")


if __name__ == "__main__":
    write_data_lists(Path(sys.argv[1] if len(sys.argv) > 1 else "data_lists"))
