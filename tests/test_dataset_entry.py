"""A dataset is one entry of :data:`tpp_monai.data.info.DATASETS`: adding a fake one through that entry alone gives
its bundles (the real generator), its demo data and its datalist; without the entry it is refused by name."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from tpp_monai.bundlegen import all_bundles, get_bundle, workflow_config_files
from tpp_monai.bundlegen.cli import write_bundles
from tpp_monai.data import make_demo_dataset, segmentation2d, synthetic
from tpp_monai.data.info import DATASETS, DatasetInfo, DemoData, get_dataset
from tpp_monai.data.recipes import SEG_TPP, DatasetRecipe, FinetuneRecipe
from tpp_monai.errors import ConfigError

FAKE = "fake_glands"
TOP = "FakeGlandsDownload"


def _fake(**changes: object) -> DatasetInfo:
    """A new 2D segmentation dataset, one entry: its own facts, recipe and demo sizes, read with GlaS's builder and
    drawn by GlaS's demo writer (its download has GlaS's layout)."""
    entry = DatasetInfo(
        FAKE, "Fake glands", "seg", "pathology", ("background", "fake_gland"), (96, 96), 3, (6, 2, 4),
        recipe=DatasetRecipe(SEG_TPP, FinetuneRecipe(batch_size=3, iterations=77)),
        builder=segmentation2d.GLAS_BUILDER,
        demo=DemoData(TOP, "inner", synthetic.write_glas, default_n=12, min_n=8),
        flip_tta=True,
    )  # fmt: skip
    return dataclasses.replace(entry, **changes)


@pytest.fixture
def only_fake(monkeypatch) -> DatasetInfo:
    """The registry holds the fake entry alone, for this test only (so the generator writes its bundles alone)."""
    for name in list(DATASETS):
        monkeypatch.delitem(DATASETS, name)
    entry = _fake()
    monkeypatch.setitem(DATASETS, FAKE, entry)
    return entry


def test_without_its_entry_a_dataset_is_refused_by_name(tmp_path) -> None:
    with pytest.raises(ConfigError, match=f"unknown bundle '{FAKE}_adapter'"):
        get_bundle(f"{FAKE}_adapter")
    with pytest.raises(ConfigError, match=f"unknown dataset '{FAKE}'.*glas"):
        get_dataset(FAKE)
    with pytest.raises(ConfigError, match=FAKE):
        make_demo_dataset(FAKE, tmp_path)
    assert not any(b.info.name == FAKE for b in all_bundles())


def test_an_incomplete_entry_is_refused_with_what_is_missing(monkeypatch) -> None:
    with pytest.raises(ConfigError, match=f"dataset entry '{FAKE}'.*task 'seg2'"):
        _fake(task="seg2")
    with pytest.raises(ConfigError, match="flip_tta applies to 2D segmentation only"):
        _fake(task="cls")
    with pytest.raises(ConfigError, match="min_n <= default_n"):
        _fake(demo=DemoData(TOP, ".", synthetic.write_glas, default_n=4, min_n=8))
    # a recipe that sets the learning rate per method but lacks one: refused when the bundles are generated
    per_method = DatasetRecipe(SEG_TPP, FinetuneRecipe(3, 77, lr_by_method={"full_finetune": 1e-4}))
    monkeypatch.setitem(DATASETS, FAKE, _fake(recipe=per_method))
    with pytest.raises(ConfigError, match=f"no fine-tuning learning rate for method '.*' on '{FAKE}'"):
        all_bundles()


def test_one_entry_gives_bundles_demo_data_and_datalist(tmp_path: Path, only_fake: DatasetInfo) -> None:
    from monai.bundle import ConfigParser

    names = write_bundles(tmp_path)
    assert names and all(n.startswith(f"{FAKE}_") for n in names)
    assert {f"{FAKE}_adapter", f"{FAKE}_full_finetune", f"{FAKE}_linear_probe"} <= set(names)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)

    bundle = tmp_path / f"{FAKE}_adapter"
    finetune = json.loads((bundle / "configs" / "finetune.json").read_text())
    assert (finetune["dataset_name"], finetune["batch_size"], finetune["iterations"]) == (FAKE, 3, 77)
    assert finetune["image_size"] == [96, 96]
    for workflow in ("evaluate", "inference"):  # flip_tta of the entry
        config = json.loads((bundle / "configs" / f"{workflow}.json").read_text())
        inferer = config["test"]["inferer"] if workflow == "evaluate" else config["inferer"]
        assert inferer["flips"] == [[2], [3], [2, 3]]
    assert (bundle / "configs" / "demo.json").is_file()

    # every workflow's configs load with MONAI's parser and name the new dataset
    for workflow in get_bundle(f"{FAKE}_adapter").workflows():
        parser = ConfigParser()
        parser.read_config(workflow_config_files(bundle, workflow, "demo"))
        parser["bundle_root"] = str(bundle)
        parser.parse(True)
        assert parser.get_parsed_content("dataset_name") == FAKE

    # the demo overlay writes the entry's demo data (its writer, folders and size) and the builder's datalist
    parser = ConfigParser()
    parser.read_config(workflow_config_files(bundle, "finetune", "demo"))
    parser["bundle_root"] = str(bundle)
    parser["runs_dir"] = str(tmp_path / "runs")
    parser.parse(True)
    root = Path(parser.get_parsed_content("dataset_dir"))
    assert root == tmp_path / "runs" / "demo_data" / TOP / "inner"
    marker = json.loads((root.parent / ".tpp-demo.json").read_text())
    assert (marker["dataset"], marker["n"]) == (FAKE, 12)
    datalist = json.loads((root / "datalist.json").read_text())
    assert (datalist["dataset"], datalist["classes"]) == (FAKE, ["background", "fake_gland"])
    assert sum(datalist["counts"].values()) == 12 and min(datalist["counts"].values()) > 0
    sample = parser.get_parsed_content("validate#dataset")[0]
    assert tuple(sample["image"].shape) == (3, 64, 64)  # the demo overlay's image size
