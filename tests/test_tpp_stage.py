"""The TPP stage (issue: pretrain_tpp workflow of every 2D bundle), run through MONAI's bundle workflow."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import BUNDLES, make_workflow, run_cli, run_workflow
from ignite.engine import Events

from tpp_monai.backbones import build_backbone
from tpp_monai.bundlegen import BASELINES, bundle_names
from tpp_monai.bundlegen.cli import check_bundles
from tpp_monai.data.info import DATASETS
from tpp_monai.io import load_verified
from tpp_monai.peft import METHODS, applicable_methods, get_method, target_parameter_names
from tpp_monai.peft.files import read_record

get_method("adapter")
TPP_METHODS = [m for m in applicable_methods("medcoss_vit_tiny") if METHODS[m].pretrainable]
DATASETS_2D = [d for d, info in DATASETS.items() if info.spatial_dims == 2]


@pytest.fixture(scope="module")
def tiny_backbone_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MedCoSS backbone in the MedCoSS pre-training container, so frozen tensors can be compared."""
    torch.manual_seed(0)
    model = build_backbone("medcoss_vit_tiny", task="features")
    path = tmp_path_factory.mktemp("ckpt") / "tiny_medcoss.pth"
    torch.save({"model": model.state_dict(), "epoch": 0}, path)
    return path


def _overrides(tmp_path: Path, root: Path, **extra: object) -> dict:
    return {"runs_dir": str(tmp_path), "dataset_dir": str(root), "epochs": 1, **extra}


@pytest.mark.parametrize("pretext", ["mae", "dino"])
@pytest.mark.parametrize("method", TPP_METHODS)
def test_one_epoch_trains_targets_only(tmp_path, demo_roots, tiny_backbone_ckpt, method, pretext) -> None:
    """One epoch of every method: three optimizer steps without warm-up (the first step of a warm-up has lr 0) and
    without weight decay, so that only gradients move tensors (zero-initialised factors need a second step)."""
    wf = make_workflow(f"glas_{method}", "pretrain_tpp", ("pretrain_tpp", "demo"), **_overrides(
        tmp_path, demo_roots("glas"), pretext=pretext, backbone_ckpt=str(tiny_backbone_ckpt), batch_size=3,
        warmup_epochs=0, weight_decay=0.0, weight_decay_end=0.0))  # fmt: skip
    encoder = wf.parser.get_parsed_content("network_def")
    targets = set(target_parameter_names(encoder))
    start = {n: p.detach().clone() for n, p in encoder.named_parameters() if n in targets}
    wf.run()
    wf.finalize()
    initial = torch.load(tiny_backbone_ckpt, weights_only=True)["model"]
    for name, tensor in encoder.state_dict().items():
        if name not in targets:
            assert torch.equal(tensor, initial[name]), f"frozen backbone tensor {name} changed"
    now = dict(encoder.named_parameters())
    unused = encoder.unused_parameter_names()
    for name in targets - unused:
        assert not torch.equal(now[name], start[name]), f"target {name} did not change"
    saved = read_record(tmp_path / "pretrain_tpp" / "tpp_target")
    assert set(saved["state"]) == targets, "the file must hold the target parameters and nothing else"
    assert saved["method"] == method and saved["backbone"] == "medcoss_vit_tiny"
    exported = now if pretext == "mae" else dict(wf.parser.get_parsed_content("pretext_net").teacher.named_parameters())
    prefix = "" if pretext == "mae" else "backbone."
    assert all(torch.equal(saved["state"][n], exported[prefix + n]) for n in targets)


def test_targets_change_and_checkpoint_resumes(tmp_path, demo_roots, tiny_backbone_ckpt) -> None:
    """Every target tensor moves during the stage; the resume checkpoint holds optimizer, decoder and engine state."""
    root = demo_roots("mhist")
    wf = make_workflow("mhist_lora", "pretrain_tpp", ("pretrain_tpp", "demo"),
                       **_overrides(tmp_path, root, epochs=2, backbone_ckpt=str(tiny_backbone_ckpt)))  # fmt: skip
    encoder = wf.parser.get_parsed_content("network_def")
    before = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    wf.run()
    wf.finalize()
    for name in target_parameter_names(encoder):
        assert not torch.equal(before[name], dict(encoder.named_parameters())[name]), f"target {name} did not move"
    ckpt = load_verified(next((tmp_path / "pretrain_tpp" / "checkpoints").glob("*.pt")))
    assert set(ckpt) == {"target_state", "pretext", "optimizer", "loss", "trainer", "rng"}
    assert ckpt["trainer"]["epoch_length"] >= 1 and ckpt["trainer"]["max_epochs"] == 2
    assert all(k.startswith("decoder.") for k in ckpt["pretext"])  # demo overlay trains a random decoder


