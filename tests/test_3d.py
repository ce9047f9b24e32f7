"""The 3D arm (paper §5.4, Table 10): STU-Net + Conv-Adapter + DINO TPP on LiTS / KiTS19, through MONAI's bundle
workflow on the demo overlay (``stunet_tiny``, demo NIfTI volumes, 32^3 patches).

Covered elsewhere, not repeated here: an official STU-Net-B state dict (every released key and shape, v1/v2
containers, ``module.`` prefixes) loading strictly, in ``tests/test_stunet.py``
(``test_official_base_checkpoint_loads_strictly_except_heads``); the organ/tumour Dice functions against
hand-computed values (including cases without tumour), in ``tests/test_metrics.py``.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import BUNDLES, bundle_dataset, make_workflow, run_cli, run_workflow
from ignite.engine import Events
from monai.engines.utils import IterationEvents

from tpp_monai.backbones import build_backbone
from tpp_monai.bundlegen import bundle_names
from tpp_monai.bundlegen.cli import check_bundles
from tpp_monai.errors import ConfigError
from tpp_monai.io import load_verified
from tpp_monai.peft import target_parameter_names
from tpp_monai.peft.files import read_record
from tpp_monai.pretext import build_pretext, check_pretext
from tpp_monai.pretext.dino import DINOLoss

BUNDLES_3D = ["kits_conv_adapter", "kits_full_finetune", "lits_conv_adapter", "lits_full_finetune"]
TRAIN_WORKFLOWS = [(b, "finetune") for b in BUNDLES_3D] + [(b, "pretrain_tpp") for b in BUNDLES_3D if "adapter" in b]


@pytest.fixture(scope="module")
def stunet_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny STU-Net in the nnU-Net v1 container the released ``*_ep4k.model`` files use (``state_dict`` with DDP
    ``module.`` prefixes and 105 TotalSegmentator outputs, whose heads the loader skips); returns (path, weights)."""
    torch.manual_seed(0)
    state = build_backbone("stunet_tiny", task="seg", num_classes=105).state_dict()
    path = tmp_path_factory.mktemp("ckpt") / "tiny_ep4k.model"
    torch.save({"epoch": 4000, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    return path, state


def _common(runs: Path, root: Path, ckpt: Path) -> dict:
    return {"runs_dir": str(runs), "dataset_dir": str(root), "backbone_ckpt": str(ckpt), "ckpt_dir": str(runs / "m")}


@pytest.fixture(scope="module")
def tpp_run(tmp_path_factory, demo_roots, stunet_ckpt) -> dict:
    """``lits_conv_adapter`` pretrain_tpp (DINO), 2 epochs without warm-up, recording which target parameters
    received a gradient."""
    runs = tmp_path_factory.mktemp("lits_tpp")
    wf = make_workflow("lits_conv_adapter", "pretrain_tpp", ("pretrain_tpp", "demo"),
                       **_common(runs, demo_roots("lits"), stunet_ckpt[0]), epochs=2, warmup_epochs=0)  # fmt: skip
    encoder = wf.parser.get_parsed_content("network_def")
    net = wf.parser.get_parsed_content("pretext_net")
    trainer = wf.parser.get_parsed_content("train#trainer")
    targets = target_parameter_names(encoder)
    params = dict(encoder.named_parameters())
    start = {n: params[n].detach().clone() for n in targets}
    with_grad: set[str] = set()
    shapes: list = []

    def record(engine) -> None:
        with_grad.update(n for n in targets if params[n].grad is not None and params[n].grad.abs().sum() > 0)

    trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, record)
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=1),
                              lambda e: shapes.extend(tuple(c.shape) for c in e.state.batch["crops"]))  # fmt: skip
    wf.run()
    wf.finalize()
    return {"runs": runs, "encoder": encoder, "net": net, "targets": targets, "start": start,
            "with_grad": with_grad, "shapes": shapes}  # fmt: skip


