"""Experiments (issue 13): plan loading and presets, the graph of bundle runs, resuming after ``kill -9``, MLflow
parent/child runs read back from the store, and a real single-node SLURM started by the test."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port
from tpp_monai.errors import ConfigError
from tpp_monai.experiments.graph import build_graph, command
from tpp_monai.experiments.plan import load_plan, preset_names

PEFT = ["adapter", "adaptformer", "bitfit", "dtl", "evp", "lora", "ssf", "vpt"]  # the 8 PEFT methods with TPP
BASELINES = ["full_finetune", "linear_probe"]  # no target parameters, so no TPP stage


def _cli(*args: str, cwd: Path | None = None) -> list[str]:
    return [sys.executable, "-m", "tpp_monai", "experiment", *args]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _records(exp: Path) -> dict[str, dict]:
    return {f"{p.parent.parent.name}/{p.parent.name}": json.loads(p.read_text())
            for p in sorted(exp.glob("runs/*/*/run.json"))}  # fmt: skip


# ----------------------------------------------------------------------------------------------------- plans


@pytest.mark.parametrize(
    "preset, tpp, finetune",
    [
        # Table 3: 3 classification datasets x (10 methods without TPP + 8 PEFT methods with TPP-MAE) x 3 seeds
        ("paper-table3", 3 * 8 * 3, 3 * (10 + 8) * 3),
        # Table 4: the same on the 2 segmentation datasets
        ("paper-table4", 2 * 8 * 3, 2 * (10 + 8) * 3),
        # Table 5: 5 datasets x 4 methods x {random, TPP-MAE} x 3 seeds
        ("paper-table5", 5 * 4 * 3, 5 * 4 * 2 * 3),
        # Table 6: 4 datasets x 3 methods x {MAE, DINO} TPP stages; fine-tuning also from random
        ("paper-table6", 4 * 3 * 2 * 3, 4 * 3 * 3 * 3),
        # Figure 4: 2 datasets x 10 label fractions; one TPP stage per (dataset, seed) serves all 10 fractions
        ("paper-figure4", 2 * 3, 2 * 10 * 2 * 3),
        # Table 7: one TPP stage per source dataset and seed, used by all 5 targets; + random per target
        ("paper-table7", 5 * 3, 5 * (5 + 1) * 3),
        # Table 8: 4 datasets x {random, DINO, MAE}, + GlaS from MHIST's TPP-MAE stage (shared, no new stage)
        ("paper-table8", 4 * 2 * 3, (4 * 3 + 1) * 3),
        # Table 9: 2 datasets x {Adapter, VPT} x {random, TPP-MAE} on Path_DINO
        ("paper-table9", 2 * 2 * 3, 2 * 2 * 2 * 3),
        # Table 10: LiTS/KiTS x Conv-Adapter {random, TPP-DINO} + full fine-tuning (random only)
        ("paper-table10", 2 * 1 * 3, 2 * 3 * 3),
        # Table 11: 2 datasets x 3 decoder variants of TPP-MAE, + random
        ("paper-table11", 2 * 3 * 3, 2 * 4 * 3),
    ],
)
def test_paper_presets_list_the_papers_grid_with_shared_tpp_stages(preset, tpp, finetune, tmp_path):
    plan = load_plan(preset)
    assert plan.paper and ("Table" in plan.paper or "Figure" in plan.paper)
    graph = build_graph(plan, tmp_path)
    counts = graph.counts()
    assert counts == {"pretrain_tpp": tpp, "finetune": finetune, "evaluate": finetune}
    stages = {k: n for k, n in graph.nodes.items() if n.stage == "pretrain_tpp"}
    identities = {(n.settings["dataset"], n.settings["method"], n.settings["pretext"], n.settings["seed"],
                   n.settings["variant"]) for n in stages.values()}  # fmt: skip
    assert len(identities) == len(stages)  # one stage per (dataset, method, pretext, seed, variant)
    for node in graph.nodes.values():
        if node.stage == "finetune" and node.settings["init"] != "random":
            (dep,) = node.deps
            tpp_node = graph.nodes[dep]
            assert tpp_node.settings["dataset"] == (node.settings["source"] or node.settings["dataset"])
            assert (tpp_node.settings["method"], tpp_node.settings["seed"]) == (node.settings["method"],
                                                                                node.settings["seed"])  # fmt: skip
        if node.stage == "finetune" and node.settings["init"] == "random":
            assert node.deps == []
    if preset == "paper-table3":  # the command line prints the same counts (one subprocess is enough)
        out = subprocess.run(_cli("plan", preset, "--out", str(tmp_path)), capture_output=True, text=True, env=_env())
        assert out.returncode == 0, out.stderr
        assert f"pretrain_tpp {tpp}, finetune {finetune}, evaluate {finetune}" in out.stdout
        assert not (tmp_path / plan.name).exists()  # `plan` runs and writes nothing


def test_every_preset_loads():
    names = preset_names()
    assert {"tiny", "paper-table3", "paper-table10"} <= set(names)
    for name in names:
        assert load_plan(name).name == name


@pytest.mark.parametrize(
    "change, words",
    [
        ({"colour": "red"}, ["unknown plan key 'colour'", "datasets"]),
        ({"datasets": ["glass"]}, ["unknown dataset 'glass'", "glas"]),
        ({"init": ["tpp-simclr"]}, ["unknown initialisation 'tpp-simclr'", "tpp-dino"]),
        ({"methods": ["conv_adapter"]}, ["no bundle glas_conv_adapter"]),
        ({"label_fractions": [0]}, ["label fraction 0", "(0, 1]"]),
        ({"executor": {"kind": "pbs"}}, ["unknown executor 'pbs'", "slurm"]),
        ({"executor": {"slurm": {"queue": "a"}}}, ["unknown executor.slurm key 'queue'", "partition"]),
        ({"init": ["upstream"]}, ["tpp_ckpt"]),
        ({"overlays": ["nothing"]}, ["overlay 'nothing'"]),
    ],
)
def test_bad_plans_are_refused_with_one_message(change, words, tmp_path):
    data = {"name": "t", "datasets": ["glas"], "methods": ["adapter"], "init": ["random"], "seeds": [0], **change}
    with pytest.raises(ConfigError) as err:
        load_plan(data)
    for word in words:
        assert word in str(err.value)


def test_the_cli_prints_one_message_for_a_bad_plan(tmp_path):
    plan_file = tmp_path / "bad.yaml"
    plan_file.write_text("name: bad\ndatasets: [glas]\nmethods: [adapter]\nseeds: [-1]\n")
    out = subprocess.run(_cli("plan", str(plan_file)), capture_output=True, text=True, env=_env())
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == "error: seed -1 (from plan seeds) must be a non-negative integer"


def test_commands_keep_every_output_in_the_run_folder(tmp_path):
    graph = build_graph(load_plan("tiny"), tmp_path)
    nodes = graph.nodes
    tpp = next(n for n in nodes.values() if n.stage == "pretrain_tpp")
    by_init = {n.settings["init"]: n for n in nodes.values() if n.stage == "finetune"}
    for node in nodes.values():
        argv, values = command(node, graph)
        assert argv[1:5] == ["-m", "monai.bundle", "run", node.stage]
        configs = json.loads(argv[argv.index("--config_file") + 1])
        # evaluate.json is an overlay on finetune.json
        files = ("finetune", "evaluate") if node.stage == "evaluate" else (node.stage,)
        assert configs == [str(REPO / "bundles" / node.bundle / "configs" / f"{c}.json") for c in (*files, "demo")]
        assert values["runs_dir"] == values["output_dir"] == str(node.folder)
        assert Path(values["ckpt_dir"]).is_relative_to(graph.exp_dir)
        assert node.folder.is_relative_to(graph.exp_dir / "runs" / node.stage)
        assert values["seed"] == node.settings["seed"]
    assert command(by_init["tpp-mae"], graph)[1]["tpp_ckpt"] == str(tpp.folder / "tpp_target")
    assert command(by_init["random"], graph)[1]["tpp_ckpt"] == "none"
    assert command(tpp, graph, resume=True)[1]["resume"] is True
    evaluate = next(n for n in nodes.values() if n.stage == "evaluate" and n.settings["init"] == "tpp-mae")
    assert command(evaluate, graph)[1]["ckpt_dir"] == str(by_init["tpp-mae"].folder / "models")
    argv, _ = command(by_init["random"], graph, nproc=4)
    assert argv[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=4"]
    assert json.loads(argv[argv.index("--config_file") + 1])[-1].endswith("multi_gpu.json")


@pytest.mark.parametrize("gpus_per_run", [1, 2])
def test_local_executor_pins_runs_to_the_visible_gpus(gpus_per_run, tmp_path, monkeypatch):
    """Each run sees only its GPUs; with one GPU per run, independent runs run at the same time (the workflow is
    replaced by a script that records what it was given)."""
    from tpp_monai.experiments import executors

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    data = load_plan("tiny").to_dict()
    data["executor"]["gpus_per_run"] = gpus_per_run
    graph = build_graph(load_plan({k: v for k, v in data.items() if k != "source"}), tmp_path)
    script = ("import json, os, sys, time, pathlib; p = pathlib.Path(sys.argv[1]); p.parent.mkdir(parents=True, "
              "exist_ok=True); p.write_text(json.dumps([os.environ['CUDA_VISIBLE_DEVICES'], sys.argv[2]])); "
              "time.sleep(2)")  # fmt: skip

    def fake_command(node, graph, resume=False, tracking=None, nproc=1, python=sys.executable):
        return [python, "-c", script, str(node.product), str(nproc)], {"seed": node.settings["seed"]}

    monkeypatch.setattr(executors, "command", fake_command)
    outcome = executors.run_graph(graph, "local", None, progress=False)
    assert outcome.ok and len(outcome.ran) == 5
    given = {k: json.loads(n.product.read_text()) for k, n in graph.nodes.items()}
    if gpus_per_run == 1:
        assert all(devices in ("3", "5") and nproc == "1" for devices, nproc in given.values())
        recs = _records(graph.exp_dir)
        first = [recs["finetune/glas_adapter__random__lf1.0__s0"], recs["pretrain_tpp/glas_adapter__mae__s0"]]
        assert max(r["started"] for r in first) < min(r["finished"] for r in first)  # ran side by side
    else:
        assert all(devices == "3,5" and nproc == "2" for devices, nproc in given.values())


# ------------------------------------------------------------------------------------- kill -9 and resume


def _wait_for(predicate, what: str, proc: subprocess.Popen | None = None):
    """Poll until ``predicate()`` is truthy (no time limit: the runs' pace depends on the machine)."""
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the orchestrator ended (status {proc.returncode}) before {what}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def resumed_experiment(tmp_path_factory):
    """The ``tiny`` plan killed with ``kill -9`` once a fine-tuning finished and another run started, then rerun
    with the same command; returns (experiment folder, records at the kill, output of the rerun)."""
    out = tmp_path_factory.mktemp("experiments")
    exp = out / "tiny"
    argv = _cli("run", "tiny", "--out", str(out))
    log = open(out / "first.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=_env())

    def interrupted():
        recs = _records(exp)
        finetuned = any(r["stage"] == "finetune" and r["status"] == "done" for r in recs.values())
        running = [k for k, r in recs.items() if r["status"] == "running" and r.get("pid")]
        return recs if finetuned and running else None

    at_kill = _wait_for(interrupted, "a fine-tuning finished and the next run started", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    at_kill = _records(exp)  # the records as the kill left them
    for rec in at_kill.values():  # the runs die with the orchestrator (no orphan keeps writing into the folders)
        if rec["status"] == "running":
            _wait_for(lambda pid=rec["pid"]: not _alive(pid), "the killed orchestrator's run ended")
    mtimes = {k: _product_mtimes(exp, k) for k, r in at_kill.items() if r["status"] == "done"}
    rerun = subprocess.run(argv, capture_output=True, text=True, env=_env())
    return exp, at_kill, mtimes, rerun


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _product_mtimes(exp: Path, key: str) -> dict[str, int]:
    folder = exp / "runs" / key
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()
            and p.name not in ("run.json",)}  # fmt: skip


@pytest.mark.slow
def test_kill_9_then_the_same_command_finishes_without_repeating_a_finished_run(resumed_experiment):
    exp, at_kill, mtimes, rerun = resumed_experiment
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    after = _records(exp)
    assert len(after) == 5 and all(r["status"] == "done" for r in after.values())
    finished = [k for k, r in at_kill.items() if r["status"] == "done"]
    assert any(k.startswith("finetune/") for k in finished)
    for key in finished:  # never run again: same attempt count, no file of the run rewritten
        assert after[key]["attempts"] == at_kill[key]["attempts"] == 1
        assert _product_mtimes(exp, key) == mtimes[key]
    interrupted = [k for k, r in at_kill.items() if r["status"] == "running"]
    assert interrupted
    for key in interrupted:  # continued with --resume true (training stages) in a second attempt
        assert after[key]["attempts"] == 2 and after[key]["resumed"] is True
        if not key.startswith("evaluate/"):
            assert json.loads((exp / "runs" / key / "args.json").read_text())["resume"] is True
    assert f"{len(finished)} runs were already done" in rerun.stdout
    status = subprocess.run(_cli("status", str(exp)), capture_output=True, text=True, env=_env())
    assert status.returncode == 0
    rows = {line.split()[0]: line.split()[1:] for line in status.stdout.splitlines()[2:5]}
    assert rows == {stage: ["1" if stage == "pretrain_tpp" else "2", "0", "0", "0"] for stage in rows}
    assert set(rows) == {"pretrain_tpp", "finetune", "evaluate"}
    assert (exp / "runs" / "evaluate" / "glas_adapter__tpp-mae__lf1.0__s0" / "metrics.json").is_file()


@pytest.mark.slow
def test_mlflow_store_holds_one_parent_and_a_child_per_run(resumed_experiment):
    from mlflow.tracking import MlflowClient

    exp, _, _, rerun = resumed_experiment
    assert rerun.returncode == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{exp / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("stage") == "experiment"]
    assert len(parents) == 1  # the rerun reused the parent of the killed invocation
    parent = parents[0]
    assert json.loads((exp / "mlflow_parent.json").read_text())["run_id"] == parent.info.run_id
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    records = _records(exp)
    assert sorted(r.info.run_name for r in children) == sorted(k.replace("/", "__") for k in records)
    for child in children:
        stage, key = child.info.run_name.split("__", 1)
        settings = records[f"{stage}/{key}"]["settings"]
        params, tags = child.data.params, child.data.tags
        assert tags["stage"] == stage and tags["experiment"] == "tiny"
        for name in ("dataset", "method", "seed"):
            assert params[name] == str(settings[name])
        assert "init" in params and params["backbone"] == "medcoss_vit_tiny"
    finetunes = {r.data.tags["init"]: r.data.params for r in children if r.data.tags["stage"] == "finetune"}
    random, tpp = finetunes["random"], finetunes["tpp-mae"]
    assert random["init"] != tpp["init"]
    assert random["dataset"] == tpp["dataset"] and random["seed"] == tpp["seed"]
    assert len(tpp["tpp_ckpt_sha256"]) == 64 and random.get("tpp_ckpt_sha256", "none") == "none"
    evaluated = next(r for r in children if r.data.tags["stage"] == "evaluate")
    assert {"run.json", "metrics.json"} <= {a.path for a in client.list_artifacts(evaluated.info.run_id)}


@pytest.mark.slow
def test_a_failing_run_is_retried_once_then_reported_while_independent_runs_go_on(tmp_path):
    import yaml

    data = {k: v for k, v in load_plan("tiny").to_dict().items() if k not in ("source", "grids")}
    missing = tmp_path / "no_such_datalist.json"
    data.update(
        name="tiny_fail", stage_overrides={**data["stage_overrides"], "pretrain_tpp": {"datalist": str(missing)}}
    )
    plan = tmp_path / "fail.yaml"
    plan.write_text(yaml.safe_dump(data))
    out = subprocess.run(_cli("run", str(plan), "--out", str(tmp_path), "--no-tracking"), capture_output=True,
                         text=True, env=_env())  # fmt: skip
    assert out.returncode == 1
    recs = _records(tmp_path / "tiny_fail")
    tpp_key = "pretrain_tpp/glas_adapter__mae__s0"
    assert recs[tpp_key]["status"] == "failed" and recs[tpp_key]["attempts"] == 2
    log = tmp_path / "tiny_fail" / "runs" / tpp_key / "log.txt"
    assert f"failed: {tpp_key}: log {log}" in out.stdout and str(missing) in log.read_text()
    for key in ("finetune/glas_adapter__tpp-mae__lf1.0__s0", "evaluate/glas_adapter__tpp-mae__lf1.0__s0"):
        assert key not in recs  # never started: skipped, and said so
        assert f"skipped: {key}" in out.stdout
    for key in ("finetune/glas_adapter__random__lf1.0__s0", "evaluate/glas_adapter__random__lf1.0__s0"):
        assert recs[key]["status"] == "done" and recs[key]["attempts"] == 1


# --------------------------------------------------------------------------------------------------- SLURM

SLURM_INSTALL = "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y slurm-wlm munge"


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A single-node SLURM (munged + slurmctld + slurmd as root) configured in a temporary folder; yields the
    environment that points SLURM's commands at it. The daemons are stopped by pid at the end."""
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel") if not shutil.which(b)]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing); install it with: {SLURM_INSTALL}")
    if os.geteuid() != 0:
        pytest.skip("the test SLURM runs its daemons as root (SlurmUser=root); run the tests as root, as .ci/run does")
    base = tmp_path_factory.mktemp("slurm")
    for sub in ("munge", "spool/ctld", "spool/d", "log"):
        (base / sub).mkdir(parents=True)
    (base / "munge").chmod(0o700)
    key = base / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    host = socket.gethostname().split(".")[0]
    memory = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
    conf = base / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=tpptest", f"SlurmctldHost={host}", f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
        "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", "CredType=cred/munge",
        f"AuthInfo=socket={base / 'munge' / 'munge.sock'}", f"StateSaveLocation={base / 'spool' / 'ctld'}",
        f"SlurmdSpoolDir={base / 'spool' / 'd'}", f"SlurmctldPidFile={base / 'slurmctld.pid'}",
        f"SlurmdPidFile={base / 'slurmd.pid'}", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core_Memory", "ReturnToService=2", "MpiDefault=none",
        f"SlurmctldLogFile={base / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={base / 'log' / 'slurmd.log'}",
        f"NodeName={host} CPUs={os.cpu_count()} RealMemory={memory} State=UNKNOWN",
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""]))  # fmt: skip
    env = {**_env(), "SLURM_CONF": str(conf)}
    pids = []
    try:
        subprocess.run(["munged", "--force", f"--socket={base / 'munge' / 'munge.sock'}", f"--key-file={key}",
                        f"--pid-file={base / 'munge' / 'munged.pid'}", f"--log-file={base / 'munge' / 'munged.log'}",
                        f"--seed-file={base / 'munge' / 'seed'}"], check=True, env=env)  # fmt: skip
        pids.append(base / "munge" / "munged.pid")
        subprocess.run(["slurmctld", "-f", str(conf)], check=True, env=env)
        pids.append(base / "slurmctld.pid")
        subprocess.run(["slurmd", "-f", str(conf)], check=True, env=env)
        pids.append(base / "slurmd.pid")
        _wait_for(lambda: "idle" in subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                                                   env=env).stdout, "the SLURM node is idle")  # fmt: skip
        yield env
    finally:
        for pid_file in reversed(pids):
            if pid_file.is_file():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)


