"""The plots of an experiment report: ``gain_<method>.png``, ``convergence_<method>.png``,
``fractions_<dataset>_<method>.png`` (several label fractions) and ``tpp_loss.png`` (the TPP stage's pretext loss)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from tpp_monai.experiments import convergence, stats
from tpp_monai.report.gains import FinetuneRuns, comparison_name, row_label

PLOT_PATTERNS = ("gain_*.png", "convergence_*.png", "fractions_*.png", "tpp_loss.png")
LOSS_COLUMNS = ("pretext_loss", "loss", "train_loss")  # first one present in a TPP history.csv is plotted


def file_part(name: str) -> str:
    """A name as part of a file name: letters, digits, ``_``, ``.`` and ``-`` kept (``peft.lora`` stays)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(name))


def plot_convergence(gains: list[dict], runs: FinetuneRuns, out: Path) -> list[Path]:
    """``convergence_<method>.png``: one axis per comparison (dataset, init, label fraction, validation column)."""
    written = []
    for method in dict.fromkeys(g["method"] for g in gains):
        panels, seen = [], set()
        for g in gains:
            conv = g["convergence"]
            if g["method"] != method or conv is None:
                continue
            key = (comparison_name(g), conv["metric"])
            if key in seen:
                continue
            seen.add(key)
            plain = {k: v for k, v in conv.items() if k != "missing_history"}
            cached = next(c for c in runs.curves.values() if c["convergence"] == plain)
            title = f"{g['dataset']} {row_label(g['init'], g['variant'])}, label fraction {g['label_fraction']}"
            panels.append({"title": title, "init": g["init"], "convergence": conv, "curves": cached["curves"]})
        path = convergence.plot(panels, out / f"convergence_{file_part(method)}.png", method)
        if path is not None:
            written.append(path)
    return written


def _interval_colour(ci95: list | None) -> str:
    if not ci95:
        return "tab:gray"
    return "tab:green" if ci95[0] > 0 else "tab:red" if ci95[1] < 0 else "tab:gray"


def plot_gains(gains: list[dict], out: Path) -> list[Path]:
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
                + (f"\n{row_label(g['init'], g['variant'])}" if several_inits else "")
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
        path = out / f"gain_{file_part(method)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot_fractions(records: list[dict], gains: list[dict], out: Path) -> list[Path]:
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
                    label=row_label(init, dict(variant)),
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
                                        label=f"{row_label(init, dict(variant))} - random [95 % CI]")  # fmt: skip
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
        path = out / f"fractions_{file_part(dataset)}_{file_part(method)}.png"
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


def plot_tpp_loss(tpp_runs: list[dict], out: Path) -> tuple[list[dict], Path | None]:
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
