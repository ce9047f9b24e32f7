"""The 3D SwinUNETR bundles (MONAI's SwinUNETR with huggingface peft's LoRA): ``lits_swinunetr_lora`` runs
``pretrain_tpp`` (DINO), ``finetune`` from its adapter folder and ``evaluate`` on the demo overlay (``swinunetr_tiny``,
demo NIfTI volumes, 32 x 32 x 64 patches)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import make_workflow, run_workflow

from tpp_monai.errors import ConfigError
from tpp_monai.workflows.checks import check_3d

BUNDLE = "lits_swinunetr_lora"


def _run(bundle: str, workflow: str, runs: Path, root: Path, **overrides: object):
    configs = ("finetune", "evaluate", "demo") if workflow == "evaluate" else (workflow, "demo")
    return run_workflow(bundle, workflow, configs, runs_dir=str(runs), dataset_dir=str(root), **overrides)


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, demo_roots) -> Path:
    runs = tmp_path_factory.mktemp("swin_lora")
    root = demo_roots("lits")
    _run(BUNDLE, "pretrain_tpp", runs, root, epochs=6, warmup_epochs=0)
    _run(BUNDLE, "finetune", runs, root)
    _run(BUNDLE, "evaluate", runs, root)
    return runs


def test_tpp_loss_falls_and_leaves_a_peft_adapter_folder(lora_runs: Path) -> None:
    history = pd.read_csv(lora_runs / "pretrain_tpp" / "history.csv")
    assert len(history) == 6
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0], history["train_loss"].tolist()
    folder = lora_runs / "pretrain_tpp" / "tpp_target"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and (folder / "adapter_model.safetensors").is_file()


def test_finetune_and_evaluate_write_their_results(lora_runs: Path) -> None:
    metrics = json.loads((lora_runs / "evaluate" / "metrics.json").read_text())["metrics"]
    assert {"mean_dice", "organ_dice", "tumour_dice"} <= set(metrics)
    assert all(0.0 <= float(metrics[k]) <= 1.0 for k in ("mean_dice", "organ_dice", "tumour_dice"))
    assert (lora_runs / "evaluate" / "dice_per_case.csv").is_file()


def test_full_finetune_baseline_builds_on_demo(tmp_path: Path, demo_roots) -> None:
    wf = make_workflow("lits_swinunetr_full_finetune", "finetune", ("finetune", "demo"), runs_dir=str(tmp_path),
                       dataset_dir=str(demo_roots("lits")))  # fmt: skip
    network = wf.parser.get_parsed_content("network_def")
    assert type(network).__name__ == "SwinUNETRBackbone"
    assert all(p.requires_grad for p in network.parameters())


def test_swinunetr_patch_rule_is_checked_before_anything_is_built() -> None:
    with pytest.raises(ConfigError, match=r"image_size \[48, 48, 64\].*multiple of 32"):
        check_3d("lits", "swinunetr_tiny", [48, 48, 64])
    with pytest.raises(ConfigError, match="one voxel at the deepest stage"):
        check_3d("lits", "swinunetr_tiny", [32, 32, 32])
    check_3d("lits", "swinunetr_tiny", [32, 32, 64], pretext="dino", dino={"global_size": [32, 32, 64],
             "local_size": [32, 32, 32], "num_local": 2})  # fmt: skip
