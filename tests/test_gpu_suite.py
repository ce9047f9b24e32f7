"""The GPU suite's code paths on CPU at tiny size (``--suite gpu --device cpu --smoke``): every configuration and
workflow runs, and the JSON's figures are consistent with each other. No timing value is asserted."""

from __future__ import annotations

import json

import pytest

from tpp_monai_bench import gpu_suite
from tpp_monai_bench.__main__ import main
from tpp_monai_bench.timing import Device


def _expected_batches(sizes: dict) -> dict[str, dict[str, int]]:
    """Step group -> {configuration key: batch}, from the sizes the suite reports it used."""
    s224, s512, pre = sizes["vit_224"]["size"], sizes["vit_512"]["size"], sizes["vit_224"]["pretext_size"]
    ft224, ft512, tpp = sizes["ft_batch_224"], sizes["ft_batch_512"], sizes["tpp_batch"]
    return {
        "vit_224_finetune": {f"full_ft_{s224}": ft224, f"adapter_ft_{s224}": ft224, f"lora_ft_{s224}": ft224},
        "vit_224_tpp": {f"full_ft_{pre}_b{tpp}": tpp, f"tpp_mae_frozen_{pre}": tpp, f"tpp_mae_trainable_{pre}": tpp,
                        f"tpp_dino_{pre}": tpp},
        "vit_512_finetune": {f"full_ft_{s512}": ft512, f"adapter_ft_{s512}": ft512, f"lora_ft_{s512}": ft512},
        "stunet_lits": {"full_ft_lits": sizes["lits_batch"], "peft_ft_lits": sizes["lits_batch"],
                        "tpp_dino_lits": sizes["lits_tpp_batch"]},
    }  # fmt: skip


@pytest.mark.parametrize("group", gpu_suite.STEP_GROUPS)
def test_gpu_suite_steps_on_cpu(tmp_path, group: str) -> None:
    out = tmp_path / "suite.json"
    argv = ["--suite", "gpu", "--device", "cpu", "--smoke", "--suite-parts", "steps", "--suite-groups", group]
    assert main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    steps, sizes = result["steps"], result["sizes"]
    assert result["smoke"] and result["machine"]["device"] == "cpu"
    assert list(steps["groups"]) == [group] and "error" not in steps["groups"][group], steps["groups"]
    batches = _expected_batches(sizes)[group]
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
    gflop = {k: c["gflop_per_step"] for k, c in configs.items()}
    targets = steps["targets"]
    if group.endswith("finetune"):  # frozen weights need no weight gradients: fewer FLOPs than full fine-tuning
        full = next(k for k in gflop if k.startswith("full_ft"))
        assert all(gflop[k] < gflop[full] for k in gflop if k != full)
        if group == "vit_224_finetune":
            assert targets["full_ft_mfu"]["value"] == configs[full]["mfu"]
    if group == "vit_224_tpp":
        pre, tpp = sizes["vit_224"]["pretext_size"], sizes["tpp_batch"]
        full, mae = configs[f"full_ft_{pre}_b{tpp}"], configs[f"tpp_mae_frozen_{pre}"]
        assert mae["gflop_per_step"] < full["gflop_per_step"]
        assert targets["tpp_mae_step_ratio"]["value"] == pytest.approx(mae["step_s"] / full["step_s"])
    if group == "stunet_lits":
        assert gflop["peft_ft_lits"] < gflop["full_ft_lits"]
        assert targets["stunet_ft_peak_mib"]["value"] == configs["peft_ft_lits"]["peak_mib"]


@pytest.mark.parametrize("bundle", gpu_suite.WORKFLOW_BUNDLES)
def test_gpu_suite_workflows_on_cpu(tmp_path, bundle: str) -> None:
    sz = gpu_suite.smoke_sizes()
    # the consumption side as part 1 would report it (a given rate: the comparison's arithmetic is what is tested)
    steps = {"configs": {
        f"tpp_mae_trainable_{sz.vit_224.pretext_size}": {"images_per_s": 3.0, "label": "mae"},
        f"adapter_ft_{sz.vit_512.size}": {"images_per_s": 5.0, "label": "adapter"},
        "tpp_dino_lits": {"images_per_s": 7.0, "label": "dino"}, "peft_ft_lits": {"images_per_s": 11.0, "label": "ft"},
    }}  # fmt: skip
    result = gpu_suite.measure_workflows(sz, Device("cpu"), tmp_path, lambda msg: None, steps, (bundle,))
    names = {"glas_adapter": ["glas_adapter/pretrain_tpp", "glas_adapter/finetune"],
             "lits_conv_adapter": ["lits_conv_adapter/pretrain_tpp", "lits_conv_adapter/finetune",
                                   "lits_conv_adapter/inference"]}[bundle]  # fmt: skip
    assert list(result) == names
    for name, w in result.items():
        assert "error" not in w, (name, w.get("error"), w.get("trace"))
        assert w["iterations"] >= 1 and w["items"] >= 1 and w["run_s"] > 0
        assert len(w["iteration_s_all"]) == w["iterations"]
    consumed = {"glas_adapter/pretrain_tpp": 3.0, "glas_adapter/finetune": 5.0,
                "lits_conv_adapter/pretrain_tpp": 7.0, "lits_conv_adapter/finetune": 11.0}  # fmt: skip
    for name, rate in consumed.items():
        if name not in result:
            continue
        w = result[name]
        assert w["supply"]["images"] >= 1 and w["supply"]["images_per_s"] > 0
        assert w["consumption_images_per_s"] == rate
        assert w["supply_ratio"] == pytest.approx(w["supply"]["images_per_s"] / rate)
    if bundle == "lits_conv_adapter":
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
