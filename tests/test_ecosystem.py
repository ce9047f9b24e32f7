"""The ways users reach the bundles besides one process: torchrun (DDP), MLflow (SQLite store and tracking server),
and the model-zoo checks (metadata schema, TorchScript export)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import BUNDLES, REPO, free_port, run_cli, run_workflow

from tpp_monai.bundlegen import workflow_config_files
from tpp_monai.io import load_verified
from tpp_monai.peft.files import read_record

SCHEMA = REPO / "tpp_monai" / "schemas" / "meta_schema_20240725.json"  # the official file, shipped


def _configs(bundle: str, *names: str, extra: tuple[Path, ...] = ()) -> str:
    """The ``--config_file`` list literal of a bundle's configs (plus extra files)."""
    return str([str(BUNDLES / bundle / "configs" / f"{n}.json") for n in names] + [str(p) for p in extra])


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           "-m", "monai.bundle", "run", *args]  # fmt: skip
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


def _assert_rank0_logs_once(proc: subprocess.CompletedProcess, out: Path) -> None:
    """Under torchrun only rank 0 logs at INFO: every INFO message (time stamp aside) appears once, the epoch lines
    among them; one executed-config file is left in the run folder; no rank warns about unused parameters."""
    from collections import Counter

    text = proc.stdout + proc.stderr
    before_config = "Setting logging properties based on config"  # MONAI logs it before reading any config
    messages = Counter(line.split(" - ", 1)[1] for line in text.splitlines()
                       if " - INFO - " in line and before_config not in line)  # fmt: skip
    assert messages and any(": mean loss " in m for m in messages), text[-3000:]
    repeated = {m: n for m, n in messages.items() if n > 1 and m.strip(" -INFO") != ""}
    assert not repeated, repeated
    assert len(list(out.glob("config_*.json"))) == 1, sorted(p.name for p in out.iterdir())
    assert "find_unused_parameters" not in text


def test_torchrun_two_processes_on_cpu(tmp_path, demo_roots) -> None:
    """pretrain_tpp and finetune under `torchrun --nproc_per_node=2` (gloo): one checkpoint, one MLflow run each,
    the same target parameters on both ranks at the end."""
    bundle, root = "mhist_adapter", demo_roots("mhist")
    dump = tmp_path / "dump.json"  # every rank saves its target parameters after training
    # (MONAI scans any expression containing the word "import" as an import statement, hence tpp.trainable_state)
    dump.write_text(json.dumps({"imports": ["$import os", "$import tpp_monai.workflows as tpp"], "+finalize": [
        "$torch.save(tpp.trainable_state(@network_def).state_dict(), @output_dir + '/rank' + os.environ['RANK'] + "
        "'.pt')"]}))  # fmt: skip
    common = ["--runs_dir", str(tmp_path), "--dataset_dir", str(root), "--tracking", "mlflow",
              "--meta_file", str(BUNDLES / bundle / "configs" / "metadata.json")]  # fmt: skip
    overlays = ("demo", "multi_gpu")
    proc = _torchrun("pretrain_tpp", "--config_file", _configs(bundle, "pretrain_tpp", *overlays, extra=(dump,)),
                     *common, "--tpp_epochs", "2", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    # every rank checks (and would fail the run); rank 0 alone logs the verdict
    assert (proc.stderr + proc.stdout).count("trainable tensors identical on 2 ranks") == 1
    _assert_rank0_logs_once(proc, tmp_path / "pretrain_tpp")
    out = tmp_path / "pretrain_tpp"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint_epoch=2.pt"]
    saved = read_record(out / "tpp_target")["state"]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for name, tensor in saved.items():
        assert torch.equal(ranks[0][name], tensor) and torch.equal(ranks[1][name], tensor), name

    proc = _torchrun("finetune", "--config_file", _configs(bundle, "finetune", *overlays, extra=(dump,)),
                     *common, "--epochs", "2", "--ckpt_dir", str(tmp_path / "models"), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    _assert_rank0_logs_once(proc, tmp_path / "finetune")
    # the folder holds the best model and the run-folder lock (`.lock`, released when the run ended)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [".lock", "model.pt"]
    ranks = [torch.load(tmp_path / "finetune" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(torch.equal(ranks[0][n], ranks[1][n]) for n in ranks[0])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name(bundle).experiment_id])
    assert sorted(r.info.run_name.split("_2")[0] for r in runs) == ["finetune", "pretrain_tpp"]
    assert all(r.info.status == "FINISHED" for r in runs)


def test_mlflow_chain_leaves_three_finished_runs(tmp_path, demo_roots) -> None:
    from mlflow.tracking import MlflowClient

    db = tmp_path / "mlruns.db"
    common = {"runs_dir": str(tmp_path), "dataset_dir": str(demo_roots("qata")), "tracking_uri": f"sqlite:///{db}"}
    for run_id, extra in (("pretrain_tpp", {"tpp_epochs": 2}), ("finetune", {"epochs": 2}), ("evaluate", {})):
        from monai.bundle import run

        bundle = BUNDLES / "qata_lora" / "configs"
        run(run_id, config_file=workflow_config_files(BUNDLES / "qata_lora", run_id, "demo"),
            meta_file=str(bundle / "metadata.json"), logging_file=False, tracking="mlflow", run_name=run_id,
            ckpt_dir=str(tmp_path / "models"), **common, **extra)  # fmt: skip
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("qata_lora").experiment_id])}
    assert set(runs) == {"pretrain_tpp", "finetune", "evaluate"}
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert client.get_metric_history(runs["pretrain_tpp"].info.run_id, "train_loss")
    assert {"train_loss", "val_dice", "lr_group_0"} <= set(runs["finetune"].data.metrics)
    assert {"dice", "hd95"} <= set(runs["evaluate"].data.metrics)
    for r in runs.values():
        assert any(a.path.startswith("config_") for a in client.list_artifacts(r.info.run_id)), r.info.run_name


