"""Reading an experiment folder for its report: ``plan.json``, every ``runs/<stage>/<run_key>/run.json`` (the layout
of ``experiments-contract.md``) and the evaluated runs' ``metrics.json``; runs that are missing, unfinished, failed
or unreadable become problems, never errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tpp_monai.errors import UserError
from tpp_monai.experiments import paper
from tpp_monai.report.runs import load_runs

STAGES = ("pretrain_tpp", "finetune", "evaluate")
STANDARD_SETTINGS = ("dataset", "method", "init", "pretext", "source", "label_fraction", "seed", "backbone")
STATUS_REASONS = {
    "failed": "failed; see its log",
    "running": "running, or interrupted (the same `experiment run` resumes it)",
    "pending": "waiting for its inputs",
}


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def read_plan(exp_dir: Path) -> dict:
    if not exp_dir.is_dir():
        raise UserError(f"experiment folder {exp_dir} not found; pass the folder `experiment run` wrote (--out/NAME)")
    plan = read_json(exp_dir / "plan.json")
    return plan if plan is not None else {"name": exp_dir.name, "paper": None}


def variant_of(settings: dict) -> tuple:
    """The settings beyond the standard axes (e.g. a sub-grid's ``variant`` name), as a sortable key."""
    return tuple(sorted((k, v) for k, v in settings.items() if k not in STANDARD_SETTINGS and v is not None))


def _tpp_index(tpp_runs: list[dict]) -> dict[tuple, dict]:
    """TPP stages by (dataset of their images, method, pretext, seed, backbone, variant): how the graph shares them."""
    return {_tpp_key(r["settings"], r["settings"].get("dataset")): r for r in tpp_runs}


def _tpp_key(settings: dict, images: str | None) -> tuple:
    keys = ("method", "pretext", "seed", "backbone")
    return (images, *(settings.get(k) for k in keys), variant_of(settings))


def _paper_variant(record: dict, settings: dict, tpp_index: dict[tuple, dict]) -> dict:
    """Values of the settings that tell a paper table's rows apart (``mae_decoder``): from the overrides of the
    evaluate run and of the TPP stage it used."""
    overrides = dict(record.get("overrides") or {})
    tpp = tpp_index.get(_tpp_key(settings, settings.get("source") or settings.get("dataset")))
    if tpp is not None and str(settings.get("init", "")).startswith(("tpp-", "transfer:")):
        overrides.update(tpp.get("overrides") or {})
    return {k: overrides[k] for k in sorted(paper.variant_keys()) if k in overrides}


def _problem(stage: str, folder: Path, status: str, reason: str, record: dict | None = None) -> dict:
    log = (record or {}).get("log") or (str(folder / "log.txt") if (folder / "log.txt").exists() else None)
    return {
        "stage": stage,
        "run_key": folder.name,
        "status": status,
        "reason": reason,
        "log": log,
        "attempts": (record or {}).get("attempts"),
    }


def collect(exp_dir: Path) -> tuple[list[dict], list[dict], dict[tuple, dict], list[dict]]:
    """(evaluated runs, TPP-stage runs, finished fine-tuning runs, problems). An evaluated run is ``{"key",
    "folder", "settings", "variant", "paper_variant", "metrics"}``; a TPP run ``{"key", "folder", "settings",
    "overrides", "status"}``; the fine-tuning runs are ``{"folder", "deps"}`` by :func:`run_index` of their
    settings."""
    evaluated, tpp_runs, problems, done_evaluations, finetunes = [], [], [], [], {}
    for stage in STAGES:
        for folder in sorted((exp_dir / "runs" / stage).glob("*/")):
            record = read_json(folder / "run.json")
            if record is None:
                problems.append(_problem(stage, folder, "unreadable", "run.json missing or not JSON"))
                continue
            status = record.get("status", "?")
            if stage == "pretrain_tpp":
                tpp_runs.append({"key": folder.name, "folder": folder, "settings": record.get("settings") or {},
                                 "overrides": record.get("overrides") or {}, "status": status})  # fmt: skip
            if status != "done":
                reason = STATUS_REASONS.get(status, f"recorded status {status!r}")
                problems.append(_problem(stage, folder, status, reason, record))
            elif stage == "evaluate":
                done_evaluations.append((folder, record))
            elif stage == "finetune":
                settings = record.get("settings") or {}
                finetunes[run_index(settings)] = {"folder": folder, "deps": list(record.get("deps") or [])}
    tpp_index = _tpp_index(tpp_runs)
    for folder, record in done_evaluations:
        try:
            (run,) = load_runs([folder])
        except UserError as exc:
            problems.append(_problem("evaluate", folder, "unreadable", str(exc), record))
            continue
        metrics = {k: float(v) for k, v in run["metrics"].items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}  # fmt: skip
        settings = record.get("settings") or {}
        paper_variant = _paper_variant(record, settings, tpp_index)
        evaluated.append({"key": folder.name, "folder": folder, "settings": settings, "variant": variant_of(settings),
                          "paper_variant": paper_variant, "metrics": metrics})  # fmt: skip
    return evaluated, tpp_runs, finetunes, problems


def run_index(settings: dict) -> tuple:
    """(dataset, method, init, label fraction, variant, seed): how an evaluation finds the fine-tuning it read."""
    s = settings
    return (s.get("dataset"), s.get("method"), s.get("init"), as_fraction(s.get("label_fraction")), variant_of(s),
            s.get("seed"))  # fmt: skip


def not_started(plan: dict, exp_dir: Path) -> list[dict] | None:
    """Runs of the plan's graph (``plan.json``'s ``graph``: key -> stage, folder) without a ``run.json``; None when
    the plan does not list its graph."""
    graph = plan.get("graph")
    if not isinstance(graph, dict):
        return None
    missing = []
    for key, node in graph.items():
        stage = node.get("stage") if isinstance(node, dict) else None
        if stage not in STAGES:
            continue
        folder = exp_dir / "runs" / stage / Path(str(node.get("folder") or key)).name  # the folder may have moved
        if not (folder / "run.json").is_file():
            missing.append({"stage": stage, "run_key": folder.name, "status": "not started", "log": None,
                            "attempts": None, "reason": "no run folder yet"})  # fmt: skip
    return missing


def fraction_order(fraction: float | None) -> tuple:
    return (fraction is None, fraction or 0.0)


def as_fraction(value: object) -> float | None:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
