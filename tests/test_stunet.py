"""STU-Net backbone and Conv-Adapter: official keys and counts, nnU-Net v1/v2 checkpoint containers, input-size
errors, deep supervision, the pretext features and the Conv-Adapter options (uni-medical/STU-Net)."""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tpp_monai.backbones import BACKBONES, build_backbone, load_backbone_checkpoint
from tpp_monai.backbones.stunet import STUNet
from tpp_monai.errors import CheckpointError, ConfigError
from tpp_monai.network import build_network
from tpp_monai.peft import (
    apply_peft,
    count_parameters,
    load_target_state,
    target_parameter_names,
    target_state,
)

KEYS = Path(__file__).parent / "fixtures" / "keys"
RELEASED = {"s": "small", "b": "base", "l": "large", "h": "huge"}
OFFICIAL_COUNTS = {"s": 14_596_941, "b": 58_262_669, "l": 440_302_605, "h": 1_457_326_221}
PATCH = (32, 32, 32)  # smallest cube that trains with the default strides (bottleneck 2x2x1)


def _spec(variant: str) -> dict:
    return json.loads((KEYS / f"stunet_{variant}.json").read_text())


def _tiny(task: str = "seg", **kwargs: object) -> STUNet:
    torch.manual_seed(0)
    return build_backbone("stunet_tiny", task=task, out_channels=3, **kwargs)


def _x(batch: int = 2, size: tuple[int, ...] = PATCH) -> torch.Tensor:
    return torch.randn(batch, 1, *size, generator=torch.Generator().manual_seed(3))


# ----- architecture ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["s", "b", "l", "h"])
def test_official_keys_shapes_and_counts(variant: str) -> None:
    """The released key list, order and shapes (S/B/L/H, 105 outputs) and the README parameter counts; built on the
    meta device, so L and H allocate nothing."""
    spec = _spec(variant)
    with torch.device("meta"):
        model = build_backbone(f"stunet_{variant}", task="seg", num_classes=105)
    assert [[k, list(v.shape)] for k, v in model.state_dict().items()] == spec["keys"]
    assert sum(p.numel() for p in model.parameters()) == spec["num_params"] == OFFICIAL_COUNTS[variant]
    constructor = spec["constructor"]
    assert model.dims == constructor["dims"] and model.depth == constructor["depth"]
    assert [list(s) for s in model.pool_op_kernel_sizes] == constructor["pool_op_kernel_sizes"]
    assert BACKBONES[f"stunet_{variant}"].family == "stunet"
    assert f"{RELEASED[variant]}_ep4k.model" in BACKBONES[f"stunet_{variant}"].weights


