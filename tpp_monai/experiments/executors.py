"""Run a graph's workflows: ``local`` (subprocesses on this machine) or ``slurm`` (one submitit job per run).

Every run keeps its state in ``<folder>/run.json`` (written atomically): a run whose record is ``done`` for the same
settings digest, with its product on disk, is never run again; a run found ``running`` that nothing runs any more was
interrupted and continues with ``--resume true``; a failed run is retried once (resumed), then reported with its log
while the runs that do not need it go on; the runs that need it are skipped and reported.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tpp_monai.errors import ConfigError
from tpp_monai.experiments.graph import Graph, Node, command, read_json
from tpp_monai.io import write_json_atomic

TRIES = 2  # one run and one retry per invocation
POLL_S = 1.0


def record(node: Node) -> dict | None:
    return read_json(node.folder / "run.json")


def node_status(node: Node) -> str:
    """``done`` | ``running`` | ``failed`` | ``pending`` as recorded for the node's current settings."""
    rec = record(node)
    if rec is None or rec.get("digest") != node.digest:
        return "pending"
    if rec.get("status") == "done" and not node.has_product:
        return "pending"
    return rec.get("status", "pending")


def _new_record(node: Node) -> dict:
    return {"stage": node.stage, "bundle": node.bundle, "settings": node.settings, "overrides": node.overrides,
            "digest": node.digest, "deps": node.deps, "status": "pending", "attempts": 0,
            "log": str(node.folder / "log.txt")}  # fmt: skip


def set_aside_superseded(node: Node, graph: Graph) -> None:
    """A folder recorded for other settings (the plan changed) moves to ``<exp>/superseded/`` before a new run."""
    rec = record(node)
    if node.folder.exists() and (rec is None or rec.get("digest") != node.digest):
        target = graph.exp_dir / "superseded" / node.stage / f"{node.folder.name}-{time.strftime('%Y%m%d_%H%M%S')}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(node.folder), str(target))
        print(f"note: {node.key} was run with other settings; moved to {target}", flush=True)


def begin_attempt(node: Node, graph: Graph, tracking: dict | None, nproc: int = 1, job_id: str | None = None
                  ) -> list[str]:  # fmt: skip
    """Write the run's args file and record (status ``running``); returns the command line.

    The run resumes (``--resume true``) when an earlier attempt started in its folder."""
    set_aside_superseded(node, graph)
    rec = record(node) or _new_record(node)
    argv, overrides = command(node, graph, resume=rec["attempts"] > 0, tracking=tracking, nproc=nproc)
    write_json_atomic(node.folder / "args.json", overrides)
    rec.update(status="running", attempts=rec["attempts"] + 1, command=argv, started=time.time(), job_id=job_id,
               resumed=rec["attempts"] > 0, returncode=None)  # fmt: skip
    write_json_atomic(node.folder / "run.json", rec)
    with open(node.folder / "log.txt", "a") as log:
        log.write(f"\n===== attempt {rec['attempts']}{' (resumed)' if rec['resumed'] else ''}: {' '.join(argv)}\n")
    return argv


def finish_attempt(node: Node, returncode: int | None) -> str:
    """Record the end of an attempt; ``done`` needs exit status 0 and the stage's product file."""
    rec = record(node) or _new_record(node)
    ok = returncode == 0 and node.has_product
    rec.update(status="done" if ok else "failed", returncode=returncode, finished=time.time(),
               seconds=round(time.time() - rec.get("started", time.time()), 1))  # fmt: skip
    write_json_atomic(node.folder / "run.json", rec)
    return rec["status"]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the run gets SIGKILL when the orchestrator dies (even by ``kill -9``), so a rerun never races it."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [g for g in given.split(",") if g.strip() and g.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


