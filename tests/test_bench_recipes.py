"""The benchmark measures the bundles' own recipes: its TPP-MAE and TPP-DINO optimizers carry the learning rate,
weight decay and betas that the ``pretrain_tpp.json`` of the bundle declares (read here from the JSON itself)."""

from __future__ import annotations

import argparse
import json
from pydoc import locate

import pytest
from conftest import BUNDLES

from tpp_monai_bench.timing import Device
from tpp_monai_bench.workloads import vit_workloads


def test_bench_tpp_recipes_are_the_bundle_configs() -> None:
    batch = 2
    args = argparse.Namespace(backbone="medcoss_vit_tiny", method="adapter", tpp_method="adapter", batch_size=batch,
                              image_size=32, no_dino=False, no_checkpointing=True)  # fmt: skip
    workloads = {w.key: w for w in vit_workloads(args, Device("cpu"))[0]}
    config = json.loads((BUNDLES / "mhist_adapter" / "configs" / "pretrain_tpp.json").read_text())
    lr, wd, betas = config["lr"], config["weight_decay"], config["optimizer"]["betas"]
    assert lr["_target_"].endswith("pretext_lr") and wd["_target_"].endswith("pretext_setting")
    betas_of = locate(betas["_target_"])  # the config's component: the pretext's official betas
    expected = {
        "tpp_mae_frozen": (lr["mae"], wd["mae"], betas_of("mae")),
        "tpp_mae_trainable": (lr["mae"], wd["mae"], betas_of("mae")),
        "tpp_dino": (lr["dino_base"] * batch / 256, wd["dino"], betas_of("dino")),  # DINO's linear scaling rule
    }
    assert expected["tpp_mae_frozen"][2] != expected["tpp_dino"][2]
    for key, (want_lr, want_wd, want_betas) in expected.items():
        groups = workloads[key].optimizer.param_groups
        assert [g["lr"] for g in groups] == pytest.approx([want_lr] * len(groups)), key
        assert {g["weight_decay"] for g in groups} == {want_wd, 0.0}, key  # decayed weights, undecayed biases/norms
        assert all(tuple(g["betas"]) == tuple(want_betas) for g in groups), key
    finetune = json.loads((BUNDLES / "mhist_adapter" / "configs" / "finetune.json").read_text())
    groups = workloads["peft_ft"].optimizer.param_groups
    assert groups[0]["lr"] == finetune["lr"] and groups[0]["weight_decay"] == finetune["weight_decay"]
