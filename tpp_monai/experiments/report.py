"""``experiment report``: an experiment folder -> the paper's table layout, the TPP gain with its interval, plots.

Reads ``<exp_dir>/plan.json`` and every ``runs/<stage>/<run_key>/run.json`` (the layout of
``experiments-contract.md``). Evaluated runs (status ``done`` with a readable ``metrics.json``) are grouped by
(dataset, method, init, label fraction); each group gives mean ± sample std over its seeds. Every non-random
initialisation is paired with ``random`` on the same (dataset, method, label fraction, seed) and summarised by
:mod:`tpp_monai.experiments.stats` (gain, paired bootstrap 95 % interval, wins, a verdict in words). When the plan's
``paper`` field names a transcribed table, the paper's numbers stand under ours. Runs that are missing, unfinished,
failed or unreadable are listed, never fatal.

Writes ``<exp_dir>/report/`` (or ``out_dir``): ``report.md``, ``report.json``, ``gain_<method>.png``,
``fractions_<dataset>_<method>.png`` when several label fractions exist, and ``tpp_loss.png`` from the TPP stage's
``history.csv``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote

import numpy as np

from tpp_monai.errors import UserError
from tpp_monai.experiments import convergence, paper, stats
from tpp_monai.report import HIGHER_IS_BETTER, METRICS, load_runs, markdown_table

STAGES = ("pretrain_tpp", "finetune", "evaluate")
STANDARD_SETTINGS = ("dataset", "method", "init", "pretext", "source", "label_fraction", "seed", "backbone")
STATUS_REASONS = {
    "failed": "failed; see its log",
    "running": "running, or interrupted (the same `experiment run` resumes it)",
    "pending": "waiting for its inputs",
}
PLOT_PATTERNS = ("gain_*.png", "convergence_*.png", "fractions_*.png", "tpp_loss.png")
MAX_LISTED = 40  # report.md lists this many missing runs; report.json lists all
LOSS_COLUMNS = ("pretext_loss", "loss", "train_loss")  # first one present in a TPP history.csv is plotted
COST_FILE = "init_cost.json"  # in the run folder that paid the initialisation (the TPP stage's, or the finetune's)
COST_FORMAT = ('{"kind": "tpp" | "peft-eva" | ..., "seconds": float, "peak_memory_mib": float or null, '
               '"memory_kind": "cuda_max_allocated" | "process_max_rss", "device": "cpu" | "cuda"}')  # fmt: skip
GroupKey = tuple  # (dataset, method, init, label_fraction, variant) with variant a sorted tuple of (key, value)


# ---------------------------------------------------------------------------------------------------------------
# Reading the experiment folder


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _read_plan(exp_dir: Path) -> dict:
    if not exp_dir.is_dir():
        raise UserError(f"experiment folder {exp_dir} not found; pass the folder `experiment run` wrote (--out/NAME)")
    plan = _read_json(exp_dir / "plan.json")
    return plan if plan is not None else {"name": exp_dir.name, "paper": None}


def _variant(settings: dict) -> tuple:
    """The settings beyond the standard axes (e.g. a sub-grid's ``variant`` name), as a sortable key."""
    return tuple(sorted((k, v) for k, v in settings.items() if k not in STANDARD_SETTINGS and v is not None))


def _tpp_index(tpp_runs: list[dict]) -> dict[tuple, dict]:
    """TPP stages by (dataset of their images, method, pretext, seed, backbone, variant): how the graph shares them."""
    return {_tpp_key(r["settings"], r["settings"].get("dataset")): r for r in tpp_runs}


def _tpp_key(settings: dict, images: str | None) -> tuple:
    keys = ("method", "pretext", "seed", "backbone")
    return (images, *(settings.get(k) for k in keys), _variant(settings))


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
    "overrides", "status"}``; the fine-tuning runs are ``{"folder", "deps"}`` by :func:`_run_index` of their
    settings."""
    evaluated, tpp_runs, problems, done_evaluations, finetunes = [], [], [], [], {}
    for stage in STAGES:
        for folder in sorted((exp_dir / "runs" / stage).glob("*/")):
            record = _read_json(folder / "run.json")
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
                finetunes[_run_index(settings)] = {"folder": folder, "deps": list(record.get("deps") or [])}
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
        evaluated.append({"key": folder.name, "folder": folder, "settings": settings, "variant": _variant(settings),
                          "paper_variant": paper_variant, "metrics": metrics})  # fmt: skip
    return evaluated, tpp_runs, finetunes, problems


def _run_index(settings: dict) -> tuple:
    """(dataset, method, init, label fraction, variant, seed): how an evaluation finds the fine-tuning it read."""
    s = settings
    return (s.get("dataset"), s.get("method"), s.get("init"), _fraction(s.get("label_fraction")), _variant(s),
            s.get("seed"))  # fmt: skip


def _not_started(plan: dict, exp_dir: Path) -> list[dict] | None:
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


def _fraction_order(fraction: float | None) -> tuple:
    return (fraction is None, fraction or 0.0)


def _fraction(value: object) -> float | None:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------------------
# Statistics


def _ordered(values: Iterable, preferred: list | None) -> list:
    values = list(dict.fromkeys(values))
    order = {v: i for i, v in enumerate(preferred or [])}
    return sorted(values, key=lambda v: (order.get(v, len(order)), str(v)))


# names a plan may use for a metric -> the key the evaluate workflow writes into metrics.json
METRIC_ALIASES = {"accuracy": "acc", "hd": "hd95", "dice_mean": "mean_dice", "dice_organ": "organ_dice",
                  "dice_tumour": "tumour_dice", "dice_tumor": "tumour_dice", "tumor_dice": "tumour_dice"}  # fmt: skip


def _columns(runs: list[dict], plan: dict, notes: list[str]) -> list[tuple[str, str]]:
    """(dataset, metric) pairs in the paper's order: the plan's datasets, each with the plan's metrics that its task
    has (all of the task's metrics when the plan names none of them)."""
    from tpp_monai.data.info import DATASETS

    wanted = [METRIC_ALIASES.get(m, m) for m in plan.get("metrics") or []]
    known = {m for ms in METRICS.values() for m in ms}
    unknown = [m for m, w in zip(plan.get("metrics") or [], wanted) if w not in known]
    if unknown:
        notes.append(f"plan metrics {', '.join(unknown)} are not keys of metrics.json ({', '.join(sorted(known))}); "
                     "ignored")  # fmt: skip
    columns = []
    for dataset in _ordered((r["settings"].get("dataset") for r in runs), plan.get("datasets")):
        present = {m for r in runs if r["settings"].get("dataset") == dataset for m in r["metrics"]}
        task_metrics = list(METRICS[DATASETS[dataset].task]) if dataset in DATASETS else sorted(present)
        chosen = [m for m in task_metrics if m in wanted] or task_metrics
        columns += [(dataset, m) for m in chosen if m in present]
    return columns


def _seed_order(seed: object) -> tuple:
    return (0, seed, "") if isinstance(seed, (int, float)) else (1, 0, str(seed))


def _groups(runs: list[dict]) -> dict[GroupKey, dict]:
    """Group key -> {"by_seed": {seed: metrics}, "paper_variant": {...}}."""
    groups: dict[GroupKey, dict] = {}
    for r in runs:
        s = r["settings"]
        key = (s.get("dataset"), s.get("method"), s.get("init"), _fraction(s.get("label_fraction")), r["variant"])
        group = groups.setdefault(key, {"by_seed": {}, "paper_variant": r["paper_variant"],
                                        "backbone": s.get("backbone")})  # fmt: skip
        group["by_seed"][s.get("seed")] = r["metrics"]
    return groups


def _group_stats(groups: dict[GroupKey, dict], columns: list[tuple[str, str]], tables: list[str]) -> list[dict]:
    out = []
    for (dataset, method, init, fraction, variant), group in groups.items():
        by_seed = group["by_seed"]
        for d, metric in columns:
            if d != dataset:
                continue
            seeds = sorted((s for s in by_seed if metric in by_seed[s]), key=_seed_order)
            if not seeds:
                continue
            values = [by_seed[s][metric] for s in seeds]
            mean, std = stats.mean_std(values)
            cell = None
            if fraction == 1.0:  # the paper's tables are all at full labels
                cell = paper.paper_cell(tables, dataset, metric, method, init, group["paper_variant"])
            out.append({"dataset": dataset, "method": method, "init": init, "label_fraction": fraction,
                        "variant": dict(variant), "paper_variant": group["paper_variant"], "metric": metric,
                        "n": len(values), "mean": mean, "std": std, "seeds": seeds, "values": values,
                        "paper": cell})  # fmt: skip
    return out


def _random_partner(groups: dict[GroupKey, dict], key: GroupKey) -> GroupKey | None:
    """The key of the random-initialisation group a group is paired with: the same variant, else the one without
    a variant (a variant of the TPP stage, e.g. its MAE decoder, does not change a run without TPP)."""
    dataset, method, _, fraction, variant = key
    for partner in ((dataset, method, "random", fraction, variant), (dataset, method, "random", fraction, ())):
        if partner in groups:
            return partner
    return None


class _Runs:
    """The finished fine-tuning runs of an experiment, with their histories and init costs read once."""

    def __init__(self, exp_dir: Path, finetunes: dict[tuple, dict]):
        self.exp_dir, self.finetunes = exp_dir, finetunes
        self._histories: dict[Path, dict | None] = {}
        self.curves: dict[tuple, dict] = {}  # convergence key -> per-arm per-seed curves, for the plots

    def finetune(self, key: GroupKey, seed: object) -> dict | None:
        dataset, method, init, fraction, variant = key
        return self.finetunes.get((dataset, method, init, fraction, variant, seed))

    def history(self, key: GroupKey, seed: object) -> dict | None:
        run = self.finetune(key, seed)
        if run is None:
            return None
        if run["folder"] not in self._histories:
            self._histories[run["folder"]] = convergence.read_history_file(run["folder"])
        return self._histories[run["folder"]]

    def cost_files(self, key: GroupKey, seed: object) -> list[Path] | None:
        """The ``init_cost.json`` files of one fine-tuning run: its own folder's and those of the runs it needed
        (the TPP stage); None without a finished fine-tuning run."""
        run = self.finetune(key, seed)
        if run is None:
            return None
        folders = [run["folder"], *(self.exp_dir / "runs" / dep for dep in run["deps"])]
        return [f / COST_FILE for f in folders if (f / COST_FILE).is_file()]


def _convergence(runs: _Runs, key: GroupKey, partner: GroupKey, metric: str, seeds: list) -> dict | None:
    """The convergence entry (:mod:`tpp_monai.experiments.convergence`) of a comparison on its paired ``seeds``;
    seeds without a fine-tuning history in an arm are named in ``missing_history``. None without any history."""
    init = key[2]
    histories = {s: (runs.history(partner, s), runs.history(key, s)) for s in seeds}
    with_both = [s for s in seeds if None not in histories[s]]
    column = convergence.validation_column([h for s in with_both for h in histories[s]], metric)
    if column is None:
        return None
    cache = (key, partner, column, tuple(with_both))
    if cache not in runs.curves:
        curves = {"random": {s: convergence.read_curve(histories[s][0], column) for s in with_both},
                  init: {s: convergence.read_curve(histories[s][1], column) for s in with_both}}  # fmt: skip
        compared = convergence.compare(init, column, curves["random"], curves[init])
        runs.curves[cache] = {"curves": curves, "convergence": compared}
    entry = dict(runs.curves[cache]["convergence"])
    entry["missing_history"] = [s for s in seeds if s not in with_both]
    return entry


def _read_cost(path: Path) -> dict | None:
    record = _read_json(path)
    if record is None or not isinstance(record.get("seconds"), (int, float)):
        return None
    return record


def _cost(runs: _Runs, key: GroupKey, seeds: list) -> dict:
    """What the initialisation of one arm cost, over its seeds, from the ``init_cost.json`` files its runs left
    (format: :data:`COST_FORMAT`): per seed the sum of the seconds and the largest peak of its files; mean over
    the seeds with a file. ``random`` without a file costs 0; another init without one is ``not recorded``."""
    per_seed, kinds, memory_kinds, devices = [], [], [], []
    for seed in seeds:
        records = [r for r in (_read_cost(f) for f in runs.cost_files(key, seed) or []) if r is not None]
        if not records:
            per_seed.append(None)
            continue
        peaks = [r.get("peak_memory_mib") for r in records]
        peak = max(peaks) if all(isinstance(m, (int, float)) for m in peaks) else None
        per_seed.append({"seconds": float(sum(r["seconds"] for r in records)), "peak_memory_mib": peak})
        kinds += [r.get("kind") for r in records]
        memory_kinds += [r.get("memory_kind") for r in records]
        devices += [r.get("device") for r in records]
    recorded = [c for c in per_seed if c is not None]
    out = {"seconds": None, "peak_memory_mib": None, "recorded": len(recorded), "runs": len(seeds),
           "per_seed": per_seed, "kinds": list(dict.fromkeys(kinds)), "memory_kind": list(dict.fromkeys(memory_kinds)),
           "device": list(dict.fromkeys(devices))}  # fmt: skip
    if recorded:
        out["seconds"] = float(np.mean([c["seconds"] for c in recorded]))
        peaks = [c["peak_memory_mib"] for c in recorded if c["peak_memory_mib"] is not None]
        out["peak_memory_mib"] = float(np.mean(peaks)) if peaks else None
        out["status"] = "recorded" if len(recorded) == len(seeds) else "partly recorded"
    elif key[2] == "random":
        out.update(seconds=0.0, peak_memory_mib=0.0, status="nothing to pay (random initialisation)")
    else:
        out["status"] = "not recorded"
    return out


def _gains(groups: dict[GroupKey, dict], columns: list[tuple[str, str]], plan: dict, runs: _Runs,
           refs: list[str]) -> list[dict]:  # fmt: skip
    """One entry per (dataset, method, label fraction, metric, non-random init): the paired gain over random with
    the paper's gain, the detectable effect, the verdict (:func:`tpp_monai.experiments.stats.summarise_gain`),
    convergence and each arm's initialisation cost."""
    out = []
    for key, group in groups.items():
        dataset, method, init, fraction, variant = key
        partner = _random_partner(groups, key) if init != "random" else None
        if partner is None:
            continue
        tpp_by_seed, random_by_seed = group["by_seed"], groups[partner]["by_seed"]
        for d, metric in columns:
            if d != dataset:
                continue
            seeds = sorted(
                (s for s in tpp_by_seed if metric in tpp_by_seed[s] and metric in random_by_seed.get(s, {})),
                key=_seed_order,
            )
            if not seeds:
                continue
            higher = HIGHER_IS_BETTER.get(metric, True)
            source = paper.paper_gain(dataset, metric, method, init, group["paper_variant"], higher, refs,
                                      group["backbone"])  # fmt: skip
            summary = stats.summarise_gain(metric, seeds, [tpp_by_seed[s][metric] for s in seeds],
                                           [random_by_seed[s][metric] for s in seeds], higher, init,
                                           source["value"] if source else None, source)  # fmt: skip
            out.append({"dataset": dataset, "method": method, "init": init, "label_fraction": fraction,
                        "variant": dict(variant), **summary.as_dict(),
                        "convergence": _convergence(runs, key, partner, metric, seeds),
                        "cost": {"random": _cost(runs, partner, seeds), init: _cost(runs, key, seeds)}})  # fmt: skip
    column_order = {c: i for i, c in enumerate(columns)}
    methods = _ordered((g["method"] for g in out), plan.get("methods"))
    inits = _ordered((g["init"] for g in out), plan.get("init"))
    datasets = list(dict.fromkeys(d for d, _ in columns))
    out.sort(
        key=lambda g: (
            datasets.index(g["dataset"]),
            methods.index(g["method"]),
            inits.index(g["init"]),
            str(g["variant"]),
            _fraction_order(g["label_fraction"]),
            column_order[(g["dataset"], g["metric"])],
        )
    )
    return out


# ---------------------------------------------------------------------------------------------------------------
# Text


def _fmt(mean: float, std: float | None, n: int) -> str:
    return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "") + f" (n={n})"