class Progress:
    """Overall progress: a tqdm bar on a terminal, one plain line per finished run otherwise."""

    def __init__(self, total: int, done: int, enabled: bool = True):
        self.enabled, self.total, self.count = enabled, total, done
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="run", desc="experiment")
        elif enabled:
            print(f"[{done}/{total}] runs already done", flush=True)

    def started(self, node: Node, note: str = "") -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"{node.key}{note}")
        elif self.enabled:
            print(f"[{self.count}/{self.total}] start {node.key}{note}", flush=True)

    def finished(self, node: Node, status: str) -> None:
        if status in ("done", "failed", "skipped"):
            self.count += 1
        if self.bar is not None:
            self.bar.update(1 if status in ("done", "failed", "skipped") else 0)
            if status != "done":
                self.bar.write(f"{status}: {node.key} (log {node.folder / 'log.txt'})")
        elif self.enabled:
            where = "" if status == "done" else f" (log {node.folder / 'log.txt'})"
            print(f"[{self.count}/{self.total}] {status} {node.key}{where}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class Outcome:
    """What ``run_graph`` did: the runs found done, run now, failed (with logs) and skipped (with the reason)."""

    already_done: list[str] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.skipped

    def summary(self) -> str:
        lines = [f"{len(self.already_done)} runs were already done, {len(self.ran)} ran now, {len(self.failed)} "
                 f"failed, {len(self.skipped)} skipped"]  # fmt: skip
        lines += [f"  failed: {k}: log {v}" for k, v in self.failed.items()]
        lines += [f"  skipped: {k}: {v}" for k, v in self.skipped.items()]
        return "\n".join(lines)


class _Scheduler:
    """The bookkeeping both executors share: which runs wait, which may start, retries and skips."""

    def __init__(self, graph: Graph, tracker: Tracker | None, progress: bool):
        self.graph, self.tracker = graph, tracker
        self.outcome = Outcome()
        self.status: dict[str, str] = {}
        for key, node in graph.nodes.items():
            self.status[key] = "done" if node_status(node) == "done" else "waiting"
            if self.status[key] == "done":
                self.outcome.already_done.append(key)
        self.tries = dict.fromkeys(graph.nodes, 0)
        self.progress = Progress(len(graph.nodes), len(self.outcome.already_done), progress)

    def waiting(self) -> list[Node]:
        return [self.graph.nodes[k] for k, s in self.status.items() if s == "waiting"]

    def ready(self, node: Node) -> bool | None:
        """True when every dependency is done, None when one can never be (then the node is skipped)."""
        for dep in node.deps:
            if self.status[dep] in ("failed", "skipped"):
                self.status[node.key] = "skipped"
                self.outcome.skipped[node.key] = f"needs {dep}, which {self.status[dep]}"
                self.progress.finished(node, "skipped")
                return None
        return all(self.status[d] == "done" for d in node.deps)

    def start(self, node: Node) -> None:
        self.tries[node.key] += 1
        self.status[node.key] = "running"

    def end(self, node: Node, status: str) -> bool:
        """Record a finished attempt; returns True when the run goes back to wait for its retry."""
        if status == "done":
            self.status[node.key] = "done"
            self.outcome.ran.append(node.key)
            if self.tracker:
                self.tracker.after_run(node)
            self.progress.finished(node, "done")
            return False
        if self.tries[node.key] < TRIES:
            self.status[node.key] = "waiting"
            print(f"retrying {node.key} (resumed) after a failed attempt; log {node.folder / 'log.txt'}", flush=True)
            return True
        self.status[node.key] = "failed"
        self.outcome.failed[node.key] = str(node.folder / "log.txt")
        if self.tracker:
            self.tracker.after_run(node)
        self.progress.finished(node, "failed")
        return False


class Tracker:
    """The MLflow side of a graph run (parent run, child overrides, child tags after each run)."""

    def __init__(self, graph: Graph, uri: str):
        from tpp_monai.tracking import experiments as tracking

        self.graph, self.uri, self.module = graph, uri, tracking
        self.parent_id = tracking.start_parent(graph, uri)

    def overrides(self, node: Node) -> dict:
        return self.module.child_overrides(node, self.graph, self.uri, self.parent_id)

    def after_run(self, node: Node) -> None:
        try:
            self.module.annotate_child(node, self.graph, self.uri, self.parent_id)
        except Exception as err:  # tracking must not stop the plan; say so and go on
            print(f"warning: MLflow tags of {node.key} not written: {err}", flush=True)

    def close(self, ok: bool) -> None:
        self.module.end_parent(self.uri, self.parent_id, ok)


def _gpu_count(graph: Graph) -> int:
    return int(graph.plan.executor.get("gpus_per_run") or 0)


def run_local(graph: Graph, tracker: Tracker | None = None, progress: bool = True) -> Outcome:
    """Sequential on CPU; on GPUs one run per visible GPU at a time (``CUDA_VISIBLE_DEVICES``), ``torchrun`` for runs
    asking for several GPUs."""
    gpus = visible_gpus()
    per_run = max(1, _gpu_count(graph)) if gpus else 1
    if gpus and per_run > len(gpus):
        raise ConfigError(f"executor.gpus_per_run is {per_run} but {len(gpus)} GPUs are visible; lower it")
    free: list[str | None] = list(gpus) if gpus else [None]
    sched = _Scheduler(graph, tracker, progress)
    running: dict[str, tuple[subprocess.Popen, list, object]] = {}
    try:
        while True:
            for node in sched.waiting():
                if sched.ready(node) and len(free) >= per_run:
                    slots, free = free[:per_run], free[per_run:]
                    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
                    if gpus:
                        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(s) for s in slots)
                    argv = begin_attempt(node, graph, tracker.overrides(node) if tracker else None,
                                         nproc=per_run if gpus else 1)  # fmt: skip
                    log = open(node.folder / "log.txt", "a")  # noqa: SIM115 - closed when the run ends
                    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            preexec_fn=_die_with_parent)  # fmt: skip
                    rec = record(node)
                    rec["pid"] = proc.pid
                    write_json_atomic(node.folder / "run.json", rec)
                    sched.start(node)
                    sched.progress.started(node, f" on GPU {','.join(map(str, slots))}" if gpus else "")
                    running[node.key] = (proc, slots, log)
            if not running and not sched.waiting():
                break
            time.sleep(POLL_S)
            for key, (proc, slots, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[key]
                free.extend(slots)
                sched.end(graph.nodes[key], finish_attempt(graph.nodes[key], proc.returncode))
    finally:
        for proc, _, _ in running.values():
            proc.kill()
        sched.progress.close()
    return sched.outcome


def slurm_job(argv: list[str], folder: str, digest: str) -> int:
    """The body of one SLURM job (submitit pickles this call): run the workflow, record how it ended."""
    node_dir = Path(folder)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(node_dir / "log.txt", "a") as log:
        log.write(f"===== SLURM job {os.environ.get('SLURM_JOB_ID')} on {os.uname().nodename}\n")
        log.flush()
        returncode = subprocess.call(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    rec = read_json(node_dir / "run.json") or {}
    if rec.get("digest") == digest:
        from tpp_monai.experiments.graph import PRODUCTS, product_complete

        ok = returncode == 0 and product_complete(node_dir / PRODUCTS[rec["stage"]])
        rec.update(status="done" if ok else "failed", returncode=returncode, finished=time.time(),
                   seconds=round(time.time() - rec.get("started", time.time()), 1))  # fmt: skip
        write_json_atomic(node_dir / "run.json", rec)
    if returncode != 0:
        raise RuntimeError(f"workflow exited with status {returncode}; log {node_dir / 'log.txt'}")
    return returncode


def slurm_jobs_alive(job_ids: list[str]) -> set[str]:
    """The jobs of ``job_ids`` that SLURM still holds (pending, running, completing)."""
    if not job_ids:
        return set()
    out = subprocess.run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(job_ids)], capture_output=True, text=True)
    alive = set()
    for line in out.stdout.splitlines():
        job, state = line.split()[:2]
        if state in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING"):
            alive.add(job)
    return alive