def test_dino_3d_trains_every_adapter_and_nothing_else(tpp_run, stunet_ckpt) -> None:
    """Frozen backbone bit-identical to the checkpoint; every target (encoder and decoder adapters) got a gradient
    and moved; the file holds exactly the teacher's target tensors."""
    encoder, targets, net = tpp_run["encoder"], set(tpp_run["targets"]), tpp_run["net"]
    decoder = {n for n in targets if n.startswith("conv_blocks_localization.")}
    assert decoder and all(".peft_sites." in n for n in targets)
    assert tpp_run["with_grad"] == targets, f"no gradient: {sorted(targets - tpp_run['with_grad'])[:5]}"
    initial = stunet_ckpt[1]
    for name, tensor in encoder.state_dict().items():
        if name not in targets:
            assert torch.equal(tensor, initial[name]), f"frozen backbone tensor {name} changed"
    now = dict(encoder.named_parameters())
    assert all(not torch.equal(now[n], tpp_run["start"][n]) for n in targets)
    saved = read_record(tpp_run["runs"] / "pretrain_tpp" / "tpp_target")
    assert set(saved["state"]) == targets, "the file must hold the target parameters and nothing else"
    assert saved["method"] == "conv_adapter" and saved["backbone"] == "stunet_tiny" and saved["pretext"] == "dino"
    teacher = dict(net.teacher.named_parameters())
    assert all(torch.equal(saved["state"][n], teacher["backbone." + n]) for n in targets)
    # DeSD-style heads: the bottleneck head (shared with the teacher's EMA) + one per decoder level, student only
    assert len(net.heads()) == 6 and not any(n.startswith("level_heads.") for n in teacher)
    # 2 global 32^3 crops and 2 local 16x32x32 crops (same last two sizes: grouped by the full shape)
    assert tpp_run["shapes"] == [(2, 1, 32, 32, 32)] * 2 + [(2, 1, 16, 32, 32)] * 2


def test_dino_loss_averages_the_levels() -> None:
    """A student entry [L, B, K] is scored as the mean of L single-level DINO losses against the same teacher."""
    torch.manual_seed(0)
    student = [torch.randn(3, 4, 16) for _ in range(3)]
    teacher = [torch.randn(4, 16) for _ in range(2)]
    joint = DINOLoss(16)((student, teacher))
    per_level = [DINOLoss(16)(([s[level] for s in student], teacher)) for level in range(3)]
    torch.testing.assert_close(joint, torch.stack(per_level).mean())


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, demo_roots, stunet_ckpt, tpp_run) -> dict:
    """``lits_conv_adapter`` finetune from the TPP file, recording the parameters when training starts."""
    runs = tpp_run["runs"]
    wf = make_workflow("lits_conv_adapter", "finetune", ("finetune", "demo"),
                       **_common(runs, demo_roots("lits"), stunet_ckpt[0]))  # fmt: skip
    network = wf.parser.get_parsed_content("network_def")
    trainer = wf.parser.get_parsed_content("train#trainer")
    at_start: dict[str, torch.Tensor] = {}
    trainer.add_event_handler(Events.STARTED, lambda e: at_start.update(
        {n: p.detach().clone() for n, p in network.named_parameters()}))  # fmt: skip
    wf.run()
    wf.finalize()
    return {"runs": runs, "network": network, "at_start": at_start}


def test_3d_histories_are_well_formed(finetuned) -> None:
    """pretrain_tpp and finetune histories read with pandas: one row per epoch, every validation metric filled on the
    validated epochs (the demo validates every 5th epoch and after the last)."""
    runs = finetuned["runs"]
    tpp = pd.read_csv(runs / "pretrain_tpp" / "history.csv")
    assert list(tpp.columns) == ["epoch", "iteration", "train_loss", "lr", "elapsed_s"] and list(tpp["epoch"]) == [1, 2]
    history = pd.read_csv(runs / "finetune" / "history.csv")
    settings = json.loads((runs / "finetune" / "settings.json").read_text())
    assert list(history["epoch"]) == list(range(1, settings["epochs"] + 1))
    metrics = [c for c in history.columns if c.startswith("val_")]
    assert "val_mean_dice" in metrics
    validated = [e for e in history["epoch"] if e % settings["val_interval"] == 0 or e == settings["epochs"]]
    assert list(history.dropna(subset=metrics)["epoch"]) == validated


def test_finetune_starts_from_the_saved_targets_and_keeps_the_backbone(finetuned, stunet_ckpt) -> None:
    network, at_start = finetuned["network"], finetuned["at_start"]
    saved = read_record(finetuned["runs"] / "pretrain_tpp" / "tpp_target")
    targets = target_parameter_names(network)
    assert set(saved["state"]) == set(targets)
    for name in targets:
        assert torch.equal(at_start[name], saved["state"][name]), f"{name} did not start from the TPP file"
    head = set(network.head_parameter_names())
    trainable = {n for n, p in network.named_parameters() if p.requires_grad}
    assert trainable == set(targets) | head and network.deep_supervision
    for name, tensor in network.state_dict().items():
        if name not in trainable and not name.startswith("seg_outputs."):
            assert torch.equal(tensor, stunet_ckpt[1][name]), f"frozen {name} changed during fine-tuning"
    now = dict(network.named_parameters())
    still = sorted(n for n in head | set(targets) if torch.equal(now[n], at_start[n]))
    assert still == ["seg_outputs.0.bias"], still  # the coarsest head has loss weight 0: its zero bias stays (wd 0*)
    model = load_verified(finetuned["runs"] / "m" / "model.pt")
    assert model["run_info"]["tpp"] is True and model["run_info"]["tpp_pretext"] == "dino"


