"""Runs survive interruption, checkpoints are never half-written, bad settings fail early, results reproduce."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import BUNDLES, make_workflow, run_workflow

from tpp_monai.errors import CheckpointError, UserError
from tpp_monai.io import atomic_save, load_verified
from tpp_monai.peft.files import read_record
from tpp_monai.workflows import user_error_in


def _cli(run_id: str, bundle: str, *args: str) -> list[str]:
    configs = str([str(BUNDLES / bundle / "configs" / f"{n}.json") for n in (run_id, "demo")])
    return [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", configs, *args]


def _kill_after_first_checkpoint(cmd: list[str], checkpoints: Path) -> None:
    """Start ``cmd``, SIGKILL it as soon as its first complete checkpoint exists, and check that it was cut short."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not list(checkpoints.glob("checkpoint_epoch=*.pt")):
        if proc.poll() is not None or time.time() > deadline:
            pytest.fail(f"no checkpoint appeared before the run ended (exit {proc.returncode})")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("run_id", ["pretrain_tpp", "finetune"])
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, demo_roots, run_id) -> None:
    bundle, root = "glas_lora", demo_roots("glas")
    epochs = ["--tpp_epochs", "8"] if run_id == "pretrain_tpp" else ["--epochs", "8", "--tpp_ckpt", "none"]
    args = [*epochs, "--dataset_dir", str(root), "--batch_size", "1", "--seed", "7"]
    runs = {}
    for name in ("straight", "killed"):
        runs[name] = tmp_path / name
        args_for = [*args, "--runs_dir", str(runs[name]), "--ckpt_dir", str(runs[name] / "models")]
        if name == "straight":
            done = subprocess.run(_cli(run_id, bundle, *args_for), capture_output=True, text=True, check=False)
            assert done.returncode == 0, done.stderr[-3000:]
            continue
        _kill_after_first_checkpoint(_cli(run_id, bundle, *args_for), runs[name] / run_id / "checkpoints")
        last = max(int(p.stem.split("=")[1]) for p in (runs[name] / run_id / "checkpoints").glob("*.pt"))
        assert last < 8, "the run finished before it was killed"
        again = subprocess.run(_cli(run_id, bundle, *args_for), capture_output=True, text=True, check=False)
        assert again.returncode != 0 and "--resume true" in again.stderr.strip().splitlines()[-1]
        resumed = subprocess.run(_cli(run_id, bundle, *args_for, "--resume", "true"), capture_output=True,
                                 text=True, check=False)  # fmt: skip
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"resumed from {runs[name] / run_id / 'checkpoints'}" in resumed.stdout + resumed.stderr
    if run_id == "pretrain_tpp":
        a, b = (read_record(runs[n] / run_id / "tpp_target")["state"] for n in ("straight", "killed"))
    else:
        a, b = (load_verified(next((runs[n] / run_id / "checkpoints").glob("*.pt")))["trainable"] for n in runs)
        best = [load_verified(runs[n] / "models" / "model.pt")["model"] for n in runs]
        assert all(torch.equal(best[0][k], best[1][k]) for k in best[0])
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"


def test_truncated_or_corrupt_checkpoint_is_refused_with_its_path(tmp_path) -> None:
    good = tmp_path / "model.pt"
    atomic_save({"model": {"w": torch.arange(1000.0)}}, good)
    assert torch.equal(load_verified(good)["model"]["w"], torch.arange(1000.0))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:-200])
    with pytest.raises(CheckpointError, match=f"{truncated}.*truncated or corrupt"):
        load_verified(truncated)
    # flip bytes inside the tensor data: the file still unpickles, the digest catches it
    corrupt = tmp_path / "corrupt.pt"
    data = bytearray(good.read_bytes())
    offset = data.find(torch.arange(1000.0).numpy().tobytes()[400:408])
    assert offset > 0
    data[offset : offset + 4] = b"\x00\x00\x80\x7f"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{corrupt} is corrupt: its content does not match"):
        load_verified(corrupt)