def test_positional_constructor_and_he_init() -> None:
    """The official positional signature; nnU-Net v1 He init (kaiming normal a=0.01, zero bias)."""
    c = _spec("s")["constructor"]
    torch.manual_seed(0)
    model = STUNet(1, 105, c["depth"], [d // 2 for d in c["dims"]], c["pool_op_kernel_sizes"], c["conv_kernel_sizes"])
    conv = model.conv_blocks_localization[0][0].conv1  # 256 -> 128, fan_in 256 * 27
    expected = math.sqrt(2.0 / (1 + 1e-4)) / math.sqrt(conv.weight[0].numel())
    assert abs(conv.weight.std().item() / expected - 1) < 0.02
    assert all(torch.all(m.bias == 0) for m in model.modules() if isinstance(m, torch.nn.Conv3d))
    assert model.head_parameter_names() == [n for n, _ in model.named_parameters() if n.startswith("seg_outputs.")]


def test_configuration_errors() -> None:
    with pytest.raises(ConfigError, match=r"unknown task 'cls'.*seg, features"):
        build_backbone("stunet_tiny", task="cls", num_classes=3)
    with pytest.raises(ConfigError, match=r"num_classes \(or out_channels\) >= 2"):
        build_backbone("stunet_tiny", task="seg")
    with pytest.raises(ConfigError, match="pass one of them"):
        build_backbone("stunet_tiny", task="seg", num_classes=2, out_channels=3)
    with pytest.raises(ConfigError, match=r"5 triples.*pad with \[1, 1, 1\]"):
        build_backbone("stunet_tiny", task="seg", num_classes=3, pool_op_kernel_sizes=[[2, 2, 2]] * 6)
    with pytest.raises(ConfigError, match="6 positive depths"):
        build_backbone("stunet_tiny", task="seg", num_classes=3, depth=[1, 1])


def test_input_size_errors_name_the_size_and_the_multiple() -> None:
    model = _tiny().train()
    with pytest.raises(ConfigError, match=r"\(32, 32, 48\): axis 2 has 48 voxels, which is not a multiple of 32"):
        model(_x(1, (32, 32, 48)))
    with pytest.raises(ConfigError, match=r"axis 0 has 40 voxels.*multiple of 16.*e\.g\. \(48, 32, 32\)"):
        model.check_input_size((40, 32, 32))
    with pytest.raises(ConfigError, match=r"\(1, 1, 1\) bottleneck; InstanceNorm needs more than one voxel"):
        model(_x(1, (16, 16, 32)))
    with pytest.raises(ConfigError, match=r"InstanceNorm needs more than one voxel \(training and inference\)"):
        model.check_input_size((16, 16, 32))
    with torch.no_grad(), pytest.raises(ConfigError, match="bottleneck"):
        model.eval()(_x(1, (16, 16, 32)))
    model.train()
    with pytest.raises(ConfigError, match=r"expects \[B, 1, D, H, W\]"):
        model(torch.zeros(1, 2, *PATCH))
    # anisotropic strides as nnU-Net plans them for 1.5 x 0.8 x 0.8 mm data: patch 64 x 192 x 192 (z, y, x)
    aniso = build_backbone(
        "stunet_tiny", task="seg", num_classes=3, pool_op_kernel_sizes=[[1, 2, 2]] + [[2, 2, 2]] * 3 + [[1, 2, 2]]
    )
    assert aniso.stride_product == (8, 32, 32)
    aniso.check_input_size((64, 192, 192))


def test_deep_supervision_tuple_in_training_single_tensor_in_eval() -> None:
    from monai.losses import DeepSupervisionLoss, DiceCELoss

    model = _tiny(deep_supervision=True).train()
    outs = model(_x())
    assert isinstance(outs, tuple) and len(outs) == 5
    assert [tuple(o.shape) for o in outs] == [(2, 3, 32 // 2**i, 32 // 2**i, 32 // 2**i) for i in range(5)]
    assert model.unused_parameter_names() == set()
    # nnU-Net weights 1/2^i with the coarsest level off; MONAI interpolates float targets per level
    label = torch.randint(0, 3, (2, 1, *PATCH)).float()
    loss = DeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True), weights=[1, 0.5, 0.25, 0.125, 0])
    loss(list(outs), label).backward()
    assert model.seg_outputs[0].weight.grad is not None
    model.eval()
    with torch.no_grad():
        assert model(_x()).shape == (2, 3, *PATCH)
    model.deep_supervision = False
    model.train()
    assert model(_x()).shape == (2, 3, *PATCH)
    assert model.unused_parameter_names() == {f"seg_outputs.{u}.{p}" for u in range(4) for p in ("weight", "bias")}


def test_sliding_window_inference_on_a_volume() -> None:
    from monai.inferers import sliding_window_inference

    model = _tiny(deep_supervision=True).eval()  # eval: one tensor, so MONAI stitches one output
    volume = _x(1, (40, 33, 32))
    with torch.no_grad():
        out = sliding_window_inference(volume, PATCH, 2, model, overlap=0.25, mode="gaussian")
    assert out.shape == (1, 3, 40, 33, 32)


def test_features_task_pools_the_bottleneck_and_every_decoder_level() -> None:
    model = _tiny("features").eval()
    assert model.head_parameter_names() == []
    assert not any(n.startswith("seg_outputs") for n, _ in model.named_parameters())
    with torch.no_grad():
        pooled = model(_x())
        levels = model.forward_features(_x())
    assert pooled.shape == (2, 128)
    assert model.feature_dims == [128, 128, 64, 32, 16, 8]
    assert [tuple(f.shape) for f in levels] == [(2, d) for d in model.feature_dims]
    torch.testing.assert_close(levels[0], pooled)
    assert model.unused_parameter_names() == {
        n for n, _ in model.named_parameters() if n.startswith(("upsample_layers.", "conv_blocks_localization."))
    }


# ----- checkpoints -------------------------------------------------------------------------------------------------
def _official_state(variant: str) -> dict[str, torch.Tensor]:
    """The official keys and shapes, a distinct constant per tensor. Each tensor is a broadcast view of one number,
    so the file stays small while every key and shape is the released one."""
    return {k: torch.tensor(1e-3 * (i + 1)).expand(shape) for i, (k, shape) in enumerate(_spec(variant)["keys"])}


def _to_numpy1_pickle(path: Path) -> None:
    """Rewrite a torch.save file as numpy 1 writes it (the released .model files): numpy.core.* globals."""
    with zipfile.ZipFile(path) as src:
        entries = [(info, src.read(info)) for info in src.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for info, data in entries:
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray\nscalar" in data
                data = data.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar")
            dst.writestr(info, data)


def _write_checkpoint(path: Path, fmt: str, state: dict[str, torch.Tensor]) -> Path:
    if fmt.startswith("v1"):  # NetworkTrainer.save_checkpoint (nnU-Net v1), DDP-trained: module. prefixes
        obj = {
            "epoch": 4000,
            "state_dict": {"module." + k: v for k, v in state.items()},
            "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 1e-2, "momentum": 0.99, "params": [0]}]},
            "lr_scheduler_state_dict": None,
            "plot_stuff": ([1.2, 0.9], [1.1, 0.95], [1.0, 0.9], [np.float64(0.71), np.float64(0.74)]),
            "best_stuff": (3999, np.float64(0.42), np.float64(0.74), np.float64(0.73)),
            "amp_grad_scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 12},
        }
    else:  # nnUNetTrainer.save_checkpoint (nnU-Net v2)
        obj = {
            "network_weights": state,
            "optimizer_state": {"state": {}, "param_groups": []},
            "grad_scaler_state": None,
            "logging": {"ema_fg_dice": [np.float64(0.5)], "epoch_end_timestamps": [1.7e9]},
            "_best_ema": np.float64(0.81),
            "current_epoch": 1000,
            "init_args": {"configuration": "3d_fullres", "fold": 0, "device": torch.device("cpu")},
            "trainer_name": "STUNetTrainer_base_ft",
            "inference_allowed_mirroring_axes": (0, 1, 2),
        }
    torch.save(obj, path)
    if fmt == "v1_numpy1":
        _to_numpy1_pickle(path)
    return path


@pytest.fixture(scope="module")
def base_model() -> STUNet:
    return build_backbone("stunet_b", task="seg", out_channels=3)


@pytest.mark.parametrize("fmt", ["v1", "v1_numpy1", "v2"])
def test_official_base_checkpoint_loads_strictly_except_heads(base_model: STUNet, tmp_path: Path, fmt: str) -> None:
    state = _official_state("b")
    name = "base_ep4k.model" if fmt.startswith("v1") else "checkpoint_final.pth"
    path = _write_checkpoint(tmp_path / name, fmt, state)
    report = load_backbone_checkpoint(base_model, path)
    assert len(report.loaded) == 120 and len(state) == 130
    heads = report.unused["deep-supervision heads of the checkpoint (fresh seg_outputs are trained)"]
    assert sorted(heads) == sorted(k for k in state if k.startswith("seg_outputs."))
    own = base_model.state_dict()
    for key in ("conv_blocks_context.0.0.conv1.weight", "conv_blocks_localization.4.0.conv3.bias"):
        assert torch.equal(own[key], state[key].expand_as(own[key]))
    assert own["seg_outputs.4.weight"].shape == (3, 32, 1, 1, 1)
    assert "loaded 120 tensors" in report.summary()


def test_checkpoint_loads_into_features_model_and_network(tmp_path: Path) -> None:
    """The pretext (features) model has no heads; build_network loads, injects Conv-Adapter and marks the trainables."""
    seg = _tiny()
    path = _write_checkpoint(tmp_path / "tiny.model", "v1", {k: v.clone() for k, v in seg.state_dict().items()})
    report = load_backbone_checkpoint(_tiny("features"), path)
    assert len(report.loaded) == len(seg.state_dict()) - 10
    net = build_network("stunet_tiny", task="seg", method="conv_adapter", out_channels=3, backbone_ckpt=path)
    assert torch.equal(net.conv_blocks_context[2][0].conv2.weight, seg.conv_blocks_context[2][0].conv2.weight)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    # exactly the Conv-Adapters and the segmentation heads, named independently of the method's own rule
    expected = {n for n, _ in net.named_parameters() if ".peft_sites." in n or n.startswith("seg_outputs.")}
    assert expected and trainable == expected
    with pytest.raises(ConfigError, match=r"no backbone checkpoint given for 'stunet_b'.*ziyanhuang/STU-Net"):
        build_network("stunet_b", task="seg", method="conv_adapter", out_channels=3)


def test_missing_or_mismatched_keys_name_the_file_and_the_key(tmp_path: Path) -> None:
    model = _tiny()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    missing = dict(state)
    del missing["conv_blocks_context.3.0.conv2.weight"]
    path = _write_checkpoint(tmp_path / "missing.model", "v1", missing)
    with pytest.raises(CheckpointError, match=r"missing\.model.*\n.*missing keys: conv_blocks_context\.3\.0\.conv2"):
        load_backbone_checkpoint(model, path)
    bad = dict(state, **{"upsample_layers.2.conv.weight": torch.zeros(32, 32, 1, 1, 1)})
    path = _write_checkpoint(tmp_path / "mismatch.pth", "v2", bad)
    with pytest.raises(CheckpointError, match=r"mismatch\.pth[\s\S]*upsample_layers\.2\.conv\.weight: checkpoint"):
        load_backbone_checkpoint(model, path)
    with pytest.raises(CheckpointError, match=r"base_ep4k\.model"):  # another size: every shape differs
        load_backbone_checkpoint(model, _write_checkpoint(tmp_path / "base_ep4k.model", "v1", _official_state("b")))


# ----- Conv-Adapter ------------------------------------------------------------------------------------------------
def _adapter_params(channels: int, gamma: int = 8, k: int = 3) -> int:
    """stunet.md §2.1: grouped conv C -> C/gamma (gamma inputs per group) + 1x1x1 C/gamma -> C + scale C."""
    w = channels // gamma
    return w * gamma * k**3 + w + w * channels + channels + channels


def test_conv_adapter_on_base_counts() -> None:
    """Default: conv2-parallel, gamma 8, every residual block of encoder and decoder (11 blocks on STU-Net-B)."""
    with torch.device("meta"):
        plain = build_backbone("stunet_b", task="seg", out_channels=3)
        model = apply_peft(build_backbone("stunet_b", task="seg", out_channels=3), "conv_adapter")
    dims = [32, 64, 128, 256, 512, 512]
    expected = sum(_adapter_params(c) for c in dims) + sum(_adapter_params(c) for c in dims[:-1])
    counts = count_parameters(model)
    assert counts["target"] == expected == 192_760
    assert counts["trainable"] == expected + 2_991  # + the five 3-class heads
    assert sum(p.numel() for p in plain.parameters()) == 58_160_975
    assert len(target_parameter_names(model)) == 11 * 5  # scale, down.weight/bias, up.weight/bias
    assert model.peft_options["placement"] == "conv2" and model.peft_options["reduction"] == 8


@pytest.mark.parametrize(
    "options", [{"placement": "conv1"}, {"placement": "residual"}, {"reduction": 4, "kernel_size": 1}]
)
def test_conv_adapter_placements_run_and_change_the_output(options: dict) -> None:
    plain = _tiny().eval()
    model = apply_peft(_tiny(), "conv_adapter", options).eval()
    model.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        out, ref = model(_x()), plain(_x())
    assert out.shape == ref.shape == (2, 3, *PATCH)
    assert not torch.allclose(out, ref, atol=1e-6)  # scale 1.0 as released: not the identity


def test_conv_adapter_zero_scale_is_identity_and_options_are_checked() -> None:
    plain = _tiny().eval()
    model = apply_peft(_tiny(), "conv_adapter", {"scale_init": 0.0}).eval()
    model.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(model(_x()), plain(_x()), rtol=0, atol=0)
    encoder_only = apply_peft(_tiny(), "conv_adapter", {"parts": ["encoder"], "train_norms": True})
    targets = target_parameter_names(encoder_only)
    assert not any(n.startswith("conv_blocks_localization.") and "peft" in n for n in targets)
    assert "conv_blocks_localization.0.0.norm1.weight" in targets
    for options, message in (
        ({"placement": "conv3"}, "placement 'conv3' unknown; valid: conv1, conv2, residual"),
        ({"parts": ["head"]}, "parts must be a non-empty subset"),
        ({"reduction": 3}, "reduction 3 gives width 5 for 16 input channels"),
        ({"kernel_size": 2}, "kernel_size must be odd"),
    ):
        with pytest.raises(ConfigError, match=message):
            apply_peft(_tiny(), "conv_adapter", options)
    with pytest.raises(ConfigError, match=r"which the timm_vit backbone .vit_tiny. does not provide"):
        apply_peft(build_backbone("vit_tiny"), "conv_adapter")


def test_pretext_targets_transfer_to_the_seg_model_and_decoder_adapters_learn() -> None:
    """TPP: adapters trained on the features model (DeSD-style loss on every level) load into the seg model."""
    pretext = apply_peft(_tiny("features"), "conv_adapter")
    names = target_parameter_names(pretext)
    assert any(n.startswith("conv_blocks_localization.") for n in names)
    levels = pretext.train().forward_features(_x())
    sum(f.square().mean() for f in levels).backward()
    grads = dict(pretext.named_parameters())
    assert all(grads[n].grad is not None and grads[n].grad.abs().sum() > 0 for n in names)
    with torch.no_grad():
        for n in names:
            grads[n].add_(0.1)
    seg = apply_peft(_tiny(), "conv_adapter")
    assert sorted(load_target_state(seg, target_state(pretext))) == sorted(names)
    assert torch.equal(dict(seg.named_parameters())[names[-1]], grads[names[-1]])
