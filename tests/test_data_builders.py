"""Datalist builders: official layouts with the official file counts reproduce the paper's splits; bad input stops
the builder with a message naming the offending file."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from tpp_monai.__main__ import main
from tpp_monai.data import (
    DATASETS,
    build_datalist,
    check_datalist,
    get_dataset,
    make_demo_dataset,
    subsample_labels,
    write_datalist,
)
from tpp_monai.data.datalist import locate
from tpp_monai.errors import ConfigError, DatasetError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_fixtures import official

SPLITS = ("training", "validation", "test")
DATA_LISTS = Path(__file__).resolve().parents[1] / "data_lists"


def per_class(training: dict, validation: dict, test: dict) -> dict:
    return {"training": training, "validation": validation, "test": test}


# Per-class counts the rules must give on the official counts (datasets.md §1-§4).
CLASS_COUNTS = {
    "mhist": per_class({"HP": 1236, "SSA": 504}, {"HP": 309, "SSA": 126}, {"HP": 617, "SSA": 360}),
    "oct_c8": per_class(*({c: n for c in official.OCT_CLASSES} for n in (2300, 350, 350))),
    "chest_xray_pa": per_class(*({c: n for c in ("covid", "normal", "pneumonia")} for n in (1067, 153, 305))),
    "glas": per_class({"benign": 29, "malignant": 38}, {"benign": 8, "malignant": 10}, {"benign": 37, "malignant": 43}),
}


@pytest.fixture(scope="session")
def official_root(tmp_path_factory):
    """Official-layout trees, made once per session: ``official_root(name[, layout])`` -> the download folder."""
    cache: dict[tuple, Path] = {}

    def make(name: str, layout: str | None = None) -> Path:
        if (name, layout) not in cache:
            base = tmp_path_factory.mktemp(f"official_{name}")
            cache[name, layout] = official.lits(base, layout) if layout else official.WRITERS[name](base)
        return cache[name, layout]

    return make


def images(datalist: dict, split: str) -> list[str]:
    return [r["image"] for r in datalist[split]]


# ---------------------------------------------------------------------------------------------------------------
# Official counts, memberships, determinism


@pytest.mark.parametrize("name", list(DATASETS))
def test_official_layout_gives_the_paper_split_twice_identically(official_root, name, tmp_path):
    root = official_root(name)
    datalist = build_datalist(name, root, seed=0)
    assert tuple(datalist["counts"][s] for s in SPLITS) == get_dataset(name).split_counts
    assert tuple(len(datalist[s]) for s in SPLITS) == get_dataset(name).split_counts
    if name in CLASS_COUNTS:
        assert datalist["class_counts"] == CLASS_COUNTS[name]
    every = [p for s in SPLITS for p in images(datalist, s)]
    assert len(every) == len(set(every)), "a file is in two splits"
    assert datalist["skipped"] == [] and datalist["missing"] == []
    first = write_datalist(datalist, tmp_path / "first.json")
    again = write_datalist(build_datalist(name, root, seed=0), tmp_path / "again.json")
    assert first.read_bytes() == again.read_bytes()
    check_datalist(first, locate(name, root))  # every path exists relative to the layout root
    # data_lists/<name>.rule.json documents exactly the rule the builder applies
    assert json.loads((DATA_LISTS / f"{name}.rule.json").read_text()) == official.rule_of(datalist)


def test_classification_labels_follow_the_class_order(official_root):
    datalist = build_datalist("chest_xray_pa", official_root("chest_xray_pa"))
    classes = datalist["classes"]
    assert classes == ["covid", "normal", "pneumonia"]
    for record in datalist["test"]:
        assert classes[record["label"]] == record["class_name"] == record["image"].split("/")[0]


def test_glas_membership_is_the_medcoss_split(official_root):
    split = official.load_split("glas_medcoss_split")
    for seed in (0, 7):  # the MedCoSS rule is deterministic: the seed must not matter
        datalist = build_datalist("glas", official_root("glas"), seed=seed)
        for ours, theirs in zip(SPLITS, ("train", "val", "test")):
            assert sorted(r["name"] for r in datalist[ours]) == sorted(split[theirs])
        assert datalist["seed"] is None
    record = next(r for r in datalist["training"] if r["name"] == "train_1")
    assert record == {
        "image": "train_1.bmp",
        "label": "train_1_anno.bmp",
        "name": "train_1",
        "grade": "malignant",
        "patient_id": split["grades"]["train_1"]["patient_id"],
    }


@pytest.mark.parametrize("layout", ["codalab", "msd"])
def test_lits_uses_the_medcoss_list_in_both_layouts(official_root, layout):
    split = official.load_split("lits_medcoss_split")
    datalist = build_datalist("lits", official_root("lits", layout))
    assert sorted(r["case"] for r in datalist["test"]) == sorted(split["test"])
    assert sorted(r["case"] for r in datalist["training"] + datalist["validation"]) == sorted(split["train"])
    for record in datalist["test"] + datalist["training"]:
        n = record["case"].removeprefix("liver_")
        expected = f"volume-{n}.nii" if layout == "codalab" else f"imagesTr/liver_{n}.nii.gz"
        assert record["image"].endswith(expected)
    assert any("not used" in note for note in datalist["notes"])  # test-volume-N.nii / imagesTs are reported
    codalab = build_datalist("lits", official_root("lits", "codalab"))
    assert [r["case"] for r in datalist["validation"]] == [r["case"] for r in codalab["validation"]]


def test_kits_uses_the_mots_list_and_only_labelled_cases(official_root):
    split = official.load_split("kits_mots_split")
    datalist = build_datalist("kits", official_root("kits"))
    assert [r["case"] for r in datalist["test"]] == split["test"]
    assert sorted(r["case"] for r in datalist["training"] + datalist["validation"]) == sorted(split["train"])
    assert datalist["test"][1] == {
        "image": "case_00005/imaging.nii.gz",
        "label": "case_00005/segmentation.nii.gz",
        "case": "case_00005",
    }
    assert datalist["notes"] == ["90 unlabelled KiTS19 test case(s) (case_00210..case_00299) are not used"]


# sha256 of json.dumps(original, sort_keys=True) of each published split file the shipped copies were made from
# (GlaS and LiTS: MedCoSS's rule; KiTS19: MOTS/UniSeg's list)
ORIGINAL_SPLIT_DIGESTS = {
    "glas_medcoss_split": "5dac98a7c86c808639b745846c7e28ea7b6b7298b01b3be2cdd1cfc83ac3dda8",
    "lits_medcoss_split": "dc5bd64284dbd87611bafb1f31ffb5bae3db23974657616672ba32b32917462c",
    "kits_mots_split": "f87d4bdb60b35101f4c51e7299351bc03428fc7f3be14d6e36527ec619958709",
}


def test_split_copies_equal_the_originals():
    for name, digest in ORIGINAL_SPLIT_DIGESTS.items():
        shipped = official.load_split(name)
        assert hashlib.sha256(json.dumps(shipped, sort_keys=True).encode()).hexdigest() == digest, name


@pytest.mark.parametrize("name", official.SHIPPED_LISTS)
def test_shipped_lists_are_what_the_builder_writes(official_root, name):
    datalist = build_datalist(name, official_root(name), seed=0)
    shipped = json.loads((DATA_LISTS / f"{name}.json").read_text())
    for split in SPLITS:
        assert shipped[split] == datalist[split]
    assert official.rule_of(shipped) == official.rule_of(datalist)
    check_datalist(DATA_LISTS / f"{name}.json", locate(name, official_root(name)))


def test_seed_changes_only_the_drawn_validation(official_root):
    root = official_root("mhist")
    a, b = build_datalist("mhist", root, seed=0), build_datalist("mhist", root, seed=1)
    assert a["test"] == b["test"] and a["counts"] == b["counts"] and a["class_counts"] == b["class_counts"]
    assert set(images(a, "validation")) != set(images(b, "validation"))
    assert set(images(a, "training") + images(a, "validation")) == set(images(b, "training") + images(b, "validation"))


def test_inner_and_outer_folders_give_the_same_datalist(official_root):
    outer = official_root("kits")  # kits19/, the repository folder
    assert build_datalist("kits", outer) == build_datalist("kits", outer / "data")


def test_label_fraction_keeps_a_seeded_stratified_nested_subset(official_root):
    root = official_root("mhist")
    full = build_datalist("mhist", root)
    tenth = build_datalist("mhist", root, label_fraction=0.1)
    fifth = build_datalist("mhist", root, label_fraction=0.2)
    assert tenth["class_counts"]["training"] == {"HP": 124, "SSA": 50}  # round(0.1 * 1236), round(0.1 * 504)
    assert tenth["validation"] == full["validation"] and tenth["test"] == full["test"]
    assert set(images(tenth, "training")) < set(images(fifth, "training")) < set(images(full, "training"))
    assert tenth["label_fraction"] == 0.1 and "label_fraction" in tenth["split_rule"]
    other_seed = build_datalist("mhist", root, seed=3, label_fraction=0.1)
    assert set(images(other_seed, "training")) != set(images(tenth, "training"))


def test_subsample_labels_strata_and_bounds():
    records = [{"image": f"{c}{i}.png", "label": c} for c in (0, 1) for i in range(10 if c == 0 else 3)]
    kept = subsample_labels(records, 0.1, seed=0)
    assert sorted(r["label"] for r in kept) == [0, 1]  # at least one per class, round(0.1 * 10) = 1
    assert subsample_labels(records, 1.0, seed=0) == records
    grades = [{"image": f"g{i}.png", "label": f"g{i}_anno.png", "grade": g} for i, g in enumerate("bbbbmmmm")]
    assert sorted(r["grade"] for r in subsample_labels(grades, 0.5, seed=1)) == ["b", "b", "m", "m"]
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ConfigError, match="label fraction"):
            subsample_labels(records, bad, seed=0)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one DatasetError naming the offending file or folder, what was expected and what was found


@pytest.fixture
def demo(tmp_path):
    """A small demo dataset (official layout) to damage: ``demo(name, n)`` -> layout root."""
    return lambda name, n=None: make_demo_dataset(name, tmp_path / "demo", n=n)


def error_of(name: str, root: Path, **kwargs) -> str:
    with pytest.raises(DatasetError) as info:
        build_datalist(name, root, **kwargs)
    return str(info.value)


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_wrong_root(tmp_path):
    missing = tmp_path / "no_such_folder"
    message = error_of("mhist", missing)
    assert str(missing) in message and "found nothing there" in message
    (tmp_path / "notes.txt").write_text("not a dataset")
    message = error_of("oct_c8", tmp_path)
    assert str(tmp_path) in message and "train/, val/ and test/" in message and "notes.txt" in message
    qata = make_demo_dataset("qata", tmp_path / "q", n=8)
    message = error_of("qata", qata / "Train Set")  # a folder inside the layout: say where the layout is
    assert str(qata / "Train Set") in message and f"the layout is at {qata.resolve()}" in message


def test_two_candidate_layouts_are_ambiguous(tmp_path):
    first = make_demo_dataset("glas", tmp_path / "a", n=8)
    second = make_demo_dataset("glas", tmp_path / "b", n=8)
    message = error_of("glas", tmp_path)
    assert str(first) in message and str(second) in message


def test_missing_csv_column(demo):
    root = demo("mhist")
    csv_path = root / "annotations.csv"
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join(line.rsplit(",", 1)[0] for line in lines) + "\n")
    message = error_of("mhist", root)
    assert str(csv_path) in message and "'Partition'" in message and "'Image Name'" in message

    root = demo("glas")
    grade = root / "Grade.csv"
    grade.write_bytes(grade.read_bytes().replace(b" grade (GlaS)", b" grade"))
    message = error_of("glas", root)
    assert str(grade) in message and "'grade (GlaS)'" in message


def test_csv_row_without_image_and_image_without_row(demo):
    root = demo("mhist")
    (root / "images" / "MHIST_aab.png").unlink()
    message = error_of("mhist", root)
    assert "MHIST_aab.png" in message and "annotations.csv, line" in message

    root = demo("glas")
    Image.new("RGB", (8, 8)).save(root / "train_99.bmp")
    assert "train_99.bmp" in error_of("glas", root)


@pytest.mark.parametrize(
    "name, remove, names",
    [
        ("qata", "Train Set/Ground-truths/mask_covid_2.png", ["Train Set/Images/covid_2.png", "mask_covid_2.png"]),
        ("glas", "train_3_anno.bmp", ["train_3.bmp", "train_3_anno.bmp"]),
        ("lits", "Training Batch 1/segmentation-2.nii", ["volume-2.nii", "segmentation-2.nii"]),
        ("kits", "case_00001/segmentation.nii.gz", ["case_00001/imaging.nii.gz", "segmentation.nii.gz"]),
    ],
)
def test_image_without_its_mask(demo, name, remove, names):
    root = demo(name)
    (root / remove).unlink()
    message = error_of(name, root)
    assert "image without its mask" in message
    for fragment in names:
        assert fragment in message


@pytest.mark.parametrize(
    "name, damaged",
    [
        ("mhist", "images/MHIST_aab.png"),
        ("oct_c8", "train/DR/dr_train_1002.jpg"),
        ("chest_xray_pa", "normal/00000109_001.png"),
        ("glas", "testA_2.bmp"),
        ("qata", "Test Set/Images/covid_2.png"),
        ("lits", "Training Batch 1/volume-3.nii"),
        ("kits", "case_00002/imaging.nii.gz"),
    ],
)
def test_truncated_file_stops_or_is_skipped_and_listed(demo, name, damaged):
    root = demo(name)
    full = build_datalist(name, root)
    truncate(root / damaged)
    message = error_of(name, root)
    assert str(root / damaged) in message and "--skip-bad" in message
    skipped = build_datalist(name, root, skip_bad=True)
    assert [s["path"] for s in skipped["skipped"]] == [damaged]
    assert sum(skipped["counts"].values()) == sum(full["counts"].values()) - 1
    assert all(damaged not in (r["image"], r.get("label")) for s in SPLITS for r in skipped[s])


def test_garbage_files_are_unreadable_and_counted(demo):
    root = demo("oct_c8")
    (root / "val" / "CNV" / "cnv_val_1001.jpg").write_bytes(b"this is not a JPEG")
    (root / "test" / "AMD" / "amd_test_1002.jpg").write_bytes(b"")
    message = error_of("oct_c8", root)
    assert message.startswith(str(root / "val" / "CNV" / "cnv_val_1001.jpg"))  # the first one, in split order
    assert "cannot decode" in message and "1 more unreadable file(s)" in message


def test_skip_bad_lists_every_skipped_file_on_the_command_line(demo, tmp_path, capsys):
    root = demo("mhist")
    truncate(root / "images" / "MHIST_aac.png")
    truncate(root / "images" / "MHIST_aaf.png")
    out = tmp_path / "mhist.json"
    assert main(["datalist", "mhist", "--root", str(root), "--out", str(out), "--skip-bad"]) == 0
    err = capsys.readouterr().err
    assert "skipped: images/MHIST_aac.png" in err and "skipped: images/MHIST_aaf.png" in err
    assert [s["path"] for s in json.loads(out.read_text())["skipped"]] == [
        "images/MHIST_aac.png",
        "images/MHIST_aaf.png",
    ]
    assert main(["datalist", "mhist", "--root", str(root), "--out", str(out)]) == 2
    assert "MHIST_aac.png" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, mask",
    [
        ("qata", "Train Set/Ground-truths/mask_covid_4.png"),
        ("glas", "testB_1_anno.bmp"),
    ],
)
def test_mask_size_differs_from_image(demo, name, mask):
    root = demo(name)
    Image.new("L", (13, 7)).save(root / mask)
    message = error_of(name, root)
    assert str(root / mask) in message and "13x7" in message and "differs" in message


def test_volume_mask_shape_differs(demo):
    root = demo("kits")
    image = nib.load(root / "case_00003" / "imaging.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 7), np.uint8), image.affine), root / "case_00003" / "segmentation.nii.gz")
    message = error_of("kits", root)
    assert "case_00003/segmentation.nii.gz" in message and "(5, 6, 7)" in message and "imaging.nii.gz" in message


def test_unexpected_label_values(demo):
    root = demo("mhist")
    csv_path = root / "annotations.csv"
    lines = csv_path.read_text().splitlines()
    lines[3] = lines[3].replace(",HP,", ",TA,").replace(",SSA,", ",TA,")
    csv_path.write_text("\n".join(lines) + "\n")
    message = error_of("mhist", root)
    assert f"{csv_path}, line 4" in message and "'TA'" in message and "HP, SSA" in message

    root = demo("qata")
    mask = root / "Test Set" / "Ground-truths" / "mask_covid_2.png"
    values = np.asarray(Image.open(mask)).copy()
    values[0, 0] = 128
    Image.fromarray(values).save(mask)
    message = error_of("qata", root)
    assert str(mask) in message and "128" in message and "[0, 255]" in message

    root = demo("lits")
    seg = root / "Training Batch 1" / "segmentation-5.nii"
    img = nib.load(seg)
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = 3
    nib.save(nib.Nifti1Image(data, img.affine), seg)
    message = error_of("lits", root)
    assert str(seg) in message and "[3]" in message

    root = demo("glas")
    grade = root / "Grade.csv"
    grade.write_bytes(grade.read_bytes().replace(b" benign,", b" unknown,", 1))
    message = error_of("glas", root)
    assert str(grade) in message and "'unknown'" in message


def test_empty_or_missing_class_folder(demo):
    root = demo("oct_c8")
    for f in (root / "train" / "DR").iterdir():
        f.unlink()
    message = error_of("oct_c8", root)
    assert str(root / "train" / "DR") in message and "empty class folder" in message

    root = demo("chest_xray_pa")
    for f in (root / "pneumonia").iterdir():
        f.unlink()
    (root / "pneumonia").rmdir()
    message = error_of("chest_xray_pa", root)
    assert "dataset root" in message and "pneumonia/" in message  # the layout itself is then not found

    root = demo("oct_c8")
    (root / "val" / "XYZ").mkdir()
    assert "unexpected folder(s) XYZ" in error_of("oct_c8", root)


# ---------------------------------------------------------------------------------------------------------------
# check_datalist: before training, every file of the datalist must exist


def test_check_datalist_names_the_first_missing_file(demo, tmp_path):
    root = demo("glas")
    out = write_datalist(build_datalist("glas", root), tmp_path / "glas.json")
    assert check_datalist(out, root)["dataset"] == "glas"
    (root / "testA_1.bmp").unlink()
    (root / "train_2_anno.bmp").unlink()
    with pytest.raises(DatasetError, match=r"2 file\(s\)") as info:
        check_datalist(out, root)
    assert str(root / "train_2_anno.bmp") in str(info.value) or str(root / "testA_1.bmp") in str(info.value)


def test_check_datalist_points_at_the_layout_folder(demo, tmp_path):
    root = demo("qata")  # .../QaTa-COV19/QaTa-COV19-v2
    out = write_datalist(build_datalist("qata", root.parent), tmp_path / "qata.json")
    with pytest.raises(DatasetError, match="pass that folder as dataset_dir") as info:
        check_datalist(out, root.parent)
    assert str(root) in str(info.value)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"broken\.json"):
        check_datalist(tmp_path / "broken.json", root)
    with pytest.raises(DatasetError, match="datalist not found"):
        check_datalist(tmp_path / "absent.json", root)
