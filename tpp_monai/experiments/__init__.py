"""Experiments: a plan (grid of datasets x methods x initialisations x label fractions x seeds) run as a graph of
bundle workflows, locally or on SLURM, resumable, tracked in MLflow. ``python -m tpp_monai experiment --help``."""

from __future__ import annotations

from pathlib import Path

from tpp_monai.experiments.plan import Plan, load_plan


def run_experiment(plan: Plan | str | Path, out_dir: str | Path = "experiments", executor: str | None = None,
                   tracking: bool = True, progress: bool = True) -> Path:  # fmt: skip
    """Build the plan's graph under ``out_dir`` and run what is not done yet; returns the experiment folder.

    Raises :class:`tpp_monai.errors.UserError` when a run failed or was skipped (its log is named)."""
    from tpp_monai.errors import UserError
    from tpp_monai.experiments.executors import run_graph
    from tpp_monai.experiments.graph import build_graph
    from tpp_monai.tracking.experiments import default_uri

    plan = plan if isinstance(plan, Plan) else load_plan(plan)
    graph = build_graph(plan, out_dir)
    outcome = run_graph(graph, executor or plan.executor["kind"], default_uri(graph.exp_dir) if tracking else None,
                        progress)  # fmt: skip
    if not outcome.ok:
        raise UserError(f"experiment {plan.name} did not finish:\n{outcome.summary()}")
    return graph.exp_dir


__all__ = ["Plan", "load_plan", "run_experiment"]
