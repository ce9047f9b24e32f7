"""Convergence as a measured result: how many iterations (and wall seconds) a fine-tuning run needs to reach a share
of the random arm's best validation value, read from each run's ``history.csv``.

For one comparison (a non-random initialisation against ``random``, same dataset, method, label fraction and
variant, on the seeds where both arms have a fine-tuning history):

* validation value: column ``val_<metric>`` of ``history.csv`` at the epochs that were validated, in the report's
  units (fractions times 100; HD95 in pixels). Where the histories have no such column (validation computes only
  the model-selection metric, e.g. ``val_dice`` for HD95, ``val_score`` for classification), the model-selection
  column (:func:`validation_column`); the entry's ``metric`` names the column used;
* best of a run: its highest validated value (the lowest for a distance such as HD95);
* ``target`` = ``target_share`` (default :data:`TARGET_SHARE`) x the mean of the random runs' bests (a distance:
  the mean best divided by the share);
* iterations to the target: the ``iteration`` of the first validated epoch whose value reaches the target (at
  least it; at most it for a distance), seconds: that row's ``elapsed_s``. Validation runs every ``val_interval``
  epochs, so this is the first validation at or after the moment the run got there;
* a run that never reaches the target within its budget is kept: ``iterations`` null, ``reached`` false, its last
  iteration in ``budget``;
* ``ratio``: the geometric mean over the seeds where both runs reached the target of (init iterations / random
  iterations), with a percentile bootstrap 95 % interval (:func:`tpp_monai.experiments.stats.ratio_summary`);
  below 1 the initialisation got there in fewer iterations. Seeds where a run never reached it are counted in
  ``ratio_excluded`` and named in the text.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from tpp_monai.experiments import stats
from tpp_monai.handlers import DISTANCE_METRICS
from tpp_monai.tracking.plots import read_history, validation_columns

TARGET_SHARE = 0.95


def read_history_file(folder: Path) -> dict | None:
    """``<folder>/history.csv`` as columns (:func:`~tpp_monai.tracking.plots.read_history`); None when absent,
    unreadable or without an ``iteration`` column."""
    path = Path(folder) / "history.csv"
    if not path.is_file():
        return None
    try:
        history = read_history(path)
    except (OSError, ValueError, KeyError):
        return None
    return history if history.get("iteration") else None


def _validated(history: dict, column: str) -> bool:
    return column in history and any(v == v for v in history[column])


def validation_column(histories: list[dict], metric: str) -> str | None:
    """The column every one of ``histories`` validated: ``val_<metric>``, else the model-selection metric
    (``val_score``, else the first ``val_`` column the first history has); None when they share none."""
    if not histories:
        return None
    wanted = f"val_{metric}"
    if all(_validated(h, wanted) for h in histories):
        return wanted
    for column in validation_columns(histories[0]):
        if all(_validated(h, column) for h in histories):
            return column
    return None


def is_distance(column: str) -> bool:
    """A validation column of a distance (lower is better, in pixels, not scaled to percent)."""
    return column.removeprefix("val_") in DISTANCE_METRICS


def read_curve(history: dict, column: str) -> dict:
    """The validated epochs of one history for ``column``: ``{"iteration", "seconds", "value", "budget"}`` in the
    report's units; ``seconds`` None where the history has no ``elapsed_s`` at a validated epoch."""
    scale = 1.0 if is_distance(column) else 100.0
    rows = [i for i, v in enumerate(history[column]) if v == v]
    seconds = history.get("elapsed_s")
    return {
        "iteration": [int(history["iteration"][i]) for i in rows],
        "seconds": [float(seconds[i]) for i in rows] if seconds and all(seconds[i] == seconds[i] for i in rows)
        else None,
        "value": [scale * history[column][i] for i in rows],
        "budget": int(max(history["iteration"])),
    }  # fmt: skip


def _best(curve: dict, higher_is_better: bool) -> float:
    return max(curve["value"]) if higher_is_better else min(curve["value"])


def _first_reach(curve: dict, target: float, higher_is_better: bool) -> tuple[int | None, float | None]:
    for k, value in enumerate(curve["value"]):
        if (value >= target) if higher_is_better else (value <= target):
            return curve["iteration"][k], (curve["seconds"][k] if curve["seconds"] is not None else None)
    return None, None


def _arm_summary(values: list) -> dict:
    """Mean ± sample std over the runs that reached the target, and how many did."""
    reached = [v for v in values if v is not None]
    mean, std = stats.mean_std(reached) if reached else (None, None)
    return {"mean": mean, "std": std, "reached": len(reached), "runs": len(values)}


