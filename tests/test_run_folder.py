"""A kill inside a checkpoint save loses nothing; one run per folder; a resume keeps its settings and its history."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BUNDLES, make_workflow
from ignite.engine import Engine, Events

from tpp_monai.errors import ConfigError
from tpp_monai.handlers import SafeCheckpointSaver
from tpp_monai.io import FAULT_ENV, load_verified
from tpp_monai.peft.files import read_record
from tpp_monai.workflows import user_error_in


class Killed(BaseException):
    """Stands for SIGKILL in-process: nothing after the fault point runs, nothing is cleaned up."""


def _fault_at(monkeypatch, filename: str, point: str, nth: int = 1) -> None:
    """Raise :class:`Killed` the ``nth`` time the save of ``filename`` reaches ``point`` (the hook of
    ``tpp_monai.io.fault_point``, which sends SIGKILL in a real run)."""
    passes = []

    def fault(name: str, where: str) -> None:
        if (name, where) == (filename, point):
            passes.append(1)
            if len(passes) == nth:
                raise Killed

    monkeypatch.setattr("tpp_monai.io.fault_point", fault)
    monkeypatch.setattr("tpp_monai.handlers.checkpoints.fault_point", fault)


def _engine(weights: torch.nn.Linear, metric: list[float] | None = None) -> Engine:
    """A trainer that adds 1 to the weights each epoch, with an optional per-epoch metric (for best-model saving)."""

    def step(engine: Engine, batch: object) -> dict:
        with torch.no_grad():
            weights.weight.add_(1.0 / 2)
        return {"loss": 0.0}

    engine = Engine(step)
    if metric is not None:
        engine.add_event_handler(Events.EPOCH_COMPLETED,
                                 lambda e: e.state.metrics.update(score=metric[e.state.epoch - 1]))  # fmt: skip
    return engine


@pytest.mark.parametrize("point", ["written", "replaced"])
def test_a_kill_inside_the_epoch_checkpoint_save_keeps_the_previous_one_and_resume_continues(
    tmp_path, monkeypatch, point
) -> None:
    weights = torch.nn.Linear(2, 2, bias=False)
    torch.nn.init.zeros_(weights.weight)
    saver = SafeCheckpointSaver(str(tmp_path), {"w": weights}, engine_key="trainer", save_interval=1, n_saved=1)
    engine = _engine(weights)
    saver.attach(engine)
    _fault_at(monkeypatch, "checkpoint_epoch=2.pt", point)
    with pytest.raises(Killed):
        engine.run([0, 0], max_epochs=3)
    kept = load_verified(tmp_path / "checkpoint_epoch=1.pt")
    assert kept["trainer"]["iteration"] == 2 and torch.equal(kept["w"]["weight"], torch.full((2, 2), 1.0))
    left = sorted(p.name for p in tmp_path.iterdir())
    temp = f".checkpoint_epoch=2.pt.tmp{os.getpid()}"
    assert left == ([temp, "checkpoint_epoch=1.pt"] if point == "written"
                    else ["checkpoint_epoch=1.pt", "checkpoint_epoch=2.pt"])  # fmt: skip

    monkeypatch.undo()
    from tpp_monai.io import remove_stale_temp_files

    remove_stale_temp_files(tmp_path)  # what the run folder's claim does at the start of a run
    resumed = torch.nn.Linear(2, 2, bias=False)
    saver = SafeCheckpointSaver(str(tmp_path), {"w": resumed}, engine_key="trainer", save_interval=1, n_saved=1,
                                resume=True)  # fmt: skip
    engine = _engine(resumed)
    saver.attach(engine)
    started = []
    engine.add_event_handler(Events.EPOCH_STARTED, lambda e: started.append(e.state.epoch))
    engine.run([0, 0], max_epochs=3)
    resumed_from = 1 if point == "written" else 2
    assert started == list(range(resumed_from + 1, 4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=3.pt"], "no temp or old file remains"
    assert torch.equal(load_verified(tmp_path / "checkpoint_epoch=3.pt")["w"]["weight"], torch.full((2, 2), 3.0))


def test_a_kill_inside_the_best_model_save_keeps_the_previous_model(tmp_path, monkeypatch) -> None:
    weights = torch.nn.Linear(2, 2, bias=False)
    torch.nn.init.zeros_(weights.weight)
    saver = SafeCheckpointSaver(str(tmp_path), {"model": weights}, save_key_metric=True, key_metric_name="score",
                                key_metric_filename="model.pt")  # fmt: skip
    engine = _engine(weights, metric=[0.1, 0.5, 0.9])
    saver.attach(engine)
    _fault_at(monkeypatch, "model.pt", "written", nth=2)
    with pytest.raises(Killed):
        engine.run([0], max_epochs=3)
    assert torch.equal(load_verified(tmp_path / "model.pt")["model"]["weight"], torch.full((2, 2), 0.5))


def test_a_real_sigkill_inside_a_save_then_resume(tmp_path, demo_roots) -> None:
    """A real ``kill -9`` (the fault hook) while the epoch-2 checkpoint is written: epoch 1's stays, the resumed run
    continues from it and leaves no temporary file."""
    run_id, bundle = "pretrain_tpp", "glas_lora"
    configs = str([str(BUNDLES / bundle / "configs" / f"{n}.json") for n in (run_id, "demo")])
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", configs, "--tpp_epochs", "3",
           "--dataset_dir", str(demo_roots("glas")), "--runs_dir", str(tmp_path), "--batch_size", "2"]  # fmt: skip
    env = {**os.environ, FAULT_ENV: "checkpoint_epoch=2.pt:written"}
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    checkpoints = tmp_path / run_id / "checkpoints"
    names = sorted(p.name for p in checkpoints.iterdir())
    assert names[1:] == ["checkpoint_epoch=1.pt"] and names[0].startswith(".checkpoint_epoch=2.pt.tmp"), names
    assert load_verified(checkpoints / "checkpoint_epoch=1.pt")["trainer"]["iteration"] > 0
    resumed = subprocess.run([*cmd, "--resume", "true"], capture_output=True, text=True, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {checkpoints / 'checkpoint_epoch=1.pt'} at epoch 1" in resumed.stdout + resumed.stderr
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint_epoch=3.pt"]
    assert not [p for p in tmp_path.rglob("*.tmp*")], "a temporary file remains"
    assert read_record(tmp_path / run_id / "tpp_target")["epoch"] == 3


def _history_epochs(path: Path) -> list[int]:
    with open(path, newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def test_history_matches_the_checkpoint_after_a_kill_and_resume(tmp_path, demo_roots, monkeypatch) -> None:
    common = {"runs_dir": str(tmp_path), "dataset_dir": str(demo_roots("mhist")), "tpp_ckpt": "none", "epochs": 3,
              "val_interval": 1}  # fmt: skip
    _fault_at(monkeypatch, "checkpoint_epoch=2.pt", "written")
    wf = make_workflow("mhist_lora", "finetune", ("finetune", "demo"), **common)
    with pytest.raises(Killed):
        wf.run()
    history = tmp_path / "finetune" / "history.csv"
    assert _history_epochs(history) == [1, 2], "epoch 2's row was written before its checkpoint"
    monkeypatch.undo()
    wf = make_workflow("mhist_lora", "finetune", ("finetune", "demo"), resume=True, **common)
    wf.run()
    assert _history_epochs(history) == [1, 2, 3]
    with open(history, newline="") as f:  # wall time goes on from the restored epoch's value, never restarts at 0
        elapsed = [float(row["elapsed_s"]) for row in csv.DictReader(f)]
    assert 0 < elapsed[0] <= elapsed[1] <= elapsed[2]
    assert [p.name for p in (tmp_path / "finetune" / "checkpoints").iterdir()] == ["checkpoint_epoch=3.pt"]


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process that claims ``folder`` as a run does, and holds it until its stdin closes."""
    code = ("import sys; from tpp_monai.run_folder import claim_folder; claim_folder(sys.argv[1]); print('held', "
            "flush=True); sys.stdin.read()")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_on_a_locked_folder_is_refused(tmp_path, demo_roots) -> None:
    output = tmp_path / "pretrain_tpp"
    holder = _hold_lock(output)
    try:
        with pytest.raises(Exception) as err:
            make_workflow("glas_lora", "pretrain_tpp", ("pretrain_tpp", "demo"), runs_dir=str(tmp_path),
                          dataset_dir=str(demo_roots("glas")), tpp_epochs=1)  # fmt: skip
    finally:
        holder.stdin.close()
        holder.wait()
    message = str(user_error_in(err.value))
    assert f"{output} is in use by another run (pid {holder.pid}" in message and "another --output_dir" in message