def run_slurm(graph: Graph, tracker: Tracker | None = None, progress: bool = True) -> Outcome:
    """One submitit job per run, with ``afterok`` dependencies on the jobs of the runs it needs; resources from the
    plan's ``executor.slurm``. A job that vanished without recording its end (cancelled, killed, node lost) counts
    as a failed attempt: it is resubmitted once with ``--resume true``, and the jobs waiting on it are resubmitted."""
    import submitit

    if shutil.which("sbatch") is None:
        raise ConfigError("the slurm executor needs SLURM's sbatch on PATH; on Debian: apt-get install -y slurm-wlm "
                          "munge (or use --executor local)")  # fmt: skip
    options = graph.plan.executor["slurm"]
    gpus = int(options.get("gpus_per_node") or 0)
    sched = _Scheduler(graph, tracker, progress)
    jobs: dict[str, str] = {}  # node key -> job id
    for node in sched.waiting():  # jobs of an earlier invocation still in the queue are adopted, not resubmitted
        rec = record(node)
        if node_status(node) == "running" and rec.get("job_id") and rec["job_id"] in slurm_jobs_alive([rec["job_id"]]):
            jobs[node.key] = rec["job_id"]
            sched.start(node)
    for key in list(jobs):  # an adopted job waiting on a run whose job is gone would never start: resubmit it
        if any(sched.status[d] != "done" and d not in jobs for d in graph.nodes[key].deps):
            subprocess.run(["scancel", jobs.pop(key)], capture_output=True)
            sched.status[key] = "waiting"
            sched.tries[key] = 0
    folder = graph.exp_dir / "slurm"
    try:
        while True:
            for node in sched.waiting():
                ready = sched.ready(node)
                if ready is None or not all(sched.status[d] == "done" or d in jobs for d in node.deps):
                    continue
                executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
                needs = [jobs[d] for d in node.deps if d in jobs]
                additional = {**options.get("additional", {})}
                if needs:
                    additional["dependency"] = "afterok:" + ":".join(needs)
                params = {"name": f"{graph.plan.name}:{node.key}", "timeout_min": int(options["timeout_min"]),
                          "cpus_per_task": int(options["cpus_per_task"]), "mem_gb": options["mem_gb"],
                          "slurm_additional_parameters": additional}  # fmt: skip
                if options.get("partition"):
                    params["slurm_partition"] = options["partition"]
                if gpus:
                    params["gpus_per_node"] = gpus
                executor.update_parameters(**params)
                argv = begin_attempt(node, graph, tracker.overrides(node) if tracker else None, nproc=max(1, gpus))
                job = executor.submit(slurm_job, argv, str(node.folder), node.digest)
                rec = record(node)
                rec["job_id"] = str(job.job_id)
                write_json_atomic(node.folder / "run.json", rec)
                jobs[node.key] = str(job.job_id)
                sched.start(node)
                sched.progress.started(node, f" as SLURM job {job.job_id}" + (f" after {','.join(needs)}" if needs
                                                                                else ""))  # fmt: skip
            if not jobs and not sched.waiting():
                break
            time.sleep(POLL_S)
            alive = slurm_jobs_alive(list(jobs.values()))
            for key, job_id in list(jobs.items()):
                if job_id in alive or key not in jobs:
                    continue
                node = graph.nodes[key]
                del jobs[key]
                rec = record(node) or {}
                status = rec.get("status") if rec.get("status") in ("done", "failed") else finish_attempt(node, None)
                if status == "done" and not node.has_product:
                    status = finish_attempt(node, None)
                if sched.end(node, status) or sched.status[key] == "failed":
                    for other in graph.dependents(key):  # queued on the lost job: they will never start
                        if other in jobs:
                            subprocess.run(["scancel", jobs.pop(other)], capture_output=True)
                            sched.status[other] = "waiting"
                            sched.tries[other] -= 1
    finally:
        sched.progress.close()
    return sched.outcome


EXECUTORS = {"local": run_local, "slurm": run_slurm}


def run_graph(graph: Graph, executor: str = "local", tracking_uri: str | None = None, progress: bool = True
              ) -> Outcome:  # fmt: skip
    """Run every node of ``graph`` that is not done; ``tracking_uri`` turns on MLflow (parent + children)."""
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor {executor!r}; valid executors: {', '.join(EXECUTORS)}")
    from tpp_monai.experiments.graph import describe

    graph.exp_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(graph.exp_dir / "plan.json", {**graph.plan.to_dict(), "graph": {
        k: {"stage": n.stage, "bundle": n.bundle, "folder": str(n.folder), "deps": n.deps, "digest": n.digest}
        for k, n in graph.nodes.items()}})  # fmt: skip
    (graph.exp_dir / "plan.txt").write_text(describe(graph) + "\n")
    tracker = Tracker(graph, tracking_uri) if tracking_uri else None
    outcome = EXECUTORS[executor](graph, tracker, progress)
    if tracker:
        tracker.close(outcome.ok)
    return outcome