def compare(init: str, column: str, random_curves: dict, init_curves: dict, target_share: float = TARGET_SHARE
            ) -> dict | None:  # fmt: skip
    """The convergence entry of one comparison (see the module docstring) from per-seed curves of ``column``
    (:func:`read_curve`, seed -> curve, in seed order); None when no seed has a curve in both arms."""
    seeds = [s for s in random_curves if s in init_curves]
    if not seeds:
        return None
    higher_is_better = not is_distance(column)
    bests = [_best(random_curves[s], higher_is_better) for s in seeds]
    mean_best = float(np.mean(bests))
    target = target_share * mean_best if higher_is_better else mean_best / target_share
    arms = {"random": random_curves, init: init_curves}
    iterations, seconds, reached, budget = {}, {}, {}, {}
    for arm, curves in arms.items():
        hits = [_first_reach(curves[s], target, higher_is_better) for s in seeds]
        iterations[arm] = [h[0] for h in hits]
        seconds[arm] = [h[1] for h in hits]
        reached[arm] = [h[0] is not None for h in hits]
        budget[arm] = [curves[s]["budget"] for s in seeds]
    both = [k for k in range(len(seeds)) if reached["random"][k] and reached[init][k]]
    ratio, ratio_ci = None, None
    if both:
        ratio, ratio_ci = stats.ratio_summary([iterations[init][k] for k in both],
                                              [iterations["random"][k] for k in both])  # fmt: skip
    seconds_recorded = all(random_curves[s]["seconds"] is not None and init_curves[s]["seconds"] is not None
                           for s in seeds)  # fmt: skip
    if not seconds_recorded:
        seconds = {arm: [None] * len(seeds) for arm in arms}
    summary = {
        arm: {"iterations": _arm_summary(iterations[arm]), "seconds": _arm_summary(seconds[arm])} for arm in arms
    }
    return {
        "metric": column,
        "higher_is_better": higher_is_better,
        "target_share": target_share,
        "target": target,
        "random_best": bests,
        "seeds": list(seeds),
        "iterations": iterations,
        "seconds": seconds,
        "seconds_recorded": seconds_recorded,
        "reached": reached,
        "budget": budget,
        "summary": summary,
        "ratio": ratio,
        "ratio_ci": ratio_ci,
        "ratio_seeds": [seeds[k] for k in both],
        "ratio_excluded": len(seeds) - len(both),
        "validated_at": random_curves[seeds[0]]["iteration"],
    }


def mean_text(summary: dict, unit: str = "", digits: int = 0) -> str:
    """``120 ± 10 (3/3 reached)`` or ``never reached (3 runs)``."""
    if summary["reached"] == 0:
        return f"never reached ({summary['runs']} runs)"
    std = f" ± {summary['std']:.{digits}f}" if summary["std"] is not None else ""
    return f"{summary['mean']:.{digits}f}{std}{unit} ({summary['reached']}/{summary['runs']} reached)"


def _every(iterations: list[int]) -> str:
    steps = sorted(set(np.diff(iterations).tolist()))
    if not steps:
        return f"validated once, at iteration {iterations[0]}" if iterations else "never validated"
    return f"validated every {steps[0]} iterations" if len(steps) == 1 else f"validated every {steps[0]}-{steps[-1]}"


def column_name(column: str) -> str:
    """``val_dice`` -> ``Dice``, ``val_score`` -> ``score`` (the model-selection metric)."""
    return stats.metric_name(column.removeprefix("val_"))


def describe(conv: dict, init: str) -> str:
    """One line: the target, each arm's iterations (and seconds), the ratio with its interval."""
    s = conv["summary"]
    share = f"{100 * conv['target_share']:g} %"
    text = (f"iterations to {share} of random's best validation {column_name(conv['metric'])} "
            f"({conv['target']:.2f}; {_every(conv['validated_at'])}): random {mean_text(s['random']['iterations'])}"
            f", {init} {mean_text(s[init]['iterations'])}")  # fmt: skip
    if conv["ratio"] is None:
        text += f"; no ratio: no seed where both arms reached the target (of {len(conv['seeds'])})"
    else:
        ci = conv["ratio_ci"]
        interval = f" [95 % CI {ci[0]:.2f}, {ci[1]:.2f}]" if ci else " (one seed: no interval)"
        n = len(conv["ratio_seeds"])
        text += f"; ratio {init}/random {conv['ratio']:.2f}{interval} over {n} seed{'s' if n != 1 else ''}"
        if conv["ratio_excluded"]:
            text += f" ({conv['ratio_excluded']} seed(s) left out: an arm never reached the target)"
    if conv["seconds_recorded"]:
        text += (f"; wall time random {mean_text(s['random']['seconds'], ' s', 1)}, "
                 f"{init} {mean_text(s[init]['seconds'], ' s', 1)}")  # fmt: skip
    return text


def plot(panels: list[dict], path: Path, title: str) -> Path | None:
    """One axis per comparison: every seed's validation curve of both arms, the target line, and a star where each
    run first reached it. A panel: ``{"title", "init", "convergence", "curves": {"random": {seed: curve}, init:
    {...}}}``."""
    import matplotlib.pyplot as plt

    if not panels:
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows + 0.4), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, panel in zip(axes.flat, panels):
        conv, init = panel["convergence"], panel["init"]
        for arm, colour, style in (("random", "tab:blue", "--"), (init, "tab:orange", "-")):
            for j, seed in enumerate(conv["seeds"]):
                c = panel["curves"][arm][seed]
                ax.plot(c["iteration"], c["value"], style, color=colour, alpha=0.8, marker=".", ms=4,
                        label=arm if j == 0 else None)  # fmt: skip
                hit = conv["iterations"][arm][j]
                if hit is not None:
                    ax.plot([hit], [c["value"][c["iteration"].index(hit)]], "*", color=colour, ms=11, mec="black",
                            mew=0.5)  # fmt: skip
        share = f"{100 * conv['target_share']:g} %"
        ax.axhline(conv["target"], color="tab:red", lw=1, ls=":", label=f"target: {share} of random's best")
        ratio = "no ratio" if conv["ratio"] is None else f"ratio {conv['ratio']:.2f}"
        if conv["ratio_ci"]:
            ratio += f" [{conv['ratio_ci'][0]:.2f}, {conv['ratio_ci'][1]:.2f}]"
        ax.set_title(f"{panel['title']}\niterations to target, {init}/random: {ratio}", fontsize=9)
        ax.set_xlabel("iteration")
        unit = " (px)" if is_distance(conv["metric"]) else " (%)"
        ax.set_ylabel(f"validation {column_name(conv['metric'])}{unit}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right" if conv["higher_is_better"] else "upper right")
    fig.suptitle(f"{title}: validation curves per seed; \u2605 first validation at the target", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