def test_resume_from_a_truncated_checkpoint_names_it(tmp_path, demo_roots) -> None:
    common = {"runs_dir": str(tmp_path), "dataset_dir": str(demo_roots("mhist")), "tpp_epochs": 2}
    run_workflow("mhist_ssf", "pretrain_tpp", **common)
    ckpt = next((tmp_path / "pretrain_tpp" / "checkpoints").glob("*.pt"))
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 3])
    with pytest.raises(Exception) as err:
        run_workflow("mhist_ssf", "pretrain_tpp", resume=True, **common)
    user = user_error_in(err.value)
    assert isinstance(user, CheckpointError) and str(ckpt) in str(user) and "truncated or corrupt" in str(user)


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch) -> None:
    path = tmp_path / "checkpoint.pt"
    atomic_save({"epoch": 1, "w": torch.ones(3)}, path)

    def full_disk(filename: str, point: str) -> None:  # the bytes reached the temporary file, then the device is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("tpp_monai.io.fault_point", full_disk)
    with pytest.raises(CheckpointError, match=r"disk is full\); checkpoint.pt keeps its previous content"):
        atomic_save({"epoch": 2, "w": torch.zeros(3)}, path)
    assert load_verified(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"], "no temporary file left behind"


def test_a_full_disk_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, demo_roots, monkeypatch) -> None:
    def full_disk_at_epoch_2(filename: str, point: str) -> None:  # epoch 1 is written; then the disk fills up
        if filename == "checkpoint_epoch=2.pt":
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("tpp_monai.io.fault_point", full_disk_at_epoch_2)
    with pytest.raises(Exception) as err:
        run_workflow("qata_vpt", "pretrain_tpp", runs_dir=str(tmp_path), dataset_dir=str(demo_roots("qata")),
                     tpp_epochs=3)  # fmt: skip
    monkeypatch.undo()
    assert "the disk is full" in str(user_error_in(err.value))
    checkpoints = list((tmp_path / "pretrain_tpp" / "checkpoints").glob("*.pt"))
    assert [p.name for p in checkpoints] == ["checkpoint_epoch=1.pt"]
    assert load_verified(checkpoints[0])["trainer"]["iteration"] > 0


def test_non_finite_loss_stops_with_iteration_and_hint(tmp_path, demo_roots) -> None:
    wf = make_workflow("mhist_lora", "finetune", ("finetune", "demo"), runs_dir=str(tmp_path),
                       dataset_dir=str(demo_roots("mhist")), tpp_ckpt="none", epochs=3, val_interval=1)  # fmt: skip
    loss = wf.parser.get_parsed_content("loss")
    original, seen = loss.forward, []

    def poisoned(*args, **kwargs):
        seen.append(1)
        value = original(*args, **kwargs)
        return value * float("nan") if len(seen) == 9 else value

    loss.forward = poisoned
    with pytest.raises(Exception) as err:
        wf.run()
    message = str(user_error_in(err.value))
    assert "the loss became nan at iteration 9" in message
    assert "checkpoint_epoch=1.pt" in message and "lower the learning rate (now 0.0005)" in message


def _error(bundle: str, run_id: str, **overrides: object) -> str:
    with pytest.raises(Exception) as err:
        wf = make_workflow(bundle, run_id, (run_id, "demo"), **overrides)
        wf.run()
    user = user_error_in(err.value)
    assert isinstance(user, UserError), f"not a user error: {err.value!r}"
    return str(user)


@pytest.fixture(scope="module")
def lora_tpp(tmp_path_factory, demo_roots) -> Path:
    out = tmp_path_factory.mktemp("lora_tpp")
    run_workflow("mhist_lora", "pretrain_tpp", runs_dir=str(out), dataset_dir=str(demo_roots("mhist")), tpp_epochs=1)
    return out / "pretrain_tpp" / "tpp_target"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"method": "adpter"}, r"unknown PEFT method 'adpter' \(from method\); valid PEFT methods: adapter"),
        ({"dataset_name": "mhis"}, r"unknown dataset 'mhis' \(from dataset_name\); valid datasets: chest_xray_pa"),
        ({"method_options": {"bottlenek": 8}}, r"unknown option\(s\) \['bottlenek'\] for PEFT method 'adapter' "
                                               r"\(from method_options\); valid options: activation, bottleneck"),
        ({"backbone": "vit_huge"}, r"unknown backbone 'vit_huge' \(from backbone\); valid backbones:"),
        ({"num_classes": 3}, r"num_classes 3 \(from num_classes\) does not match MHIST's 2 classes \['HP', 'SSA'\]"),
        ({"image_size": [60, 60]}, r"image_size \[60, 60\] \(from image_size\) is not a multiple of the "
                                   r"medcoss_vit_tiny patch size 16; use e.g. \[64, 64\]"),
    ],
)  # fmt: skip
def test_bad_finetune_settings_fail_before_training(tmp_path, demo_roots, overrides, expected) -> None:
    import re

    message = _error("mhist_adapter", "finetune", runs_dir=str(tmp_path), dataset_dir=str(demo_roots("mhist")),
                     tpp_ckpt="none", **overrides)  # fmt: skip
    assert re.search(expected, message), message


def test_tpp_checkpoint_of_another_method_options_or_backbone(tmp_path, demo_roots, lora_tpp) -> None:
    common = {"runs_dir": str(tmp_path), "dataset_dir": str(demo_roots("mhist")), "tpp_ckpt": str(lora_tpp)}
    assert "written for method 'lora', but this model has 'adapter'" in _error("mhist_adapter", "finetune", **common)
    msg = _error("mhist_lora", "finetune", method_options={"rank": 4}, **common)
    assert (
        "written for options" in msg and "'rank': 8" in msg and "pre-train the target parameters with the same" in msg
    )
    assert "written for backbone 'medcoss_vit_tiny'" in _error("mhist_lora", "finetune", backbone="vit_tiny", **common)


