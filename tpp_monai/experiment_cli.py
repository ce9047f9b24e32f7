"""``python -m tpp_monai experiment {run,plan,status,report} PLAN``: run a grid of bundle workflows.

PLAN is a preset name (``tpp_monai/experiments/presets/``), a YAML/JSON plan file, or (status, report) an experiment
folder. The experiment folder is ``<--out>/<plan name>``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tpp_monai.errors import ConfigError
from tpp_monai.experiments.plan import Plan, load_plan, preset_names


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["run", "plan", "status", "report"],
                        help="run the plan, print its graph, show its runs' state, or write its report")  # fmt: skip
    parser.add_argument("plan", help=f"preset ({', '.join(preset_names())}), plan file, or experiment folder")
    parser.add_argument("--out", default="experiments", help="parent folder of the experiment (default experiments)")
    parser.add_argument("--executor", choices=["local", "slurm"], help="override the plan's executor.kind")
    parser.add_argument("--name", help="experiment name (default: the plan's)")
    parser.add_argument("--datasets", nargs="+", help="override the plan's datasets")
    parser.add_argument("--methods", nargs="+", help="override the plan's methods")
    parser.add_argument("--init", nargs="+", help="override the plan's initialisations")
    parser.add_argument("--label_fractions", nargs="+", type=float, help="override the plan's label fractions")
    parser.add_argument("--seeds", nargs="+", type=int, help="override the plan's seeds")
    parser.add_argument("--no-tracking", dest="tracking", action="store_false", help="do not log to MLflow")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def resolve_plan(args: argparse.Namespace) -> tuple[Plan, Path]:
    """The plan and the parent folder of its experiment (an experiment folder holds its resolved plan.json)."""
    overrides = {k: getattr(args, k, None) for k in ("name", "datasets", "methods", "init", "label_fractions", "seeds")}
    folder = Path(args.plan)
    if folder.is_dir():
        saved = folder / "plan.json"
        if not saved.is_file():
            raise ConfigError(f"{folder} is not an experiment folder (no plan.json); give a preset or plan file")
        data = json.loads(saved.read_text())
        data = {k: v for k, v in data.items() if k not in ("graph", "source")}
        return load_plan(data, **overrides), folder.resolve().parent
    return load_plan(args.plan, **overrides), Path(args.out)


def status_table(graph) -> str:
    from tpp_monai.experiments.executors import node_status, record
    from tpp_monai.experiments.plan import STAGES

    states = {key: node_status(node) for key, node in graph.nodes.items()}
    names = ("done", "running", "failed", "pending")
    lines = [f"experiment {graph.plan.name}: {graph.exp_dir}", f"{'stage':<14}" + "".join(f"{n:>9}" for n in names)]
    for stage in STAGES:
        row = [sum(states[k] == n for k, node in graph.nodes.items() if node.stage == stage) for n in names]
        lines.append(f"{stage:<14}" + "".join(f"{v:>9}" for v in row))
    for key, state in states.items():
        if state in ("failed", "running"):
            rec = record(graph.nodes[key]) or {}
            lines.append(f"{state}: {key} (attempts {rec.get('attempts', 0)}, log {rec.get('log')})")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from tpp_monai.experiments.graph import build_graph, describe

    plan, out = resolve_plan(args)
    graph = build_graph(plan, out)
    if args.action == "plan":
        print(describe(graph))
        return 0
    if args.action == "status":
        print(status_table(graph))
        return 0
    if args.action == "report":
        try:
            from tpp_monai.report.experiment import write_report
        except ImportError as err:
            metrics = graph.exp_dir / "runs" / "evaluate"
            raise ConfigError(f"the experiment report is not available in this installation ({err}); the runs' "
                              f"metrics are in {metrics}/*/metrics.json") from None  # fmt: skip
        result = write_report(graph.exp_dir)
        for key in ("markdown", "report_md", "path"):
            if isinstance(result, dict) and result.get(key):
                print(f"report: {result[key]}")
                break
        else:
            print(f"report written under {graph.exp_dir}")
        return 0
    from tpp_monai.experiments.executors import run_graph
    from tpp_monai.tracking.experiments import default_uri

    if not args.quiet:
        print(describe(graph, folders=False), flush=True)
    uri = default_uri(graph.exp_dir) if args.tracking else None
    outcome = run_graph(graph, args.executor or plan.executor["kind"], uri, progress=not args.quiet)
    print(outcome.summary())
    print(status_table(graph))
    if uri:
        print(f"MLflow: mlflow ui --backend-store-uri {uri}")
    return 0 if outcome.ok else 1