def test_mlflow_tracking_server(tmp_path, demo_roots) -> None:
    """`tracking_uri` may name a tracking server: a real `mlflow server` on loopback receives the run."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
         str(tmp_path / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail("mlflow server did not start within 120 s")
                time.sleep(1)
        uri = f"http://127.0.0.1:{port}"
        configs = _configs("glas_ssf", "pretrain_tpp", "demo")
        proc = run_cli("monai.bundle", "run", "pretrain_tpp", "--config_file", configs, "--runs_dir", str(tmp_path),
                       "--dataset_dir", str(demo_roots("glas")), "--tpp_epochs", "1", "--tracking", "mlflow",
                       "--tracking_uri", uri)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        runs = client.search_runs([client.get_experiment_by_name("glas_ssf").experiment_id])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        assert client.get_metric_history(runs[0].info.run_id, "train_loss")
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_every_bundle_metadata_validates_offline_against_the_official_schema(monkeypatch) -> None:
    from monai.bundle import verify_metadata

    digest = hashlib.sha256(SCHEMA.read_bytes()).hexdigest()
    assert digest in (SCHEMA.parent / "README.md").read_text(), "the schema README must state the shipped file's hash"

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"verify_metadata tried to download: {args}")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(urllib.request, "urlretrieve", no_network)
    bundles = sorted(p for p in BUNDLES.iterdir() if (p / "configs" / "metadata.json").is_file())
    assert len(bundles) >= 50
    for bundle in bundles:
        meta = bundle / "configs" / "metadata.json"
        assert json.loads(meta.read_text())["schema"].endswith("/" + SCHEMA.name), meta
        verify_metadata(meta_file=str(meta), filepath=str(SCHEMA), hash_val=digest, hash_type="sha256")
    broken = json.loads((BUNDLES / "glas_adapter" / "configs" / "metadata.json").read_text())
    del broken["network_data_format"]["outputs"]["pred"]["dtype"]
    del broken["copyright"]
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"broken_meta_{os.getpid()}.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="copyright"):
        verify_metadata(meta_file=str(path), filepath=str(SCHEMA), hash_val=digest, hash_type="sha256")
    path.unlink()


@pytest.mark.parametrize(("bundle", "shape"), [("glas_adapter", [1, 3, 64, 64]), ("mhist_vpt", [1, 3, 64, 64])])
def test_ckpt_export_torchscript_matches_eager(tmp_path, demo_roots, bundle, shape) -> None:
    dataset = bundle.split("_")[0]
    run_workflow(bundle, "finetune", runs_dir=str(tmp_path), dataset_dir=str(demo_roots(dataset)), tpp_ckpt="none",
                 ckpt_dir=str(tmp_path / "models"), epochs=1, val_interval=1)  # fmt: skip
    configs = _configs(bundle, "inference", "demo")
    proc = run_cli("monai.bundle", "ckpt_export", "network_def", "--filepath", str(tmp_path / "model.ts"),
                   "--ckpt_file", str(tmp_path / "models" / "model.pt"), "--key_in_ckpt", "model", "--meta_file",
                   str(BUNDLES / bundle / "configs" / "metadata.json"), "--config_file", configs, "--use_trace",
                   "True", "--input_shape", str(shape))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    scripted = torch.jit.load(str(tmp_path / "model.ts"))
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(json.loads(configs.replace("'", '"')))
    eager = parser.get_parsed_content("network_def")
    eager.load_state_dict(load_verified(tmp_path / "models" / "model.pt")["model"])
    eager.eval()
    x = torch.rand(*shape)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), eager(x), rtol=1e-4, atol=1e-5)


def test_finetune_with_a_literal_output_dir_is_tracked(tmp_path, demo_roots, monkeypatch) -> None:
    """A fine-tuning run with a literal --output_dir, validating every 2nd of 3 epochs, nested under a parent run:
    a well-formed history (the final validation included), the MLflow params, tags and artifacts, a TensorBoard
    event file holding the loss, and the report's validation curve drawn from the history."""
    import matplotlib.figure
    import pandas as pd
    from mlflow.tracking import MlflowClient
    from monai.bundle import run
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tpp_monai.report.runs import make_report

    db = tmp_path / "mlruns.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    parent = client.create_run(client.create_experiment("demo_experiment")).info.run_id
    out = tmp_path / "literal_out"
    bundle = BUNDLES / "glas_adapter" / "configs"
    run("finetune", config_file=[str(bundle / "finetune.json"), str(bundle / "demo.json")],
        meta_file=str(bundle / "metadata.json"), logging_file=False, tracking="mlflow", runs_dir=str(tmp_path),
        dataset_dir=str(demo_roots("glas")), ckpt_dir=str(tmp_path / "models"), output_dir=str(out),
        tracking_uri=f"sqlite:///{db}", experiment_name="demo_experiment", run_name="child", parent_run_id=parent,
        run_tags={"experiment": "demo", "init": "random"}, tpp_ckpt="none", epochs=3, val_interval=2)  # fmt: skip

    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == [1, 2, 3] and list(history["iteration"]) == sorted(history["iteration"])
    assert history["val_dice"].isna().tolist() == [True, False, False]  # epoch 2, and the final validation (3)

    child = next(r for r in client.search_runs([client.get_experiment_by_name("demo_experiment").experiment_id])
                 if r.info.run_name == "child")  # fmt: skip
    params = child.data.params
    settings = json.loads((out / "settings.json").read_text())
    assert params["dataset"] == "glas" and params["method"] == "adapter" and params["init"] == "random"
    assert params["backbone"] == settings["backbone"] and float(params["lr"]) == settings["lr"]
    assert int(params["epochs"]) == 3 and int(params["iterations"]) == history["iteration"].iloc[-1]
    assert {"method_options", "seed", "label_fraction", "backbone_ckpt_sha256", "tpp_ckpt_sha256", "batch_size",
            "image_size"} <= set(params)  # fmt: skip
    tags = child.data.tags
    assert tags["stage"] == "finetune" and tags["bundle"] == "glas_adapter" and tags["mlflow.parentRunId"] == parent
    assert tags["experiment"] == "demo" and tags["init"] == "random" and "tpp_monai_version" in tags
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"settings.json", "history.csv", "curves.png"} <= artifacts
    assert any(a.startswith("config_") for a in artifacts), artifacts
    val = client.get_metric_history(child.info.run_id, "val_dice")
    assert [m.step for m in val] == [2, 3]
    assert [m.step for m in client.get_metric_history(child.info.run_id, "epoch_train_loss")] == [1, 2, 3]

    events = EventAccumulator(str(out))
    events.Reload()
    losses = events.Scalars("train_loss")
    assert [e.step for e in losses] == list(range(1, int(history["iteration"].iloc[-1]) + 1))

    # the report's curves: the validation panel holds the history's validation values
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps({
        "metrics": {"dice": 0.5, "hd95": 9.0}, "percent": {"dice": 50.0},
        "run_info": {"dataset": "glas", "method": "adapter", "tpp": False, "finetune_dir": str(out)}}))  # fmt: skip
    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    make_report([tmp_path / "eval"], tmp_path / "report")
    curves = next(f for f in figures if any("validation" in ax.get_title() for ax in f.axes))
    panel = next(ax for ax in curves.axes if "validation" in ax.get_title())
    (line,) = panel.get_lines()
    assert list(line.get_xdata()) == [2, 3] and list(line.get_ydata()) == list(history["val_dice"][1:])