@pytest.fixture(scope="module")
def finished_finetune(tmp_path_factory, demo_roots) -> dict:
    """A finished one-epoch fine-tuning run (random target parameters) to resume with other settings."""
    out = tmp_path_factory.mktemp("finished")
    common = {"runs_dir": str(out), "dataset_dir": str(demo_roots("mhist")), "tpp_ckpt": "none", "epochs": 1,
              "val_interval": 1, "seed": 3}  # fmt: skip
    wf = make_workflow("mhist_lora", "finetune", ("finetune", "demo"), **common)
    wf.run()
    return common


@pytest.mark.parametrize(
    ("setting", "value", "old"),
    [("lr", 0.01, "0.0005"), ("seed", 4, "3"), ("tpp_ckpt", "TPP_FILE", "'none'")],
)
def test_resume_with_a_changed_setting_is_refused_naming_it(finished_finetune, lora_tpp_file, setting, value,
                                                            old) -> None:  # fmt: skip
    value = str(lora_tpp_file) if value == "TPP_FILE" else value
    overrides = {**finished_finetune, "epochs": 2, setting: value, "resume": True}
    with pytest.raises(Exception) as err:
        make_workflow("mhist_lora", "finetune", ("finetune", "demo"), **overrides)
    message = str(user_error_in(err.value))
    assert f"{setting} was {old} and is {value!r} now" in message, message
    assert "start a new run with another --output_dir" in message