@pytest.mark.slow
def test_slurm_runs_the_graph_with_afterok_and_resumes_a_cancelled_job(slurm_cluster, tmp_path):
    env = slurm_cluster
    plan = tmp_path / "tiny_slurm.yaml"
    data = load_plan("tiny").to_dict()
    data = {k: v for k, v in data.items() if k not in ("source", "grids")}
    data.update(name="tiny_slurm", init=["tpp-mae"])  # pretrain_tpp -> finetune -> evaluate: one job each
    data["executor"] = {"kind": "slurm", "slurm": {"cpus_per_task": 1, "mem_gb": 1, "timeout_min": 60,
                                                   "additional": {"comment": "tpp-test"}}}  # fmt: skip
    import yaml

    plan.write_text(yaml.safe_dump(data))
    exp = tmp_path / "out" / "tiny_slurm"
    argv = _cli("run", str(plan), "--out", str(tmp_path / "out"), "--no-tracking")
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)

    def submitted():
        recs = _records(exp)
        return recs if len(recs) == 3 and all(r.get("job_id") for r in recs.values()) else None

    recs = _wait_for(submitted, "all three jobs were submitted", proc)
    tpp_job = recs["pretrain_tpp/glas_adapter__mae__s0"]["job_id"]
    ft_key = "finetune/glas_adapter__tpp-mae__lf1.0__s0"
    ft_job = recs[ft_key]["job_id"]
    script = Path(next((tmp_path / "out" / "tiny_slurm" / "slurm" / ft_job).glob("*_submission.sh")))
    assert f"--dependency=afterok:{tpp_job}" in script.read_text()  # the edge pretrain_tpp -> finetune
    assert "--comment=tpp-test" in script.read_text() and "--mem=1GB" in script.read_text()

    # wait until the fine-tuning job runs, then kill the orchestrator and cancel that job
    def state(job: str) -> str:
        return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, env=env).stdout

    _wait_for(lambda: "RUNNING" in state(ft_job), "the fine-tuning job runs", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    subprocess.run(["scancel", ft_job], check=True, env=env)
    _wait_for(lambda: not state(ft_job).strip(), "the cancelled job left the queue")
    eval_key = "evaluate/glas_adapter__tpp-mae__lf1.0__s0"  # its job still waits on the cancelled one
    tpp_done = _records(exp)["pretrain_tpp/glas_adapter__mae__s0"]
    assert tpp_done["status"] == "done"
    rerun = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    after = _records(exp)
    assert all(r["status"] == "done" for r in after.values())
    assert after["pretrain_tpp/glas_adapter__mae__s0"]["attempts"] == 1  # not run again
    assert after["pretrain_tpp/glas_adapter__mae__s0"]["job_id"] == tpp_job
    assert after[ft_key]["attempts"] == 2 and after[ft_key]["resumed"] is True and after[ft_key]["job_id"] != ft_job
    assert json.loads((exp / "runs" / ft_key / "args.json").read_text())["resume"] is True
    assert (exp / "runs" / eval_key / "metrics.json").is_file()


def test_paper_small_trimmed_reports_every_item(tmp_path):
    """``paper-small`` cut to 1 dataset, 1 method, 2 seeds and a few iterations (both label fractions kept): its
    report holds, per metric and fraction, the gain with its interval, the paper's gain, the detectable effect, the
    seeds needed and a verdict; convergence per fine-tuning run, recomputed here from each run's history.csv; the
    convergence and label-fraction plots."""
    import csv
    import statistics

    import yaml

    from tpp_monai.report.experiment import write_report

    data = {k: v for k, v in load_plan("paper-small").to_dict().items() if k not in ("source", "grids")}
    assert (data["datasets"], data["methods"], data["label_fractions"]) == (["mhist", "glas"], ["adapter", "lora"],
                                                                            [0.1, 1.0])  # fmt: skip
    assert data["init"] == ["random", "tpp-mae"] and data["seeds"] == [0, 1, 2] and data["overlays"] == ["demo"]
    data.update(name="paper_small_trim", datasets=["glas"], methods=["adapter"], seeds=[0, 1],
                overrides={**data["overrides"], "val_interval": 1},
                stage_overrides={"pretrain_tpp": {"tpp_epochs": 2, "warmup_epochs": 1},
                                 "finetune": {"iterations": 8}})  # fmt: skip
    plan = tmp_path / "trim.yaml"
    plan.write_text(yaml.safe_dump(data))
    out = subprocess.run(_cli("run", str(plan), "--out", str(tmp_path), "--no-tracking"), capture_output=True,
                         text=True, env=_env())  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    exp = tmp_path / "paper_small_trim"
    report = write_report(exp)
    assert not report["missing"]
    assert {(g["label_fraction"], g["metric"]) for g in report["gain"]} == {(f, m) for f in (0.1, 1.0)
                                                                            for m in ("dice", "hd95")}  # fmt: skip
    histories = {}
    for folder in (exp / "runs" / "finetune").glob("*/"):
        s = json.loads((folder / "run.json").read_text())["settings"]
        with open(folder / "history.csv", newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("val_dice")]
        histories[(s["init"], s["label_fraction"], s["seed"])] = [
            (int(r["iteration"]), float(r["elapsed_s"]), 100 * float(r["val_dice"])) for r in rows
        ]
    for g in report["gain"]:
        assert g["n_seeds"] == 2 and len(g["ci95"]) == 2 and g["ci95"][0] <= g["gain_mean"] <= g["ci95"][1]
        assert g["paper_gain"] is not None and "Table 4" in g["paper_gain_source"]["table"]
        assert g["detectable_effect"] is not None or g["seed_gains"][0] == g["seed_gains"][1]
        assert g["verdict"]["case"] in ("negligible", "paper_order", "no_effect", "better", "worse")
        assert "with 2 seeds the interval is just the seeds' range" in g["verdict"]["text"]
        conv = g["convergence"]
        assert conv["metric"] == "val_dice" and conv["seeds"] == [0, 1]
        fraction = g["label_fraction"]
        best = [max(v for _, _, v in histories[("random", fraction, s)]) for s in (0, 1)]
        target = 0.95 * statistics.mean(best)
        assert conv["target"] == pytest.approx(target)
        for init in ("random", "tpp-mae"):
            hits = [next(((i, t) for i, t, v in histories[(init, fraction, s)] if v >= target), (None, None))
                    for s in (0, 1)]  # fmt: skip
            assert conv["iterations"][init] == [h[0] for h in hits]
            assert conv["seconds"][init] == pytest.approx([h[1] for h in hits])
        assert any(conv["reached"]["random"])  # the seed with the highest best is at least 95 % of their mean
    names = {Path(p).name for p in report["plots"]}
    assert {"convergence_adapter.png", "fractions_glas_adapter.png", "gain_adapter.png"} <= names
    md = (exp / "report" / "report.md").read_text()
    for words in ("paper's gain", "detectable effect", "## Convergence: iterations to the target",
                  "## Label-fraction curves"):  # fmt: skip
        assert words in md