def test_evaluate_writes_organ_tumour_dice_per_case(finetuned, demo_roots) -> None:
    runs, root = finetuned["runs"], demo_roots("lits")
    run_workflow("lits_conv_adapter", "evaluate", runs_dir=str(runs), dataset_dir=str(root), ckpt_dir=str(runs / "m"))
    result = json.loads((runs / "evaluate" / "metrics.json").read_text())
    assert set(result["metrics"]) == {"mean_dice", "organ_dice", "tumour_dice", "organ_label1_dice"}
    assert all(0.0 <= v <= 1.0 for v in result["metrics"].values())
    with open(runs / "evaluate" / "dice_per_case.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    test_cases = json.loads((root / "datalist.json").read_text())["test"]
    assert len(rows) == len(test_cases) == result["num_images"]
    assert rows[0]["name"].endswith(Path(test_cases[0]["label"]).name)
    mean = np.mean([float(r["mean"]) for r in rows])
    assert abs(mean - result["metrics"]["mean_dice"]) < 1e-9
    assert all(abs(float(r["mean"]) - (float(r["organ"]) + float(r["tumour"])) / 2) < 1e-9 for r in rows)


def test_sliding_window_inference_writes_nifti_in_the_input_geometry(finetuned, demo_roots, tmp_path) -> None:
    """KiTS19 volumes are stored slice-axis first with an (I, P, L) affine, LiTS ones near RAS: each mask must have
    its input's shape and affine after resampling to 0.8 x 0.8 x 1.5 mm RAS and back."""
    images = tmp_path / "in"
    images.mkdir()
    sources = []
    for dataset, codes in (("kits", (1, 2)), ("lits", (0, 2))):  # (qform, sform): scanner/aligned, only aligned
        root = demo_roots(dataset)
        rec = json.loads((root / "datalist.json").read_text())["test"][0]
        src = nib.load(root / rec["image"])
        src.set_qform(src.affine, code=codes[0])
        src.set_sform(src.affine, code=codes[1])
        name = f"{dataset}_{Path(rec['image']).name}"
        nib.save(src, images / name)
        sources.append(images / name)
    runs = finetuned["runs"]
    run_workflow("lits_conv_adapter", "run", ("inference", "demo"), runs_dir=str(runs), ckpt_dir=str(runs / "m"),
                 input_dir=str(images), output_dir=str(tmp_path / "out"))  # fmt: skip
    for src in sources:
        stem = src.name.split(".nii")[0]
        mask, image = nib.load(tmp_path / "out" / f"{stem}_seg.nii.gz"), nib.load(src)
        assert mask.shape == image.shape and np.allclose(mask.affine, image.affine, atol=1e-5)
        codes = ("qform_code", "sform_code")
        assert [int(mask.header[c]) for c in codes] == [int(image.header[c]) for c in codes], src.name
        assert mask.get_data_dtype() == np.uint8 and set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2}
    assert nib.aff2axcodes(nib.load(sources[0]).affine) == ("I", "P", "L")