def _row_label(init: str, variant: dict) -> str:
    return init + "".join(f", {k}={v}" for k, v in variant.items())


def _results_tables(records: list[dict], columns: list[tuple[str, str]], plan: dict) -> list[str]:
    lines = []
    header = ["method", "init", *[f"{d} {stats.metric_name(m)}" for d, m in columns]]
    fractions = sorted({r["label_fraction"] for r in records}, key=_fraction_order)
    for fraction in fractions:
        at = [r for r in records if r["label_fraction"] == fraction]
        cells = {(r["method"], r["init"], tuple(r["variant"].items()), r["dataset"], r["metric"]): r for r in at}
        rows_keys = _ordered(((r["method"], r["init"], tuple(r["variant"].items())) for r in at), None)
        method_order, init_order = plan.get("methods") or [], plan.get("init") or []
        rows_keys.sort(
            key=lambda k: (
                method_order.index(k[0]) if k[0] in method_order else len(method_order),
                k[0],
                init_order.index(k[1]) if k[1] in init_order else len(init_order),
                k[1],
                k[2],
            )
        )
        rows = []
        for method, init, variant in rows_keys:
            got = [cells.get((method, init, variant, d, m)) for d, m in columns]
            rows.append(
                [
                    method,
                    _row_label(init, dict(variant)),
                    *[_fmt(c["mean"], c["std"], c["n"]) if c else "-" for c in got],
                ]
            )
            papers = [c["paper"] if c else None for c in got]
            if any(papers):
                tables = ", ".join(dict.fromkeys(p["table"] for p in papers if p))
                labels = " / ".join(dict.fromkeys(p["label"] for p in papers if p))
                rows.append([f"↳ paper, {tables}", labels, *[f"{p['value']:.2f}" if p else "-" for p in papers]])
        lines += [f"### Label fraction {fraction}", "", markdown_table(header, rows), ""]
    return lines


