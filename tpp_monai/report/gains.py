"""The numbers of an experiment report: evaluated runs grouped by (dataset, method, init, label fraction, variant),
mean ± std over seeds, and each non-random initialisation paired with ``random`` on the same seeds: gain, interval
and verdict (:mod:`tpp_monai.experiments.stats`), convergence (:mod:`tpp_monai.experiments.convergence`) and what
the initialisation cost (``init_cost.json``)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from tpp_monai.data.info import DATASETS
from tpp_monai.experiments import convergence, paper, stats
from tpp_monai.report.experiment_folder import as_fraction, fraction_order, read_json
from tpp_monai.report.runs import HIGHER_IS_BETTER, METRICS

COST_FILE = "init_cost.json"  # in the run folder that paid the initialisation (the TPP stage's, or the finetune's)
COST_FORMAT = ('{"kind": "tpp" | "peft-eva" | ..., "seconds": float, "peak_memory_mib": float or null, '
               '"memory_kind": "cuda_max_allocated" | "process_max_rss", "device": "cpu" | "cuda"}')  # fmt: skip
GroupKey = tuple  # (dataset, method, init, label_fraction, variant) with variant a sorted tuple of (key, value)


def ordered(values: Iterable, preferred: list | None) -> list:
    values = list(dict.fromkeys(values))
    order = {v: i for i, v in enumerate(preferred or [])}
    return sorted(values, key=lambda v: (order.get(v, len(order)), str(v)))


# names a plan may use for a metric -> the key the evaluate workflow writes into metrics.json
METRIC_ALIASES = {"accuracy": "acc", "hd": "hd95", "dice_mean": "mean_dice", "dice_organ": "organ_dice",
                  "dice_tumour": "tumour_dice", "dice_tumor": "tumour_dice", "tumor_dice": "tumour_dice"}  # fmt: skip


def metric_columns(runs: list[dict], plan: dict, notes: list[str]) -> list[tuple[str, str]]:
    """(dataset, metric) pairs in the paper's order: the plan's datasets, each with the plan's metrics that its task
    has (all of the task's metrics when the plan names none of them)."""
    wanted = [METRIC_ALIASES.get(m, m) for m in plan.get("metrics") or []]
    known = {m for ms in METRICS.values() for m in ms}
    unknown = [m for m, w in zip(plan.get("metrics") or [], wanted) if w not in known]
    if unknown:
        notes.append(f"plan metrics {', '.join(unknown)} are not keys of metrics.json ({', '.join(sorted(known))}); "
                     "ignored")  # fmt: skip
    columns = []
    for dataset in ordered((r["settings"].get("dataset") for r in runs), plan.get("datasets")):
        present = {m for r in runs if r["settings"].get("dataset") == dataset for m in r["metrics"]}
        task_metrics = list(METRICS[DATASETS[dataset].task]) if dataset in DATASETS else sorted(present)
        chosen = [m for m in task_metrics if m in wanted] or task_metrics
        columns += [(dataset, m) for m in chosen if m in present]
    return columns


def _seed_order(seed: object) -> tuple:
    return (0, seed, "") if isinstance(seed, (int, float)) else (1, 0, str(seed))


def group_runs(runs: list[dict]) -> dict[GroupKey, dict]:
    """Group key -> {"by_seed": {seed: metrics}, "paper_variant": {...}}."""
    groups: dict[GroupKey, dict] = {}
    for r in runs:
        s = r["settings"]
        key = (s.get("dataset"), s.get("method"), s.get("init"), as_fraction(s.get("label_fraction")), r["variant"])
        group = groups.setdefault(key, {"by_seed": {}, "paper_variant": r["paper_variant"],
                                        "backbone": s.get("backbone")})  # fmt: skip
        group["by_seed"][s.get("seed")] = r["metrics"]
    return groups


def group_stats(groups: dict[GroupKey, dict], columns: list[tuple[str, str]], tables: list[str]) -> list[dict]:
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


class FinetuneRuns:
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


def _convergence(runs: FinetuneRuns, key: GroupKey, partner: GroupKey, metric: str, seeds: list) -> dict | None:
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
    record = read_json(path)
    if record is None or not isinstance(record.get("seconds"), (int, float)):
        return None
    return record


def _cost(runs: FinetuneRuns, key: GroupKey, seeds: list) -> dict:
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


def paired_gains(groups: dict[GroupKey, dict], columns: list[tuple[str, str]], plan: dict, runs: FinetuneRuns,
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
    methods = ordered((g["method"] for g in out), plan.get("methods"))
    inits = ordered((g["init"] for g in out), plan.get("init"))
    datasets = list(dict.fromkeys(d for d, _ in columns))
    out.sort(
        key=lambda g: (
            datasets.index(g["dataset"]),
            methods.index(g["method"]),
            inits.index(g["init"]),
            str(g["variant"]),
            fraction_order(g["label_fraction"]),
            column_order[(g["dataset"], g["metric"])],
        )
    )
    return out


def row_label(init: str, variant: dict) -> str:
    """An initialisation with its variant, as a row of the tables: ``tpp-mae, mae_decoder=light``."""
    return init + "".join(f", {k}={v}" for k, v in variant.items())


def comparison_name(g: dict) -> str:
    """The comparison of a gain entry in words: dataset, method, init, label fraction."""
    return f"{g['dataset']} {g['method']} {row_label(g['init'], g['variant'])}, label fraction {g['label_fraction']}"
