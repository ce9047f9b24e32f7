"""Fine-tuning, evaluation and inference of the 2D bundles, run through MONAI's bundle workflow on demo data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import BUNDLES, bundle_dataset, make_workflow, run_cli, run_workflow
from ignite.engine import Events

from tpp_monai.backbones import build_backbone
from tpp_monai.bundlegen import BASELINES, bundle_names, workflow_config_files
from tpp_monai.data.info import get_dataset
from tpp_monai.io import load_verified
from tpp_monai.peft import target_parameter_names
from tpp_monai.peft.files import read_record

FAST = {"epochs": 1, "val_interval": 1}


def _csv(path: Path, header: bool = True) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f) if header else csv.reader(f))


@pytest.mark.parametrize("bundle", bundle_names(2))  # the 3D bundles: tests/test_3d.py
def test_finetune_then_evaluate_write_metrics(tmp_path, demo_roots, bundle) -> None:
    root = demo_roots(bundle_dataset(bundle))
    common = {"runs_dir": str(tmp_path), "dataset_dir": str(root), "ckpt_dir": str(tmp_path / "models")}
    run_workflow(bundle, "finetune", tpp_ckpt="none", **common, **FAST)
    model = load_verified(tmp_path / "models" / "model.pt")
    assert set(model) == {"model", "run_info"} and model["run_info"]["tpp"] is False
    history = pd.read_csv(tmp_path / "finetune" / "history.csv")
    assert list(history.columns[:4]) == ["epoch", "iteration", "train_loss", "lr"] and len(history) == 1
    assert history["train_loss"][0] > 0 and history.filter(like="val_").notna().all(axis=None)
    run_workflow(bundle, "evaluate", **common)
    result = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    task_metrics = {"dice", "hd95"} if "dice" in result["metrics"] else {"acc", "auc", "f1", "score"}
    assert set(result["metrics"]) == task_metrics
    method = json.loads((BUNDLES / bundle / "configs" / "finetune.json").read_text())["method"]
    assert result["run_info"]["method"] == method and bundle.endswith(method.replace(".", "_"))
    assert all(v == v for v in result["metrics"].values())  # no NaN
    assert (tmp_path / "evaluate" / "metrics.csv").is_file()
    if "dice" in task_metrics:
        rows = _csv(tmp_path / "evaluate" / "dice_raw.csv")
        assert len(rows) == result["num_images"] and rows[0]["filename"].startswith(str(root))
        assert len(list((tmp_path / "evaluate" / "predictions").glob("*_mask.png"))) == result["num_images"]
    else:
        classes = list(get_dataset(bundle_dataset(bundle)).classes)
        table = pd.read_csv(tmp_path / "evaluate" / "predictions.csv")
        assert list(table.columns) == ["image", "label", "prediction", *(f"prob_{c}" for c in classes)]
        assert len(table) == result["num_images"] and set(table["label"]) <= set(classes)
        probs = table[[f"prob_{c}" for c in classes]].to_numpy()
        assert list(table["prediction"]) == [classes[i] for i in probs.argmax(1)]
        assert all((tmp_path / "evaluate" / name).is_file() for name in ("roc.png", "confusion_matrix.png"))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save({"model": build_backbone("medcoss_vit_tiny", task="features").state_dict()}, path)
    return path


@pytest.mark.parametrize("bundle", ["glas_adapter", "mhist_vpt"])
def test_finetune_starts_from_the_saved_target_parameters(tmp_path, demo_roots, tiny_ckpt, bundle) -> None:
    root = demo_roots(bundle_dataset(bundle))
    common = {"runs_dir": str(tmp_path), "dataset_dir": str(root), "backbone_ckpt": str(tiny_ckpt)}
    run_workflow(bundle, "pretrain_tpp", tpp_epochs=2, **common)
    saved = read_record(tmp_path / "pretrain_tpp" / "tpp_target")
    history = pd.read_csv(tmp_path / "pretrain_tpp" / "history.csv")
    assert list(history.columns) == ["epoch", "iteration", "train_loss", "lr", "elapsed_s"]
    assert list(history["epoch"]) == [1, 2]
    assert history[["train_loss", "lr"]].notna().all(axis=None)
    wf = make_workflow(bundle, "finetune", ("finetune", "demo"), ckpt_dir=str(tmp_path / "models"), **common, **FAST)
    network = wf.parser.get_parsed_content("network_def")
    trainer = wf.parser.get_parsed_content("train#trainer")
    at_start = {}
    trainer.add_event_handler(Events.STARTED, lambda e: at_start.update(
        {n: p.detach().clone() for n, p in network.named_parameters()}))  # fmt: skip
    wf.run()
    targets = target_parameter_names(network)
    assert targets and set(saved["state"]) == set(targets)
    for name in targets:
        assert torch.equal(at_start[name], saved["state"][name]), f"{name} did not start from the TPP file"
    backbone = torch.load(tiny_ckpt, weights_only=True)["model"]
    head = set(network.head_parameter_names())
    for name, tensor in network.state_dict().items():
        if name in backbone and name not in targets:
            assert torch.equal(tensor, backbone[name]), f"frozen {name} changed during fine-tuning"
        if name in head:
            assert not torch.equal(tensor, at_start[name]), f"head {name} was not trained"
    info = load_verified(tmp_path / "models" / "model.pt")["run_info"]
    assert info["tpp"] is True and info["tpp_pretext"] == "mae"


def test_cli_finetune_evaluate_inference_for_segmentation(tmp_path, demo_roots) -> None:
    """The three workflows through `python -m monai.bundle run`, and masks at each input's own size."""
    bundle, root = BUNDLES / "qata_dtl", demo_roots("qata")
    configs = lambda name: str(workflow_config_files(bundle, name, "demo"))  # noqa: E731
    common = ["--runs_dir", str(tmp_path), "--dataset_dir", str(root), "--ckpt_dir", str(tmp_path / "models")]
    for run_id in ("finetune", "evaluate"):
        proc = run_cli("monai.bundle", "run", run_id, "--config_file", configs(run_id), *common, "--epochs", "1",
                       "--tpp_ckpt", "none")  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    images = tmp_path / "in"
    images.mkdir()
    datalist = json.loads((root / "datalist.json").read_text())
    for rec in datalist["test"][:2]:
        (images / Path(rec["image"]).name).write_bytes((root / rec["image"]).read_bytes())
    proc = run_cli("monai.bundle", "run", "--config_file", configs("inference"), *common, "--input_dir", str(images))
    assert proc.returncode == 0, proc.stderr[-3000:]
    from PIL import Image

    for rec in datalist["test"]:  # evaluate's masks: at each test image's own size, as inference's
        mask = Image.open(tmp_path / "evaluate" / "predictions" / f"{Path(rec['image']).stem}_mask.png")
        assert mask.size == Image.open(root / rec["image"]).size
    for src in images.iterdir():
        mask = Image.open(tmp_path / "inference" / f"{src.stem}_mask.png")
        assert mask.size == Image.open(src).size
        assert set(mask.getdata()) <= {0, 255}