def _where(g: dict) -> str:
    return f"{g['dataset']} {g['method']} {_row_label(g['init'], g['variant'])}, label fraction {g['label_fraction']}"


def _interval_text(g: dict) -> str:
    ci = g["ci95"]
    return f"{g['gain_mean']:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else " (1 seed)")


def _paper_text(g: dict) -> str:
    if g["paper_gain"] is None:
        return "-"
    return f"{g['paper_gain']:+.2f} ({g['paper_gain_source']['table']})"


def cost_text(cost: dict) -> str:
    """``12.3 s, peak 456 MiB (process_max_rss, cpu)``, ``0 s (random)`` or ``not recorded``."""
    if cost["seconds"] is None:
        return "not recorded"
    if not cost["kinds"]:
        return "0 s (random)"
    peak = f", peak {cost['peak_memory_mib']:.0f} MiB" if cost["peak_memory_mib"] is not None else ""
    where = ", ".join(str(x) for x in [*cost["memory_kind"], *cost["device"]] if x)
    part = f", {cost['recorded']}/{cost['runs']} seeds recorded" if cost["recorded"] < cost["runs"] else ""
    return f"{cost['seconds']:.1f} s{peak} ({where}{part})"


def _gain_section(gains: list[dict]) -> list[str]:
    lines = [
        "## Gain of each initialisation over random (paired over seeds)",
        "",
        f"Gain per seed = the initialisation's value minus random's on the same seed (random minus the "
        f"initialisation's for HD95), so positive means the initialisation did better. 95 % interval: paired "
        f"bootstrap over seeds, {stats.BOOTSTRAP_RESAMPLES} resamples, percentile method, RNG seed "
        f"{stats.BOOTSTRAP_SEED} (scipy.stats.bootstrap); with few seeds it cannot extend beyond the observed "
        f"per-seed gains. Paper's gain: the paper's row with the initialisation minus its row without (all at full "
        f"labels). Detectable effect: {stats.DETECTABLE_EFFECT}. Seeds needed: the smallest n whose detectable "
        f"effect at the observed spread is at most the paper's gain. Cost: the initialisation's wall seconds and "
        f"peak memory (mean over seeds) from `{COST_FILE}` in the run folder that paid it.",
        "",
        "Verdict cases: " + "; ".join(f"`{k}`: {v}" for k, v in stats.VERDICT_CASES.items()) + ".",
        "",
    ]
    if not gains:
        return [*lines, "No pair of runs of a non-random initialisation and random on the same seed yet.", ""]
    header = ["dataset", "method", "init", "label fraction", "metric", "random", "init value", "gain [95 % CI]",
              "paper's gain", "detectable effect", "seeds needed", "verdict", "init cost"]  # fmt: skip
    rows = [
        [g["dataset"], g["method"], _row_label(g["init"], g["variant"]), str(g["label_fraction"]),
         stats.metric_name(g["metric"]), _fmt(g["mean_random"], g["std_random"], g["n_seeds"]),
         _fmt(g["mean_tpp"], g["std_tpp"], g["n_seeds"]), _interval_text(g), _paper_text(g),
         "-" if g["detectable_effect"] is None else f"{g['detectable_effect']:.2f}",
         "-" if g["seeds_needed"] is None else str(g["seeds_needed"]), g["verdict"]["case"],
         cost_text(g["cost"][g["init"]])]
        for g in gains
    ]  # fmt: skip
    lines += [markdown_table(header, rows), "", "Verdicts:", ""]
    lines += [f"- {_where(g)}, {stats.metric_name(g['metric'])}: {g['verdict']['text']}" for g in gains]
    return [*lines, ""]