def test_backbone_checkpoint_with_missing_keys(tmp_path, demo_roots) -> None:
    from tpp_monai.backbones import build_backbone

    state = build_backbone("medcoss_vit_tiny").state_dict()
    del state["fused_encoder.layers.2.norm1.weight"]
    path = tmp_path / "broken.pth"
    torch.save({"model": state}, path)
    msg = _error("glas_adapter", "pretrain_tpp", runs_dir=str(tmp_path), dataset_dir=str(demo_roots("glas")),
                 backbone_ckpt=str(path))  # fmt: skip
    assert str(path) in msg and "missing keys: fused_encoder.layers.2.norm1.weight" in msg


def test_datalist_with_missing_files(tmp_path, demo_roots) -> None:
    root = demo_roots("glas")
    datalist = json.loads((root / "datalist.json").read_text())
    datalist["training"][0]["image"] = "train_999.bmp"
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(datalist))
    msg = _error("glas_adapter", "finetune", runs_dir=str(tmp_path), dataset_dir=str(root), datalist=str(path),
                 tpp_ckpt="none")  # fmt: skip
    assert f"{root / 'train_999.bmp'}: listed in {path} but not found" in msg


def test_an_earlier_run_is_not_overwritten_silently(tmp_path, demo_roots) -> None:
    common = {"runs_dir": str(tmp_path), "dataset_dir": str(demo_roots("qata")), "tpp_epochs": 1}
    run_workflow("qata_adapter", "pretrain_tpp", **common)
    msg = _error("qata_adapter", "pretrain_tpp", **common)
    assert "is from an earlier run; pass --resume true to continue that run" in msg


def test_same_seed_gives_bit_identical_runs_and_records_settings(tmp_path, demo_roots) -> None:
    root = str(demo_roots("glas"))
    results = []
    for name in ("a", "b"):
        out = tmp_path / name
        run_workflow("glas_dtl", "pretrain_tpp", runs_dir=str(out), dataset_dir=root, tpp_epochs=1, seed=3)
        run_workflow("glas_dtl", "finetune", runs_dir=str(out), dataset_dir=root, epochs=1, val_interval=1, seed=3,
                     ckpt_dir=str(out / "models"))  # fmt: skip
        history = pd.read_csv(out / "finetune" / "history.csv").drop(columns="elapsed_s").to_csv()  # wall time differs
        results.append((read_record(out / "pretrain_tpp" / "tpp_target")["state"],
                        load_verified(out / "models" / "model.pt")["model"], history))  # fmt: skip
        settings = json.loads((out / "finetune" / "settings.json").read_text())
        assert settings["seed"] == 3 and settings["method"] == "dtl" and settings["tpp_ckpt"].endswith("tpp_target")
        assert settings["lr"] == 1e-4 and settings["epochs"] == 1
    (tpp_a, model_a, hist_a), (tpp_b, model_b, hist_b) = results
    assert all(torch.equal(tpp_a[k], tpp_b[k]) for k in tpp_a)
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    assert hist_a == hist_b, "loss and validation metrics differ between two runs with the same seed"


def test_model_of_another_method_is_refused_on_the_command_line_without_a_traceback(tmp_path, demo_roots) -> None:
    """evaluate.json with a model.pt written for another method: one message naming the file and what wrote it
    (MONAI's StatsHandler logs engine exceptions with their traceback; user errors are logged without it)."""
    from conftest import bundle_configs, run_cli

    from tpp_monai.network import build_network

    net = build_network("medcoss_vit_tiny", "cls", "adapter", num_classes=2, backbone_ckpt="none")
    models = tmp_path / "models"
    atomic_save({"model": net.state_dict(), "run_info": {"method": "adapter", "backbone": "medcoss_vit_tiny"}},
                models / "model.pt")  # fmt: skip
    configs = str(bundle_configs("mhist_vpt", "evaluate", "demo"))
    proc = run_cli("monai.bundle", "run", "evaluate", "--config_file", configs, "--runs_dir", str(tmp_path),
                   "--dataset_dir", str(demo_roots("mhist")), "--ckpt_dir", str(models))  # fmt: skip
    assert proc.returncode != 0
    assert f"error: {models / 'model.pt'} does not fit this run (it was written with method adapter" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout, (proc.stdout + proc.stderr)[-3000:]  # the log is on stdout


def test_resume_past_the_epoch_count_says_to_raise_it(tmp_path, demo_roots) -> None:
    common = {"runs_dir": str(tmp_path), "dataset_dir": str(demo_roots("mhist"))}
    run_workflow("mhist_bitfit", "pretrain_tpp", tpp_epochs=2, **common)
    message = _error("mhist_bitfit", "pretrain_tpp", tpp_epochs=1, resume=True, **common)
    assert "tpp_epochs was 2 and is 1 now" in message and "only epochs, iterations, tpp_epochs may be raised" in message
    (tmp_path / "pretrain_tpp" / "settings.json").unlink()  # a run without a settings record: the checkpoint says it
    message = _error("mhist_bitfit", "pretrain_tpp", tpp_epochs=1, resume=True, **common)
    assert "is at epoch 2, past this run's 1 epochs; raise --epochs" in message
