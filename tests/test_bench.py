"""The bench's accounting on toy models: FLOP counts against hand-computed values, memory bookkeeping, ratio and
target arithmetic, and the activation-checkpointing switch it measures. No timings are asserted."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tpp_monai_bench as bench
from tpp_monai.backbones import build_backbone
from tpp_monai.backbones.vit import set_activation_checkpointing
from tpp_monai.errors import ConfigError


def test_linear_flops_forward_and_backward() -> None:
    layer = nn.Linear(16, 32)
    x = torch.randn(4, 16, requires_grad=True)
    assert bench.count_flops(lambda: layer(x)) == 2 * 4 * 16 * 32
    # backward: grad of the input (4x32 @ 32x16) and of the weight (32x4 @ 4x16), each as many FLOPs as the forward
    assert bench.count_flops(lambda: layer(x).sum().backward()) == 3 * 2 * 4 * 16 * 32


def test_attention_flops_on_cpu_kernels() -> None:
    b, h, length, d = 2, 3, 5, 8
    q, k, v = (torch.randn(b, h, length, d, requires_grad=True) for _ in range(3))
    # QK^T and PV: two products of L x d by d x L (or L x L by L x d) per batch and head
    forward = 2 * (2 * b * h * length * length * d)
    assert bench.count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == forward
    # backward (PyTorch's formula): recomputed scores, dP, dV, dQ, dK -> five such products
    total = bench.count_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())
    assert total == forward + 5 * (2 * b * h * length * length * d)


def test_vit_forward_flops_match_the_analytic_formula() -> None:
    model = build_backbone("medcoss_vit_tiny", task="features").eval()
    x = torch.randn(2, 3, 32, 32)  # 2x2 patches + class token
    with torch.no_grad():
        counted = bench.count_flops(lambda: model(x))
    dim, depth, mlp = 96, 4, 384
    expected = bench.vit_encoder_flops(2, 5, dim, depth, mlp) + bench.patch_embed_flops(2, 4, 3, 16, dim)
    assert counted == expected
    # spelled out for one block and one token: q, k, v, out (4 d^2) and the MLP (2 d m) multiply-adds, 2 FLOPs each
    per_block = 2 * 2 * (5 * (4 * dim * dim + 2 * dim * mlp) + 2 * 5 * 5 * dim)
    assert bench.vit_encoder_flops(2, 5, dim, 1, mlp) == per_block


def test_ratio_and_overhead_arithmetic() -> None:
    assert bench.ratio(3.0, 4.0) == pytest.approx(0.75)
    assert bench.ratio(None, 4.0) is None
    assert bench.ratio(1.0, 0.0) is None
    # 1.02 s per engine iteration + 0.6 s epoch-end work over 6 iterations, against 1.0 s bare
    assert bench.overhead(1.02, 0.6, 6, 1.0) == pytest.approx(0.12)
    assert bench.overhead(1.0, 0.0, 6, 1.0) == pytest.approx(0.0)
    assert bench.median([3.0, 1.0, 2.0]) == 2.0
    assert bench.median([]) is None


def test_target_pass_fail_and_shortfall() -> None:
    at_most = bench.TARGETS_BY_KEY["tpp_mae_step_ratio"]
    assert at_most.met(0.40) and at_most.met(0.1)
    assert not at_most.met(0.45)
    assert at_most.missed_by(0.45) == pytest.approx(0.05)
    assert at_most.missed_by(0.3) is None
    at_least = bench.TARGETS_BY_KEY["data_supply_ratio"]
    assert at_least.met(2.0) and not at_least.met(1.5)
    assert at_least.missed_by(1.5) == pytest.approx(0.5)
    assert at_least.met(None) is None and at_least.met(float("nan")) is None

    values = {"tpp_mae_step_ratio": 0.3, "peft_step_ratio": 0.7, "engine_overhead": None}
    out = bench.evaluate_targets(values, {"peft_step_ratio": "because"})
    assert set(out) == {t.key for t in bench.TARGETS}
    assert out["tpp_mae_step_ratio"]["met"] is True and out["tpp_mae_step_ratio"]["why"] is None
    assert out["peft_step_ratio"]["met"] is False
    assert out["peft_step_ratio"]["missed_by"] == pytest.approx(0.05)
    assert out["peft_step_ratio"]["why"] == "because"
    assert out["engine_overhead"]["met"] is None and "not measured" in out["engine_overhead"]["why"]


def test_memory_bookkeeping() -> None:
    assert bench.allocation_peak([100, 50, -120, 200, -230]) == 230
    assert bench.allocation_peak([-10, 5]) == 0
    weight = torch.zeros(256)  # 1 KiB
    view = weight[:10]
    other = torch.zeros(64, dtype=torch.float64)  # 512 B
    assert bench.unique_bytes([weight, view, other, None, weight]) == 1024 + 512


def test_peak_memory_of_a_toy_step() -> None:
    device = bench.Device("cpu")
    keep = torch.zeros(1024)  # 4 KiB persistent

    def step() -> None:
        big = torch.ones(1 << 18)  # 1 MiB, freed before the small one is allocated
        del big
        small = torch.ones(1 << 16)  # 256 KiB
        del small

    persistent, peak = bench.measure_peak_memory(device, step, lambda: [keep])
    assert persistent == 4096
    assert 4096 + (1 << 20) <= peak <= 4096 + (1 << 20) + (64 << 10)


def test_activation_checkpointing_keeps_gradients() -> None:
    def grads(checkpointing: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = build_backbone("medcoss_vit_tiny", task="cls", num_classes=2, drop_path=0.2).train()
        assert set_activation_checkpointing(model, checkpointing) == 1
        x = torch.randn(2, 3, 32, 32)
        torch.manual_seed(1)  # same DropPath masks and temporal rows in both runs
        model(x).sum().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain, ckpt = grads(False), grads(True)
    assert len(plain) == len(ckpt) > 0
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b)


def test_bundle_option_switches_checkpointing_on_encoder_and_decoder(tmp_path, demo_roots) -> None:
    from conftest import make_workflow

    from tpp_monai.workflows import activation_checkpointing

    wf = make_workflow(
        "mhist_adapter", "pretrain_tpp", ("pretrain_tpp", "demo"), runs_dir=str(tmp_path),
        dataset_dir=str(demo_roots("mhist")), activation_checkpointing=True, tpp_epochs=1,
    )  # fmt: skip
    net = wf.parser.get_parsed_content("pretext_net")
    flags = [m.activation_checkpointing for m in net.modules() if hasattr(type(m), "activation_checkpointing")]
    assert flags == [True, True]  # the encoder and the MAE decoder
    wf.run()
    assert (tmp_path / "pretrain_tpp" / "tpp_target.pt").is_file()
    with pytest.raises(ConfigError, match="ViT backbones"):
        activation_checkpointing(build_backbone("stunet_tiny", task="seg", num_classes=2), True)


def test_report_and_cli_validation() -> None:
    configs = {
        key: {
            "label": key, "step_s": s, "step_s_all": [s], "images_per_s": 2 / s, "peak_mib": m,
            "gflop_per_step": 10.0, "gflop_per_s": 10.0 / s, "matmul_fraction": 0.5, "trainable": 1,
            "weights_mib": w, "persistent_mib": m - 50.0,
        }
        for key, s, m, w in (
            ("full_ft", 2.0, 1000.0, 300.0), ("peft_ft", 1.0, 500.0, 300.0), ("tpp_mae_frozen", 0.7, 450.0, 400.0)
        )
    }  # fmt: skip
    result = {
        "config": {"backbone": "b", "family": "medcoss", "method": "adapter", "image_size": 224, "patch_size": 64,
                   "batch_size": 2, "steps": 1, "warmup": 0},
        "machine": {"cpu": "x", "cores": 2, "device": "cpu", "threads": 2, "torch": "t"},
        "steps": {"matmul": {"label": "gemm", "gflop_per_s": 100.0}, "configs": configs,
                  "ratios": {"peft_step_ratio": 0.5, "tpp_mae_step_ratio": 0.35, "tpp_mae_memory_ratio": 0.45}},
        "data": {"images_per_s": 10.0, "workers": 1, "dataset": "d", "transforms": "t", "cache_s": 0.1},
        "wall_s": 1.0,
    }  # fmt: skip
    ratios = bench.collect_ratios(result)
    assert ratios["data_supply_ratio"] == pytest.approx(10.0 / (2 / 0.7))
    result["targets"] = bench.evaluate_targets(ratios, bench.explain(result))
    assert result["targets"]["tpp_mae_memory_ratio"]["met"] is False
    assert "400 MiB fp32 weights, 0.40 x" in result["targets"]["tpp_mae_memory_ratio"]["why"]
    assert "above the 0.65 target" in bench.explain(result)["peft_step_ratio"]  # equal FLOPs: x1.00
    configs["peft_ft"]["gflop_per_step"] = 6.0  # 0.6 x full fine-tuning's FLOPs: under the 0.65 step target
    assert "the ratio would be 0.60" in bench.explain(result)["peft_step_ratio"]
    text = bench.format_report(result)
    assert "MISSED by 0.050" in text and "tpp_mae_step_ratio" in text

    parser = argparse.ArgumentParser()
    bench.configure(parser)
    with pytest.raises(ConfigError, match="unknown bench section"):
        bench.run(parser.parse_args(["--sections", "steps,nope"]))
    with pytest.raises(ConfigError, match="--engine-reps 0: counts must be >= 1"):
        bench.run(parser.parse_args(["--engine-reps", "0"]))
    with pytest.raises(ConfigError, match="unknown dataset 'foo'"):
        bench.run(parser.parse_args(["--sections", "data", "--dataset", "foo"]))
    with pytest.raises(ConfigError, match="cannot tune backbone"):
        bench.run(parser.parse_args(["--method", "conv_adapter"]))