def _convergence_section(gains: list[dict]) -> list[str]:
    lines = ["## Convergence: iterations to the target", ""]
    lines += [f"Target: {100 * convergence.TARGET_SHARE:g} % of the random arm's mean best validation value (the "
              "mean best divided by the share for a distance), read from each fine-tuning run's `history.csv`; "
              "iterations (and `elapsed_s` seconds) at the first validation at or beyond it, null where a run never "
              "got there (never dropped). Ratio: geometric mean over the seeds where both arms reached it of "
              "init / random iterations, with a percentile bootstrap 95 % interval; below 1 the initialisation got "
              "there sooner. Where validation computes only the model-selection metric, that column is used.",
              ""]  # fmt: skip
    shown = {}
    for g in gains:  # metrics validated on the same column share one convergence entry
        conv = g["convergence"]
        key = (_where(g), conv["metric"] if conv else g["metric"])
        shown.setdefault(key, g)
    if not shown:
        return [*lines, "No comparison yet.", ""]
    rows = []
    for (where, column), g in shown.items():
        conv = g["convergence"]
        if conv is None:
            rows.append([where, column, "-", "no fine-tuning history.csv", "", "", "", "", ""])
            continue
        s = conv["summary"]
        ci = conv["ratio_ci"]
        ratio = "-" if conv["ratio"] is None else f"{conv['ratio']:.2f}"
        ratio += f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci and conv["ratio"] is not None else ""
        arms = [convergence.mean_text(s[a]["iterations"]) for a in ("random", g["init"])]
        secs = [convergence.mean_text(s[a]["seconds"], " s", 1) if conv["seconds_recorded"] else "-"
                for a in ("random", g["init"])]  # fmt: skip
        rows.append([where, convergence.column_name(column), f"{conv['target']:.2f}", *arms, ratio, *secs,
                     ", ".join(map(str, conv["missing_history"])) or "-"])  # fmt: skip
    header = ["comparison", "validation metric", "target", "iterations, random", "iterations, init",
              "ratio init/random [95 % CI]", "seconds, random", "seconds, init", "seeds without history"]  # fmt: skip
    return [*lines, markdown_table(header, rows), ""]