def test_cli_finetune_of_the_baseline_without_tpp(tmp_path, demo_roots, stunet_ckpt) -> None:
    """`python -m monai.bundle run finetune` for KiTS19 full fine-tuning: every backbone tensor trains."""
    configs = str([str(BUNDLES / "kits_full_finetune" / "configs" / f) for f in ("finetune.json", "demo.json")])
    proc = run_cli("monai.bundle", "run", "finetune", "--config_file", configs, "--runs_dir", str(tmp_path),
                   "--dataset_dir", str(demo_roots("kits")), "--backbone_ckpt", str(stunet_ckpt[0]),
                   "--ckpt_dir", str(tmp_path / "m"), "--iterations", "2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = load_verified(tmp_path / "m" / "model.pt")
    assert model["run_info"]["tpp"] is False and model["run_info"]["method"] == "full_finetune"
    trained = load_verified(next((tmp_path / "finetune" / "checkpoints").glob("*.pt")))["trainable"]
    assert set(trained) == set(model["model"])  # the whole network (backbone and heads) trains


def test_finetune_without_tpp_starts_from_random_adapters(tmp_path, demo_roots, stunet_ckpt) -> None:
    wf = make_workflow("kits_conv_adapter", "finetune", ("finetune", "demo"), tpp_ckpt="none", iterations=2,
                       **_common(tmp_path, demo_roots("kits"), stunet_ckpt[0]))  # fmt: skip
    network = wf.parser.get_parsed_content("network_def")
    scales = [p for n, p in network.named_parameters() if n.endswith(".scale")]
    assert scales and all(torch.all(s == 1.0) for s in scales)  # Conv-Adapter's released init, no TPP file
    wf.run()
    wf.finalize()
    assert load_verified(tmp_path / "m" / "model.pt")["run_info"]["tpp"] is False


@pytest.mark.parametrize(("bundle", "workflow"), TRAIN_WORKFLOWS)
def test_train_workflows_pass_check_properties(tmp_path, demo_roots, bundle, workflow) -> None:
    wf = make_workflow(bundle, workflow, (workflow, "demo"), runs_dir=str(tmp_path), tpp_ckpt="none",
                       dataset_dir=str(demo_roots(bundle_dataset(bundle))))  # fmt: skip
    assert wf.check_properties() == []


def _error_chain(exc: BaseException) -> str:
    messages = []
    while exc is not None:
        messages.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(messages)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"pretext": "mae"}, r"pretext 'mae' needs 'tokens:drop'.* the stunet backbone 'stunet_tiny'.*--pretext dino"),
        ({"image_size": [40, 32, 32]}, r"image_size \[40, 32, 32\]: .*axis 0 has 40 voxels.*multiple of 16"),
        ({"dino": {"local_size": [16, 16, 32]}}, r"dino local_size \[16, 16, 32\].*bottleneck"),
        (
            {"pretext": "mim", "mim": {"mask_patch": 12}},
            r"image_size \[32, 32, 32\]: the MIM input size .* not a multiple of the mask cell \[12, 12, 12\]",
        ),
        ({"backbone": "medcoss_vit_tiny"}, r"'medcoss_vit_tiny' \(medcoss\) does not segment 3D .*stunet_b.*swinunetr"),
    ],
)
def test_bad_3d_settings_fail_before_any_volume_is_cached(tmp_path, overrides, expected) -> None:
    """The checks run in ``initialize`` (the demo data are not even made: ``dataset_dir`` points nowhere)."""
    with pytest.raises(Exception) as info:
        make_workflow("lits_conv_adapter", "pretrain_tpp", ("pretrain_tpp", "demo"), runs_dir=str(tmp_path),
                      dataset_dir=str(tmp_path / "none"), **overrides)  # fmt: skip
    assert re.search(expected, _error_chain(info.value)), _error_chain(info.value)


def test_mae_is_refused_on_stunet_everywhere() -> None:
    with pytest.raises(ConfigError, match="use --pretext dino"):
        check_pretext("mae", "stunet_b")
    with pytest.raises(ConfigError, match=r"which the stunet backbone .stunet_tiny. does not give"):
        build_pretext("mae", build_backbone("stunet_tiny", task="features"))
    assert check_pretext("mae", "medcoss_vit_tiny") == "mae"


def test_committed_3d_bundles_match_the_generator() -> None:
    swinunetr = [f"{d}_swinunetr_{m}" for d in ("kits", "lits") for m in ("full_finetune", "lora")]
    assert sorted(bundle_names(3)) == sorted(BUNDLES_3D + swinunetr)  # the STU-Net ones are checked below
    assert set(bundle_names(2)).isdisjoint(BUNDLES_3D) and set(bundle_names()) >= set(BUNDLES_3D)
    assert [p for p in check_bundles() if p.split("/")[0] in BUNDLES_3D] == []
    for bundle in BUNDLES_3D:
        configs = BUNDLES / bundle / "configs"
        assert (configs / "pretrain_tpp.json").exists() == bundle.endswith("conv_adapter")
        finetune = json.loads((configs / "finetune.json").read_text())
        assert finetune["backbone"] == "stunet_b" and finetune["backbone_options"] == {"deep_supervision": True}
        assert finetune["loss"]["weights"] == [1, 0.5, 0.25, 0.125, 0]
        readme = (BUNDLES / bundle / "docs" / "README.md").read_text()
        assert ("pretrain_tpp does not apply" in readme) == bundle.endswith("full_finetune")


@pytest.mark.parametrize("bundle", ["kits_conv_adapter", "lits_full_finetune"])
def test_metadata_matches_the_network(bundle) -> None:
    """MONAI's ``verify_net_in_out`` with the metadata's patch shape (``stunet_tiny`` keeps it fast)."""
    from monai.bundle import verify_net_in_out

    configs = BUNDLES / bundle / "configs"
    verify_net_in_out("network_def", meta_file=str(configs / "metadata.json"),
                      config_file=str(configs / "inference.json"), backbone="stunet_tiny")  # fmt: skip
