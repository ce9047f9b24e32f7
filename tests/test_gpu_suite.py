"""The GPU suite's code paths on CPU at tiny size (``--suite gpu --device cpu --smoke``): every configuration and
workflow runs, and the JSON's figures are consistent with each other. No timing value is asserted."""

from __future__ import annotations

import json

import pytest

from tpp_monai_bench import gpu_suite
from tpp_monai_bench.__main__ import main
from tpp_monai_bench.timing import Device


def test_gpu_suite_steps_on_cpu(tmp_path) -> None:
    out = tmp_path / "suite.json"
    assert main(["--suite", "gpu", "--device", "cpu", "--smoke", "--suite-parts", "steps", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    steps, sizes = result["steps"], result["sizes"]
    assert result["smoke"] and result["machine"]["device"] == "cpu"
    assert all("error" not in g for g in steps["groups"].values()), steps["groups"]
    s224, s512, pre = sizes["vit_224"]["size"], sizes["vit_512"]["size"], sizes["vit_224"]["pretext_size"]
    batches = {
        f"full_ft_{s224}": sizes["ft_batch_224"], f"adapter_ft_{s224}": sizes["ft_batch_224"],
        f"lora_ft_{s224}": sizes["ft_batch_224"], f"full_ft_{pre}_b{sizes['tpp_batch']}": sizes["tpp_batch"],
        f"tpp_mae_frozen_{pre}": sizes["tpp_batch"], f"tpp_mae_trainable_{pre}": sizes["tpp_batch"],
        f"tpp_dino_{pre}": sizes["tpp_batch"], f"full_ft_{s512}": sizes["ft_batch_512"],
        f"adapter_ft_{s512}": sizes["ft_batch_512"], f"lora_ft_{s512}": sizes["ft_batch_512"],
        "full_ft_lits": sizes["lits_batch"], "peft_ft_lits": sizes["lits_batch"],
        "tpp_dino_lits": sizes["lits_tpp_batch"],
    }  # fmt: skip
    configs = steps["configs"]
    assert set(configs) == set(batches)
    rate = steps["matmul"]["tflop_per_s"] * 1e12
    assert rate > 0
    for key, c in configs.items():
        assert c["batch"] == batches[key], key
        assert c["step_s"] > 0 and c["gflop_per_step"] > 0 and c["peak_mib"] > 0, key
        assert c["images_per_s"] == pytest.approx(c["batch"] / c["step_s"])
        assert c["mfu"] == pytest.approx(c["gflop_per_step"] * 1e9 / c["step_s"] / rate)
        assert c["host_syncs"] is None  # counted on CUDA only
    # frozen weights need no weight gradients: PEFT and TPP steps count fewer FLOPs than full fine-tuning
    for tag in (s224, s512):
        for method in ("adapter", "lora"):
            assert configs[f"{method}_ft_{tag}"]["gflop_per_step"] < configs[f"full_ft_{tag}"]["gflop_per_step"]
    full_tpp = configs[f"full_ft_{pre}_b{sizes['tpp_batch']}"]
    assert configs[f"tpp_mae_frozen_{pre}"]["gflop_per_step"] < full_tpp["gflop_per_step"]
    assert configs["peft_ft_lits"]["gflop_per_step"] < configs["full_ft_lits"]["gflop_per_step"]
    target = steps["targets"]["tpp_mae_step_ratio"]["value"]
    assert target == pytest.approx(configs[f"tpp_mae_frozen_{pre}"]["step_s"] / full_tpp["step_s"])
    assert steps["targets"]["stunet_ft_peak_mib"]["value"] == configs["peft_ft_lits"]["peak_mib"]


def test_gpu_suite_workflows_on_cpu(tmp_path) -> None:
    sz = gpu_suite.smoke_sizes()
    # the consumption side as part 1 would report it (a given rate: the comparison's arithmetic is what is tested)
    steps = {"configs": {
        f"tpp_mae_trainable_{sz.vit_224.pretext_size}": {"images_per_s": 3.0, "label": "mae"},
        f"adapter_ft_{sz.vit_512.size}": {"images_per_s": 5.0, "label": "adapter"},
        "tpp_dino_lits": {"images_per_s": 7.0, "label": "dino"}, "peft_ft_lits": {"images_per_s": 11.0, "label": "ft"},
    }}  # fmt: skip
    result = gpu_suite.measure_workflows(sz, Device("cpu"), tmp_path, lambda msg: None, steps)
    names = ["glas_adapter/pretrain_tpp", "glas_adapter/finetune", "lits_conv_adapter/pretrain_tpp",
             "lits_conv_adapter/finetune", "lits_conv_adapter/inference"]  # fmt: skip
    assert list(result) == names
    for name, w in result.items():
        assert "error" not in w, (name, w.get("error"), w.get("trace"))
        assert w["iterations"] >= 1 and w["items"] >= 1 and w["run_s"] > 0
        assert len(w["iteration_s_all"]) == w["iterations"]
    consumed = {"glas_adapter/pretrain_tpp": 3.0, "glas_adapter/finetune": 5.0,
                "lits_conv_adapter/pretrain_tpp": 7.0, "lits_conv_adapter/finetune": 11.0}  # fmt: skip
    for name, rate in consumed.items():
        w = result[name]
        assert w["supply"]["images"] >= 1 and w["supply"]["images_per_s"] > 0
        assert w["consumption_images_per_s"] == rate
        assert w["supply_ratio"] == pytest.approx(w["supply"]["images_per_s"] / rate)
    assert any(n.endswith("_seg.nii.gz") for n in result["lits_conv_adapter/inference"]["outputs"])


def test_generated_volumes_keep_layout_and_reach_the_asked_size(tmp_path) -> None:
    import nibabel as nib

    root = gpu_suite.generate_lits(tmp_path, 3, (40, 36, 12))
    datalist = json.loads((root / "datalist.json").read_text())
    assert datalist["training"]
    for path in root.rglob("*.nii"):
        img = nib.load(path)
        assert img.shape == (40, 36, 12)
    seg = nib.load(next(root.rglob("segmentation-*.nii"))).get_fdata()
    assert set(seg.ravel().tolist()) <= {0.0, 1.0, 2.0}  # nearest: labels stay labels
