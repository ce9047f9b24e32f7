"""MLflow for experiments: one parent run per experiment, one nested child run per workflow run.

The bundles log their own runs under ``--tracking mlflow`` (MONAI's ``MLFlowHandler``); the orchestrator passes each
run a unique ``run_name``, the experiment's store and name, ``parent_run_id`` and ``run_tags``. A bundle that does
not (yet) turn those two keys into tags and params leaves them unused, so after each run :func:`annotate_child` finds
the child by its run name and sets the parent tag, the tags and the settings params that are still missing (MLflow
params cannot change once logged, so the bundle's own values win).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any  # the experiment graph and its nodes (tpp_monai.experiments.graph), duck-typed: no upward import

from tpp_monai.io import write_json_atomic
from tpp_monai.tracking.runs import file_sha256

PARENT_FILE = "mlflow_parent.json"


def default_uri(exp_dir: Path) -> str:
    return f"sqlite:///{Path(exp_dir).resolve() / 'mlruns.db'}"


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _experiment_id(client, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)


def start_parent(graph: Any, uri: str) -> str:
    """The experiment's parent run: created once, its id kept in ``<exp>/mlflow_parent.json`` and reused on resume."""
    client = _client(uri)
    path = graph.exp_dir / PARENT_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("tracking_uri") == uri:
            try:
                client.update_run(saved["run_id"], status="RUNNING")
                return saved["run_id"]
            except Exception:  # the store was deleted or replaced: start a new parent
                pass
    plan = graph.plan
    tags = {"stage": "experiment", "experiment": plan.name, "paper": str(plan.paper)}
    run = client.create_run(_experiment_id(client, plan.name), run_name=f"experiment__{plan.name}", tags=tags)
    client.log_param(run.info.run_id, "plan", plan.source or "inline")
    client.log_param(run.info.run_id, "runs", len(graph.nodes))
    client.log_dict(run.info.run_id, plan.to_dict(), "plan.json")
    graph.exp_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"run_id": run.info.run_id, "tracking_uri": uri, "experiment_name": plan.name})
    return run.info.run_id


def end_parent(uri: str, run_id: str, ok: bool) -> None:
    _client(uri).set_terminated(run_id, status="FINISHED" if ok else "FAILED")


def run_tags(node: Any, graph: Any) -> dict[str, str]:
    settings = node.settings
    tags = {"experiment": graph.plan.name, "stage": node.stage, "bundle": node.bundle, "run_key": node.folder.name,
            "init": settings["init"]}  # fmt: skip
    if settings.get("variant"):
        tags["variant"] = str(settings["variant"])
    return tags


def child_overrides(node: Any, graph: Any, uri: str, parent_id: str) -> dict:
    """The overrides that make a bundle run a child of the parent run."""
    return {"tracking": "mlflow", "tracking_uri": uri, "experiment_name": graph.plan.name,
            "run_name": node.run_name, "parent_run_id": parent_id, "run_tags": run_tags(node, graph)}  # fmt: skip


RECIPE_KEYS = ("backbone", "backbone_ckpt", "method_options", "lr", "batch_size", "iterations", "tpp_epochs",
               "epochs", "image_size", "pretext_size", "mae_decoder")  # fmt: skip


def _sha256(path: object) -> str | None:
    """The file's digest as the bundles log it (:func:`~tpp_monai.tracking.runs.file_sha256`), ``None`` for none."""

    digest = file_sha256(path) if isinstance(path, str) else "none"
    return None if digest == "none" else digest


def _params(node: Any, graph: Any) -> dict[str, object]:
    """The run's settings, and the recipe values of the config it executed (MONAI's ``config_<time>.json`` in the
    run folder; expressions are left out), with the digests of the backbone and TPP files it read."""
    params = {k: node.settings[k] for k in ("dataset", "method", "init", "pretext", "source", "label_fraction",
                                            "seed", "variant")}  # fmt: skip
    executed = sorted(node.folder.glob("config_*.json"))
    config = json.loads(executed[-1].read_text()) if executed else {}
    for key in RECIPE_KEYS:
        value = node.overrides.get(key, config.get(key))
        if value is not None and not (isinstance(value, str) and value[:1] in "$@%"):
            params[key] = value
    params["backbone_ckpt_sha256"] = _sha256(params.get("backbone_ckpt"))
    if node.stage == "finetune" and node.deps:
        params["tpp_ckpt_sha256"] = _sha256(str(graph.nodes[node.deps[0]].product))
    return {k: v for k, v in params.items() if v is not None}


def annotate_child(node: Any, graph: Any, uri: str, parent_id: str) -> str | None:
    """Tag the node's child run (found by its unique run name) as a child of the parent; log missing params and the
    run's record as an artifact. Returns the child's run id, or ``None`` when the bundle logged no run."""
    from mlflow.entities import Param, RunTag

    client = _client(uri)
    experiment = client.get_experiment_by_name(graph.plan.name)
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{node.run_name}'")
    if not runs:
        return None
    child = runs[0]
    have = child.data.params
    params = [Param(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v))
              for k, v in _params(node, graph).items() if k not in have]  # fmt: skip
    tags = [RunTag("mlflow.parentRunId", parent_id), *(RunTag(k, v) for k, v in run_tags(node, graph).items())]
    tags.append(RunTag("settings_digest", node.digest))
    client.log_batch(child.info.run_id, params=params, tags=tags)
    for name in ("run.json", "settings.json", "history.csv", "metrics.json"):  # what the run left, where present
        if (node.folder / name).is_file():
            client.log_artifact(child.info.run_id, str(node.folder / name))
    return child.info.run_id