@pytest.mark.parametrize("dataset", DATASETS_2D)
def test_mae_loss_decreases_on_demo_data(tmp_path, demo_roots, dataset) -> None:
    wf = make_workflow(f"{dataset}_adapter", "pretrain_tpp", ("pretrain_tpp", "demo"),
                       **_overrides(tmp_path, demo_roots(dataset), epochs=12, warmup_epochs=2, lr=3e-3))  # fmt: skip
    trainer = wf.parser.get_parsed_content("train#trainer")
    losses: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output[0]["loss"])))
    wf.run()
    k = max(2, len(losses) // 4)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    assert last < first, f"{dataset}: MAE loss did not decrease ({first:.4f} -> {last:.4f}; {losses})"


def test_mae_decoder_inherited_frozen_or_updated(tmp_path, demo_roots) -> None:
    """A MedCoSS-format checkpoint with an MAE decoder: 'freeze' keeps it bit-identical, 'update' trains it."""
    from tpp_monai.pretext.mae import MAEDecoder

    torch.manual_seed(1)
    backbone = build_backbone("medcoss_vit_tiny", task="features")
    decoder = MAEDecoder(backbone.embed_dim, num_patches=16, dim=64, depth=2, heads=4)
    path = tmp_path / "checkpoint-299.pth"
    torch.save({"model": {**backbone.state_dict(), **decoder.state_dict()}, "epoch": 299}, path)
    for mode in ("freeze", "update"):
        wf = run_workflow("glas_adapter", "pretrain_tpp", **_overrides(
            tmp_path / mode, demo_roots("glas"), backbone_ckpt=str(path), mae_decoder=mode, epochs=2))  # fmt: skip
        trained = wf.parser.get_parsed_content("pretext_net").decoder.state_dict()
        same = all(torch.equal(trained[k], v) for k, v in decoder.state_dict().items())
        assert same == (mode == "freeze"), mode


def test_dino_teacher_ema_and_centering(tmp_path, demo_roots) -> None:
    wf = make_workflow("mhist_adapter", "pretrain_tpp", ("pretrain_tpp", "demo"),
                       **_overrides(tmp_path, demo_roots("mhist"), pretext="dino", epochs=6))  # fmt: skip
    net = wf.parser.get_parsed_content("pretext_net")
    loss = wf.parser.get_parsed_content("loss")
    trainer = wf.parser.get_parsed_content("train#trainer")
    teacher = dict(net.teacher.named_parameters())
    student = dict(net.student.named_parameters())
    assert all(not p.requires_grad for p in teacher.values())
    frozen = [n for n in student if n not in net.ema_names]
    assert frozen and all(teacher[n] is student[n] for n in frozen), "frozen tensors are shared, not copied"
    checked = []

    def check_ema(engine) -> None:  # recompute one teacher tensor from its pre-step value
        name = net.ema_names[0]
        checked.append((engine.state.iteration, teacher[name].detach().clone(), student[name].detach().clone()))

    trainer.add_event_handler(Events.ITERATION_STARTED, check_ema)
    wf.run()
    assert all(p.grad is None for p in net.teacher.parameters())
    # EMA: teacher_k = m_k * teacher_{k-1} + (1 - m_k) * student_k, checked between two consecutive iterations
    (it0, t0, _), (_, t1, _) = checked[-2], checked[-1]
    from tpp_monai.schedules import cosine_schedule

    momentum = cosine_schedule(0.996, 1.0, 6, len(wf.parser.get_parsed_content("train#dataloader")))
    m = momentum[it0 - 1]
    assert torch.allclose(t1, m * t0 + (1 - m) * checked[-1][2], atol=1e-6)
    # centering keeps the teacher's distribution spread over many dimensions
    with torch.no_grad():
        batch = next(iter(wf.parser.get_parsed_content("train#dataloader")))
        crops = [c for c in batch["crops"][:2]]
        _, teacher_out = net(crops)
        probs = torch.softmax((torch.cat(teacher_out) - loss.center) / loss.teacher_temp, dim=-1)
    assert probs.argmax(dim=-1).unique().numel() > 1, "teacher collapsed to one dimension"
    assert probs.mean(dim=0).max() < 0.5


def test_mlflow_tracking_records_the_run(tmp_path, demo_roots) -> None:
    from mlflow.tracking import MlflowClient

    db = tmp_path / "mlruns.db"
    proc = run_cli(
        "monai.bundle", "run", "pretrain_tpp", "--config_file",
        str([str(BUNDLES / "qata_adapter" / "configs" / f) for f in ("pretrain_tpp.json", "demo.json")]),
        "--runs_dir", str(tmp_path), "--dataset_dir", str(demo_roots("qata")), "--epochs", "2",
        "--tracking", "mlflow", "--tracking_uri", f"sqlite:///{db}", "--run_name", "tpp_test",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("qata_adapter")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].info.run_name == "tpp_test"
    run = runs[0]
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert len(losses) >= 2 and all(m.value == m.value for m in losses)
    assert client.get_metric_history(run.info.run_id, "lr_group_0")
    assert run.data.params["max_epochs"] == "2"
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert any(a.startswith("config_") and a.endswith(".json") for a in artifacts)


def test_cli_from_the_bundle_folder(tmp_path, demo_roots) -> None:
    """`python -m monai.bundle run pretrain_tpp` from inside the bundle folder, DINO."""
    bundle = BUNDLES / "chest_xray_pa_vpt"
    proc = run_cli(
        "monai.bundle", "run", "pretrain_tpp", "--config_file", "['configs/pretrain_tpp.json','configs/demo.json']",
        "--runs_dir", str(tmp_path), "--dataset_dir", str(demo_roots("chest_xray_pa")), "--epochs", "1",
        "--pretext", "dino", cwd=bundle,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = read_record(tmp_path / "pretrain_tpp" / "tpp_target")
    assert saved["method"] == "vpt" and set(saved["state"]) == {"peft_encoder.prompts"}


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ((), r"no backbone checkpoint given for 'medcoss_vit_b16': download the MedCoSS .*--backbone_ckpt none"),
        (("--method", "adpter"), r"unknown PEFT method 'adpter'.*valid PEFT methods: adapter"),
        (("--pretext", "simclr"), r"unknown pretext 'simclr'.*valid pretexts: dino, mae"),
        (("--method", "linear_probe"), r"pretrain_tpp does not apply to 'linear_probe'"),
        (("--datalist", "/nonexistent/list.json"), r"/nonexistent/list.json.*datalist not found"),
    ],
)
def test_bad_settings_fail_before_training_with_one_message(tmp_path, demo_roots, extra, expected) -> None:
    proc = run_cli("monai.bundle", "run", "pretrain_tpp", "--config_file",
                   str(BUNDLES / "glas_adapter" / "configs" / "pretrain_tpp.json"),
                   "--runs_dir", str(tmp_path), "--dataset_dir", str(demo_roots("glas")), *extra)  # fmt: skip
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    message = proc.stderr[proc.stderr.rindex("error: ") :]  # one message: the bad setting alone or among others
    assert len(re.findall("^error: ", proc.stderr, re.M)) == 1, proc.stderr[-2000:]
    assert re.search(expected, message), message
    assert "Loading dataset" not in proc.stderr, "must fail before any data is cached"


@pytest.mark.parametrize("bundle", [b for b in bundle_names(2) if not b.endswith(BASELINES)])  # 3D: test_3d
def test_bundle_passes_check_properties(tmp_path, demo_roots, bundle) -> None:
    dataset = json.loads((BUNDLES / bundle / "configs" / "pretrain_tpp.json").read_text())["dataset_name"]
    wf = make_workflow(bundle, "pretrain_tpp", ("pretrain_tpp", "demo"),
                       **_overrides(tmp_path, demo_roots(dataset)))  # fmt: skip
    assert wf.check_properties() == []


def test_committed_bundles_match_the_generator() -> None:
    assert check_bundles() == []
    peft_bundles = ["glas_peft_dora", "mhist_peft_ia3"]  # huggingface peft tuners as bundles of their own
    assert len(bundle_names(2)) == len(DATASETS_2D) * (len(TPP_METHODS) + len(BASELINES)) + len(peft_bundles)
    assert set(peft_bundles) <= set(bundle_names(2))