def _markdown(result: dict, columns: list[tuple[str, str]], plan: dict) -> str:
    lines = [f"# Experiment `{result['experiment']}`", ""]
    if result["paper"]:
        lines += [f"Reproduces: {result['paper']}.", ""]
    lines += [f"Test-set metrics in percent (HD95 in pixels): mean ± {stats.STD_KIND}, n = number of seeds.", ""]
    for note in result["notes"]:
        lines += [f"- {note}"]
    lines += ["", "## Results (the paper's layout: rows = method x initialisation, columns = dataset x metric)", ""]
    if result["groups"]:
        lines += _results_tables(result["groups"], columns, plan)
    else:
        lines += ["No evaluated run yet.", ""]
    lines += _gain_section(result["gain"])
    lines += _convergence_section(result["gain"])
    plots = result["plots"]
    for title, prefix in (("Gain plots", "gain_"), ("Convergence plots", "convergence_"),
                          ("Label-fraction curves", "fractions_")):  # fmt: skip
        mine = [p for p in plots if Path(p).name.startswith(prefix)]
        if mine:
            lines += [f"## {title}", ""] + [f"![{Path(p).stem}]({quote(Path(p).name)})" for p in mine] + [""]
    lines += ["## TPP stage: pretext loss", ""]
    if result["tpp_loss_curves"]:
        rows = [
            [
                c["run_key"],
                str(c["epochs"]),
                f"{c['first']:.4f}",
                f"{c['last']:.4f}",
                f"{c['min']:.4f}",
                "falls" if c["falls"] else "does not fall",
            ]
            for c in result["tpp_loss_curves"]
        ]
        lines += [
            markdown_table(["TPP run", "epochs", "first", "last", "min", "last vs first"], rows),
            "",
            "![tpp_loss](tpp_loss.png)",
            "",
        ]
    else:
        lines += ["No TPP stage history.csv found.", ""]
    lines += ["## Missing, unfinished or failed runs", ""]
    if result["missing"]:
        shown = result["missing"][:MAX_LISTED]
        lines += [
            f"- {p['stage']} `{p['run_key']}`: {p['status']}: {p['reason']}"
            + (f" (log: {p['log']})" if p["log"] else "")
            for p in shown
        ]
        if len(result["missing"]) > len(shown):
            lines.append(f"- ... and {len(result['missing']) - len(shown)} more (report.json lists every one)")
    else:
        lines += ["None: every run of the plan finished."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Plots


def _file_part(name: str) -> str:
    """A name as part of a file name: letters, digits, ``_``, ``.`` and ``-`` kept (``peft.lora`` stays)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(name))


def _plot_convergence(gains: list[dict], runs: _Runs, out: Path) -> list[Path]:
    """``convergence_<method>.png``: one axis per comparison (dataset, init, label fraction, validation column)."""
    written = []
    for method in dict.fromkeys(g["method"] for g in gains):
        panels, seen = [], set()
        for g in gains:
            conv = g["convergence"]
            if g["method"] != method or conv is None:
                continue
            key = (_where(g), conv["metric"])
            if key in seen:
                continue
            seen.add(key)
            plain = {k: v for k, v in conv.items() if k != "missing_history"}
            cached = next(c for c in runs.curves.values() if c["convergence"] == plain)
            title = f"{g['dataset']} {_row_label(g['init'], g['variant'])}, label fraction {g['label_fraction']}"
            panels.append({"title": title, "init": g["init"], "convergence": conv, "curves": cached["curves"]})
        path = convergence.plot(panels, out / f"convergence_{_file_part(method)}.png", method)
        if path is not None:
            written.append(path)
    return written


def _interval_colour(ci95: list | None) -> str:
    if not ci95:
        return "tab:gray"
    return "tab:green" if ci95[0] > 0 else "tab:red" if ci95[1] < 0 else "tab:gray"


def _plot_gains(gains: list[dict], out: Path) -> list[Path]:
    """One figure per method, one axis per metric: mean gain with its 95 % interval, and each seed's gain."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    written = []
    for method in dict.fromkeys(g["method"] for g in gains):
        mine = [g for g in gains if g["method"] == method]
        metrics = list(dict.fromkeys(g["metric"] for g in mine))
        several_inits = len({(g["init"], tuple(g["variant"].items())) for g in mine}) > 1
        several_fractions = len({g["label_fraction"] for g in mine}) > 1
        widest = max(sum(g["metric"] == m for g in mine) for m in metrics)
        width = max(3.4, 1.2 * widest + 1.4) * len(metrics)
        ncol = 4 if width >= 10 else 2  # legend entries per row below the axes
        fig, axes = plt.subplots(1, len(metrics), figsize=(max(width, 5.5), 4.4 if ncol == 4 else 4.8))
        for ax, metric in zip(np.atleast_1d(axes), metrics):
            entries = [g for g in mine if g["metric"] == metric]
            for x, g in enumerate(entries):
                if g["ci95"]:
                    low, high = g["ci95"]
                    yerr = [[g["gain_mean"] - low], [high - g["gain_mean"]]]
                    colour = _interval_colour(g["ci95"])
                    ax.errorbar([x], [g["gain_mean"]], yerr=yerr, fmt="o", color=colour, capsize=5, ms=7)
                else:
                    ax.plot([x], [g["gain_mean"]], "o", color="tab:gray", markerfacecolor="white", ms=7)
                offsets = np.linspace(-0.3, -0.14, len(g["seed_gains"]))  # the seeds left of the mean, never under it
                ax.plot(x + offsets, g["seed_gains"], "x", color="black", alpha=0.6, ms=5)
                if g["paper_gain"] is not None:  # right of the mean
                    ax.plot([x + 0.2], [g["paper_gain"]], "D", color="tab:purple", ms=6)
            labels = [
                g["dataset"]
                + (f"\n{_row_label(g['init'], g['variant'])}" if several_inits else "")
                + (f"\nfraction {g['label_fraction']}" if several_fractions else "")
                for g in entries
            ]
            ax.set_xticks(range(len(entries)), labels, fontsize=8)
            ax.set_xlim(-0.6, len(entries) - 0.4)
            ax.axhline(0, color="black", lw=0.8)
            unit = "px, random − init" if metric == "hd95" else "points, init − random"
            ax.set_title(f"{stats.metric_name(metric)} gain ({unit})", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
        np.atleast_1d(axes)[0].set_ylabel("gain (positive = the init did better)")
        handles = [
            Line2D([], [], marker="x", color="black", alpha=0.6, linestyle="", label="one seed"),
            *[
                Line2D([], [], marker="o", color=c, linestyle="-", label=f"mean, 95 % CI {w}")
                for c, w in (("tab:green", "above 0"), ("tab:gray", "contains 0"), ("tab:red", "below 0"))
            ],
        ]
        if any(g["paper_gain"] is not None for g in mine):
            handles.append(Line2D([], [], marker="D", color="tab:purple", linestyle="",
                                  label="paper's gain (full labels)"))  # fmt: skip
        if any(g["ci95"] is None for g in mine):
            handles.append(Line2D([], [], marker="o", color="tab:gray", markerfacecolor="white", linestyle="",
                                  label="mean of 1 seed (no interval)"))  # fmt: skip
        fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
        fig.suptitle(f"{method}: gain over random initialisation", fontsize=11)
        fig.tight_layout(rect=(0, 0.07 if ncol == 4 else 0.13, 1, 1))
        path = out / f"gain_{_file_part(method)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _plot_fractions(records: list[dict], gains: list[dict], out: Path) -> list[Path]:
    """Per (dataset, method) with several label fractions, one column per metric: top, the metric vs the label
    fraction, one line per initialisation (mean ± std over seeds); bottom, each initialisation's paired gain over
    random with its 95 % interval, and the paper's gain (its tables are at full labels) as a star at fraction 1."""
    import matplotlib.pyplot as plt

    written = []
    for dataset, method in dict.fromkeys((r["dataset"], r["method"]) for r in records):
        mine = [r for r in records if r["dataset"] == dataset and r["method"] == method]
        if len({r["label_fraction"] for r in mine}) < 2:
            continue
        metrics = list(dict.fromkeys(r["metric"] for r in mine))
        fig, axes = plt.subplots(2, len(metrics), figsize=(4.4 * len(metrics), 7.2), squeeze=False)
        for col, metric in enumerate(metrics):
            ax, gain_ax = axes[0][col], axes[1][col]
            for init, variant in dict.fromkeys((r["init"], tuple(r["variant"].items())) for r in mine):
                line = sorted(
                    (
                        r
                        for r in mine
                        if r["metric"] == metric and r["init"] == init and tuple(r["variant"].items()) == variant
                    ),
                    key=lambda r: r["label_fraction"],
                )
                ax.errorbar(
                    [r["label_fraction"] for r in line],
                    [r["mean"] for r in line],
                    yerr=[r["std"] or 0.0 for r in line],
                    marker="o",
                    capsize=4,
                    linestyle="--" if init == "random" else "-",
                    label=_row_label(init, dict(variant)),
                )
                cells = sorted(
                    (
                        g
                        for g in gains
                        if (g["dataset"], g["method"], g["metric"], g["init"]) == (dataset, method, metric, init)
                        and tuple(g["variant"].items()) == variant
                        and isinstance(g["label_fraction"], (int, float))
                    ),
                    key=lambda g: g["label_fraction"],
                )
                if not cells:
                    continue
                x = [g["label_fraction"] for g in cells]
                y = [g["gain_mean"] for g in cells]
                low = [g["gain_mean"] - g["ci95"][0] if g["ci95"] else 0.0 for g in cells]
                high = [g["ci95"][1] - g["gain_mean"] if g["ci95"] else 0.0 for g in cells]
                bars = gain_ax.errorbar(x, y, yerr=[low, high], marker="o", capsize=4,
                                        label=f"{_row_label(init, dict(variant))} - random [95 % CI]")  # fmt: skip
                paper_gain = next((g["paper_gain"] for g in cells if g["paper_gain"] is not None), None)
                if paper_gain is not None:
                    gain_ax.plot([1.0], [paper_gain], "*", ms=13, mec="black", mew=0.5, color=bars[0].get_color(),
                                 label=f"paper's gain {paper_gain:+.2f} (full labels)")  # fmt: skip
            ax.set(xlabel="label fraction", title=f"{dataset} {stats.metric_name(metric)}")
            ax.set_ylabel(stats.metric_name(metric) + (" (px)" if metric == "hd95" else " (%)"))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            gain_ax.axhline(0.0, color="black", lw=0.8)
            gain_ax.set(xlabel="label fraction", title=f"gain over random, {stats.metric_name(metric)}")
            gain_ax.set_ylabel("gain" + (" (px, random minus init)" if metric == "hd95" else " (points)"))
            gain_ax.grid(alpha=0.3)
            if gain_ax.get_legend_handles_labels()[0]:
                gain_ax.legend(fontsize=7)
        fig.suptitle(f"{method} on {dataset}: mean ± std over seeds, and the paired gain, vs label fraction",
                     fontsize=11)  # fmt: skip
        fig.tight_layout()
        path = out / f"fractions_{_file_part(dataset)}_{_file_part(method)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _tpp_histories(tpp_runs: list[dict]) -> list[tuple[dict, list[float], list[float]]]:
    """(run, epochs, losses) of every TPP stage whose ``history.csv`` has an epoch and a loss column."""
    import pandas as pd

    out = []
    for run in tpp_runs:
        path = run["folder"] / "history.csv"
        path = path if path.is_file() else next(iter(sorted(run["folder"].rglob("history.csv"))), None)
        if path is None:
            continue
        try:
            frame = pd.read_csv(path)
        except (OSError, ValueError):
            continue
        column = next((c for c in LOSS_COLUMNS if c in frame.columns), None)
        if column is None or frame.empty:
            continue
        frame = frame.dropna(subset=[column])
        epochs = frame["epoch"].tolist() if "epoch" in frame.columns else list(range(1, len(frame) + 1))
        if epochs:
            out.append((run, [float(e) for e in epochs], [float(v) for v in frame[column]]))
    return out


def _tpp_loss(tpp_runs: list[dict], out: Path) -> tuple[list[dict], Path | None]:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    histories = _tpp_histories(tpp_runs)
    if not histories:
        return [], None
    summary = []
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run, epochs, losses in histories:
        s = run["settings"]
        name = " ".join(str(s[k]) for k in ("dataset", "method", "pretext", "variant") if s.get(k))
        name += f" seed {s.get('seed')}"
        ax.plot(epochs, losses, marker="." if len(epochs) < 30 else None, label=name)
        summary.append(
            {
                "run_key": run["key"],
                "settings": s,
                "epochs": len(epochs),
                "first": losses[0],
                "last": losses[-1],
                "min": min(losses),
                "falls": losses[-1] < losses[0],
                "epoch": epochs,
                "loss": losses,
            }
        )
    ax.set(xlabel="epoch", ylabel="pretext loss", title="TPP stage: pretext loss per epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(histories) > 8 else 1)
    fig.tight_layout()
    path = out / "tpp_loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return summary, path


# ---------------------------------------------------------------------------------------------------------------


def write_report(exp_dir: str | Path, out_dir: str | Path | None = None) -> dict:
    """Write ``report.md``, ``report.json`` and the plots of an experiment folder; returns what report.json holds
    plus the written paths (``markdown``, ``json``, ``plots``)."""
    import matplotlib

    matplotlib.use("Agg")
    exp_dir = Path(exp_dir)
    plan = _read_plan(exp_dir)
    notes = [] if (exp_dir / "plan.json").is_file() else [f"{exp_dir} has no plan.json: no paper table, no run order"]
    out = Path(out_dir) if out_dir is not None else exp_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    for pattern in PLOT_PATTERNS:  # plots of an earlier report whose runs may be gone
        for stale in out.glob(pattern):
            stale.unlink()
    refs = paper.paper_refs(plan.get("paper"))
    tables = paper.load_paper()["tables"]
    notes += [f"{r} is not in the transcription of the paper (paper_results.json)" for r in refs if r not in tables]
    notes += [f"{r}: {tables[r]['note']}" for r in refs if r in tables and tables[r].get("note")]
    if [r for r in refs if r in tables and tables[r]["rows"]]:
        notes.append("paper numbers (rows marked ↳ paper) are shown for label fraction 1.0, as the paper reports them")

    runs, tpp_runs, finetunes, problems = collect(exp_dir)
    not_started = _not_started(plan, exp_dir)
    if not_started is None:
        notes.append("plan.json lists no graph, so runs that never started are not listed")
    problems += not_started or []
    columns = _columns(runs, plan, notes)
    groups = _groups(runs)
    records = _group_stats(groups, columns, refs)
    finetuned = _Runs(exp_dir, finetunes)
    gains = _gains(groups, columns, plan, finetuned, refs)
    tpp_loss, loss_plot = _tpp_loss(tpp_runs, out)
    plots = _plot_gains(gains, out) + _plot_convergence(gains, finetuned, out) + _plot_fractions(records, gains, out)
    plots += [loss_plot] if loss_plot else []

    result = {
        "experiment": plan.get("name", exp_dir.name),
        "paper": plan.get("paper"),
        "paper_tables": refs,
        "notes": notes,
        "exp_dir": str(exp_dir),
        "std": stats.STD_KIND,
        "bootstrap": {
            "method": "percentile, paired over seeds (scipy.stats.bootstrap, paired=True)",
            "n_resamples": stats.BOOTSTRAP_RESAMPLES,
            "rng_seed": stats.BOOTSTRAP_SEED,
            "confidence": stats.CONFIDENCE,
        },
        "gain_definition": "the initialisation's value minus random's on the same seed; random minus the "
        "initialisation's for HD95 (positive = the initialisation did better)",
        "columns": [list(c) for c in columns],
        "groups": records,
        "gain": gains,
        "tpp_loss_curves": tpp_loss,
        "missing": problems,
        "plots": [str(p) for p in plots],
    }
    (out / "report.md").write_text(_markdown(result, columns, plan))
    (out / "report.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return {**result, "markdown": str(out / "report.md"), "json": str(out / "report.json")}


def summary_text(result: dict) -> str:
    """The lines a command prints after :func:`write_report`: per metric each arm's mean ± std, the gain's verdict
    (with the paper's gain) and the iterations to the convergence target with their ratio."""
    lines, described = [], set()
    for g in result["gain"]:
        where = f"{g['dataset']} {g['method']} (label fraction {g['label_fraction']})"
        arms = (f"random {_fmt(g['mean_random'], g['std_random'], g['n_seeds'])}, "
                f"{_row_label(g['init'], g['variant'])} {_fmt(g['mean_tpp'], g['std_tpp'], g['n_seeds'])}")  # fmt: skip
        lines.append(f"{where} {stats.metric_name(g['metric'])}: {arms}\n    {g['verdict']['text']}")
        conv = g.get("convergence")
        if conv is None:
            lines.append("    convergence: no fine-tuning history.csv in both arms")
        elif (where, _row_label(g["init"], g["variant"]), conv["metric"]) in described:
            lines.append(f"    convergence: measured on validation {convergence.column_name(conv['metric'])}, as above")
        else:
            described.add((where, _row_label(g["init"], g["variant"]), conv["metric"]))
            lines.append(f"    convergence: {convergence.describe(conv, g['init'])}")
    if not lines:
        lines.append("no pair of TPP and random runs on the same seed yet")
    if result["missing"]:
        lines.append(f"{len(result['missing'])} run(s) missing, unfinished or failed: see {result['markdown']}")
    lines.append(f"report: {result['markdown']}")
    return "\n".join(lines)