def test_inference_writes_class_probabilities(tmp_path, demo_roots) -> None:
    root = demo_roots("oct_c8")
    common = {"runs_dir": str(tmp_path), "dataset_dir": str(root), "ckpt_dir": str(tmp_path / "models")}
    run_workflow("oct_c8_ssf", "finetune", tpp_ckpt="none", **common, **FAST)
    datalist = json.loads((root / "datalist.json").read_text())
    images = tmp_path / "in"
    images.mkdir()
    for rec in datalist["test"][:3]:
        (images / Path(rec["image"]).name).write_bytes((root / rec["image"]).read_bytes())
    run_workflow("oct_c8_ssf", "run", ("inference", "demo"), input_dir=str(images), **common)
    table = pd.read_csv(tmp_path / "inference" / "predictions.csv")
    classes = list(get_dataset("oct_c8").classes)
    assert list(table.columns) == ["image", "prediction", *(f"prob_{c}" for c in classes)] and len(table) == 3
    assert sorted(Path(p).name for p in table["image"]) == sorted(p.name for p in images.iterdir())
    probs = table[[f"prob_{c}" for c in classes]].to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-4)
    assert list(table["prediction"]) == [classes[i] for i in probs.argmax(1)]


@pytest.mark.parametrize("bundle", ["mhist_adapter", "glas_lora"])
def test_verify_net_in_out(bundle) -> None:
    configs = BUNDLES / bundle / "configs"
    proc = run_cli("monai.bundle", "verify_net_in_out", "network_def", "--meta_file", str(configs / "metadata.json"),
                   "--config_file", str(configs / "inference.json"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data shape of network is verified with no error" in proc.stdout + proc.stderr


def test_baselines_ship_finetune_only_and_say_why() -> None:
    for dataset in ("mhist", "glas"):
        for method in BASELINES:
            configs = BUNDLES / f"{dataset}_{method}" / "configs"
            assert not (configs / "pretrain_tpp.json").exists()
            assert json.loads((configs / "finetune.json").read_text())["tpp_ckpt"] == "none"
            readme = (BUNDLES / f"{dataset}_{method}" / "docs" / "README.md").read_text()
            assert "pretrain_tpp does not apply" in readme


def test_missing_tpp_checkpoint_explains_the_choices(tmp_path, demo_roots) -> None:
    proc = run_cli("monai.bundle", "run", "finetune", "--config_file",
                   str(BUNDLES / "glas_adapter" / "configs" / "finetune.json"), "--runs_dir", str(tmp_path),
                   "--dataset_dir", str(demo_roots("glas")), "--backbone_ckpt", "none")  # fmt: skip
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "tpp_ckpt" in last and "run pretrain_tpp first" in last and "--tpp_ckpt none" in last


def test_label_fraction_keeps_a_stratified_subset(tmp_path, demo_roots) -> None:
    root = demo_roots("mhist")
    wf = make_workflow("mhist_adapter", "finetune", ("finetune", "demo"), runs_dir=str(tmp_path),
                       dataset_dir=str(root), tpp_ckpt="none", label_fraction=0.5)  # fmt: skip
    kept = wf.parser.get_parsed_content("train#datalist")
    full = json.loads((root / "datalist.json").read_text())["training"]
    assert len(kept) < len(full)
    assert {r["label"] for r in kept} == {r["label"] for r in full}