@pytest.fixture(scope="module")
def lora_tpp_file(tmp_path_factory) -> Path:
    """A target-parameter file of LoRA on the demo backbone (written directly: only its path matters here)."""
    from tpp_monai.io import atomic_save

    path = tmp_path_factory.mktemp("tpp") / "tpp_target.pt"
    atomic_save({"state": {}, "method": "lora"}, path)
    return path


def test_resume_allows_what_cannot_change_the_result(tmp_path) -> None:
    from tpp_monai.run_folder import check_resume_settings

    recorded = {"lr": 1e-4, "epochs": 4, "num_workers": 0, "device": "cpu", "run_name": "a", "resume": False}
    (tmp_path / "settings.json").write_text(__import__("json").dumps(recorded))
    check_resume_settings(tmp_path, {**recorded, "epochs": 9, "num_workers": 4, "device": "cuda", "run_name": "b",
                                     "resume": True})  # fmt: skip
    with pytest.raises(ConfigError, match="epochs was 4 and is 3 now"):
        check_resume_settings(tmp_path, {**recorded, "epochs": 3})


def test_target_folder_is_left_by_a_run_resumed_after_its_last_epoch(tmp_path, monkeypatch) -> None:
    """A TPP stage killed between its last checkpoint and the target-folder save resumes with no epoch to train: the
    end of the run still writes the folder, and a run that wrote it for its last epoch does not write it twice."""
    from tpp_monai.backbones import build_backbone
    from tpp_monai.handlers import TargetStateSaver
    from tpp_monai.handlers import checkpoints as saver_module
    from tpp_monai.peft import apply_peft

    model = apply_peft(build_backbone("vit_tiny", task="features"), "lora")
    writes: list[int] = []
    real_write = saver_module.write_target_folder
    monkeypatch.setattr(saver_module, "write_target_folder",
                        lambda m, path, info: (writes.append(info["epoch"]), real_write(m, path, info)))  # fmt: skip
    engine = Engine(lambda e, b: None)
    TargetStateSaver(model, tmp_path / "full" / "tpp_target").attach(engine)
    engine.run([0], max_epochs=2)
    assert writes == [1, 2], "one write per epoch, none again at the end"

    writes.clear()
    resumed = Engine(lambda e, b: None)
    TargetStateSaver(model, tmp_path / "resumed" / "tpp_target").attach(resumed)
    resumed.state.epoch = 2  # what the checkpoint restores: every epoch done
    resumed.fire_event(Events.COMPLETED)
    assert writes == [2] and read_record(tmp_path / "resumed" / "tpp_target")["epoch"] == 2
