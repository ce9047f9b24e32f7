"""``python -m tpp_monai report RUN_DIRS... --out DIR``: evaluated runs -> the paper's table, with plots.

Each run directory is the output folder of an ``evaluate`` workflow (``metrics.json`` with the run's provenance,
per-image CSVs, predicted masks for segmentation). Runs are grouped by dataset, method and whether the target
parameters were pre-trained (TPP) or random; repeated seeds give mean ± std, as the paper reports.

Outputs: ``results.md`` and ``results.csv`` (method x dataset, with and without TPP), ``curves.png`` (training
loss and validation metric of every fine-tuning run), ``tpp_gain.png`` (with-TPP minus without-TPP per metric) and,
for segmentation runs, ``overlays_<dataset>.png`` (test images with ground truth and predictions).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tpp_monai.data.info import DATASETS, get_dataset
from tpp_monai.errors import UserError
from tpp_monai.handlers import DISTANCE_METRICS
from tpp_monai.tracking.plots import (
    confusion_panel,
    history_points,
    read_history,
    read_predictions,
    roc_lines,
    validation_columns,
)

# Metric columns per task in the paper's order, and whether higher is better (HD95 is a distance).
METRICS = {"cls": ("acc", "auc", "f1"), "seg": ("dice", "hd95"), "seg3d": ("organ_dice", "tumour_dice", "mean_dice")}
HIGHER_IS_BETTER = {"acc": True, "auc": True, "f1": True, "dice": True, "hd95": False, "organ_dice": True,
                    "tumour_dice": True, "mean_dice": True}  # fmt: skip


def load_runs(run_dirs: Sequence[str | Path]) -> list[dict]:
    """Read ``metrics.json`` of every evaluated run; a folder without one is an error naming it."""
    runs = []
    for folder in run_dirs:
        path = Path(folder) / "metrics.json"
        if not path.is_file():
            raise UserError(f"{folder}: no metrics.json; pass the output folders of `evaluate` runs")
        try:
            data = json.loads(path.read_text())
            percent = data["percent"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise UserError(
                f"{path}: not a metrics.json written by `evaluate` ({exc}); rerun evaluate into {folder}"
            ) from exc
        info = data.get("run_info", {})
        # percentages, and the distances (HD95) in their own units
        values = {**{k: v for k, v in data.get("metrics", {}).items() if k in DISTANCE_METRICS}, **percent}
        runs.append({"dir": Path(folder), "metrics": values, "info": info,
                     "dataset": info.get("dataset", "?"), "method": info.get("method", "?"),
                     "tpp": bool(info.get("tpp")), "pretext": info.get("tpp_pretext")})  # fmt: skip
    return runs


def run_label(run: dict) -> str:
    """``method``, ``method w/ TPP`` or ``method w/ TPP (MAE)``: a run's row in the table."""
    if not run["tpp"]:
        return run["method"]
    return f"{run['method']} w/ TPP" + (f" ({run['pretext'].upper()})" if run["pretext"] else "")


def summarise(runs: list[dict]) -> tuple[list[str], list[list[str]], list[dict]]:
    """Header, Markdown-ready rows (``mean ± std``) and flat CSV records, grouped by (method, TPP) x dataset."""
    datasets = sorted({r["dataset"] for r in runs})
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in runs:
        groups[(run_label(r), r["dataset"])].append(r)
    labels = sorted({k[0] for k in groups}, key=lambda s: (s.split(" w/")[0], " w/" in s))
    columns = [(d, m) for d in datasets for m in METRICS[get_dataset(d).task if d != "?" else "cls"]]
    header = ["method", *[f"{d} {m.upper()}" for d, m in columns]]
    rows, records = [], []
    for label in labels:
        row = [label]
        for d, m in columns:
            values = [r["metrics"][m] for r in groups.get((label, d), []) if m in r["metrics"]]
            if not values:
                row.append("-")
                continue
            mean = statistics.fmean(values)
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            row.append(f"{mean:.2f} ± {std:.2f}" if len(values) > 1 else f"{mean:.2f}")
            records.append({"method": label, "dataset": d, "metric": m, "mean": round(mean, 4),
                            "std": round(std, 4), "n": len(values)})  # fmt: skip
        rows.append(row)
    return header, rows, records


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _history_of(path: object) -> dict[str, list] | None:
    path = Path(str(path)) / "history.csv" if path else None
    return read_history(path) if path is not None and path.is_file() else None


def _plot_curves(runs: list[dict], path: Path) -> bool:
    """Fine-tuning loss and validation metric of every run, and the TPP stage's pretext loss where TPP was used."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    histories = [(r, h) for r in runs if (h := _history_of(r["info"].get("finetune_dir"))) is not None]
    if not histories:
        return False
    tpp = {}  # TPP stages by their folder (several fine-tuning runs may share one)
    for r, _ in histories:
        if r["tpp"] and r["info"].get("tpp_ckpt"):
            folder = Path(r["info"]["tpp_ckpt"]).parent
            if (h := _history_of(folder)) is not None:
                tpp[folder] = (r, h)
    fig, axes = plt.subplots(1, 3 if tpp else 2, figsize=(15 if tpp else 11, 4.2))
    ax_loss, ax_val = axes[0], axes[1]
    ax_val.sharex(ax_loss)  # one epoch axis, also when validation ran only at the end
    for run, history in histories:
        style = "-" if run["tpp"] else "--"
        name = f"{run['dataset']}: {run_label(run)}"
        ax_loss.plot(history["epoch"], history["train_loss"], style, label=name)
        val = validation_columns(history)
        if val:
            ax_val.plot(*history_points(history, val[0]), style, marker="o", ms=3, label=f"{name} ({val[0]})")
    ax_loss.set(title="fine-tuning loss", xlabel="epoch", ylabel="loss (epoch mean)")
    ax_val.set(title="validation (model-selection metric)", xlabel="epoch", ylabel="fraction")
    if tpp:
        for run, history in tpp.values():
            pretext = (run["pretext"] or "TPP").upper()
            axes[2].plot(history["epoch"], history["train_loss"], label=f"{run['dataset']}: {run['method']} {pretext}")
        axes[2].set(title="TPP stage: pretext loss", xlabel="epoch", ylabel="loss (epoch mean)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_gain(records: list[dict], path: Path) -> bool:
    """One axis per metric: TPP minus random initialisation, per dataset and method (HD95's sign flipped so that
    positive always means TPP is better)."""
    import matplotlib.pyplot as plt

    by_key = {(r["method"], r["dataset"], r["metric"]): r["mean"] for r in records}
    gains: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for (label, dataset, metric), value in sorted(by_key.items()):
        if " w/ TPP" not in label:
            continue
        base = by_key.get((label.split(" w/ TPP")[0], dataset, metric))
        if base is not None:
            gain = value - base if HIGHER_IS_BETTER[metric] else base - value
            gains[metric].append((f"{dataset}\n{label.split(' w/')[0]}{label.split(' w/ TPP')[1]}", gain))
    if not gains:
        return False
    metrics = list(gains)
    width = max(3.2, 0.9 * max(len(v) for v in gains.values()) + 1.5)
    fig, axes = plt.subplots(1, len(metrics), figsize=(width * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        names, values = zip(*gains[metric])
        ax.bar(names, values, color=["tab:green" if g >= 0 else "tab:red" for g in values])
        ax.axhline(0, color="black", lw=0.8)
        unit = "pixels" if metric == "hd95" else "percentage points"
        ax.set_title(f"{metric.upper()}: TPP gain", fontsize=10)
        ax.set_ylabel(f"{unit}{' (random - TPP)' if metric == 'hd95' else ''}")
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("TPP vs random target parameters (above 0: TPP better)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_classification(runs: list[dict], out: Path) -> list[Path]:
    """Per classification dataset: ROC curves of every run, and a confusion matrix per run."""
    import matplotlib.pyplot as plt

    written = []
    by_dataset: dict[str, list] = defaultdict(list)
    for r in runs:
        if (r["dir"] / "predictions.csv").is_file() and (read := read_predictions(r["dir"] / "predictions.csv")):
            by_dataset[r["dataset"]].append((r, read))
    for dataset, group in by_dataset.items():
        fig, axes = plt.subplots(1, 1 + len(group), figsize=(5 * (1 + len(group)), 4.6), squeeze=False)
        for run, (classes, probs, labels) in group:
            name = f"{run_label(run)}: " if len(classes) == 2 else f"{run_label(run)} "
            roc_lines(axes[0][0], classes, probs, labels, name if len(group) > 1 else "")
        axes[0][0].set_title(f"{dataset}: ROC (one class vs the rest)", fontsize=10)
        for ax, (run, (classes, probs, labels)) in zip(axes[0][1:], group):
            confusion_panel(ax, classes, probs, labels, f"{run_label(run)}\nseed {run['info'].get('seed', '?')}")
        fig.tight_layout()
        path = out / f"classification_{dataset}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _plot_overlays(runs: list[dict], out: Path, count: int = 4) -> list[Path]:
    """Test images at their own size with the ground truth (green) and each run's prediction (red), per 2D
    segmentation dataset."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from PIL import Image

    written = []
    by_dataset: dict[str, list[dict]] = defaultdict(list)
    for r in runs:  # 2D masks (PNG) only; a datalist the run recorded but that has moved since is left out
        is_2d_seg = r["dataset"] in DATASETS and DATASETS[r["dataset"]].task == "seg"
        if is_2d_seg and (r["dir"] / "predictions").is_dir() and Path(r["info"].get("datalist", "")).is_file():
            by_dataset[r["dataset"]].append(r)
    for dataset, group in by_dataset.items():
        info = group[0]["info"]
        datalist = json.loads(Path(info["datalist"]).read_text())
        root = Path(info["dataset_dir"])
        records = sorted(datalist["test"], key=lambda d: d["image"])[:count]
        width, height = Image.open(root / records[0]["image"]).size
        row = 3 * min(1.5, height / width) + 0.3  # panels at the images' aspect ratio
        fig, axes = plt.subplots(len(records), 1 + len(group), figsize=(3 * (1 + len(group)), row * len(records) + 0.5),
                                 squeeze=False)  # fmt: skip
        for i, rec in enumerate(records):
            stem = Path(rec["image"]).name.split(".")[0]
            image = Image.open(root / rec["image"]).convert("RGB")
            gt = np.asarray(Image.open(root / rec["label"])) > 0
            for j, run in enumerate([None, *group]):
                ax = axes[i][j]
                ax.axis("off")
                ax.imshow(np.asarray(image))
                ax.contour(gt, levels=[0.5], colors="lime", linewidths=1)
                masks = list((run["dir"] / "predictions").glob(f"{stem}_mask.png")) if run else []
                if masks:
                    mask = Image.open(masks[0])
                    if mask.size != image.size:  # masks of an older evaluate, at network size
                        mask = mask.resize(image.size, Image.NEAREST)
                    ax.contour(np.asarray(mask) > 0, levels=[0.5], colors="red", linewidths=1)
                if i == 0:
                    ax.set_title("image + ground truth" if run is None else run_label(run), fontsize=9)
        legend = [Line2D([], [], color="lime", label="ground truth"), Line2D([], [], color="red", label="prediction")]
        fig.legend(handles=legend, loc="lower center", ncol=2, fontsize=9, frameon=False)
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        path = out / f"overlays_{dataset}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def make_report(run_dirs: Sequence[str | Path], out: str | Path) -> dict:
    """Write the table and plots for ``run_dirs`` into ``out``; returns the paths and the Markdown table."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = load_runs(run_dirs)
    header, rows, records = summarise(runs)
    table = markdown_table(header, rows)
    (out / "results.md").write_text(
        "Test-set results (percent; HD95 in pixels), mean ± std over seeds where several were run.\n\n" + table + "\n"
    )
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["method", "dataset", "metric", "mean", "std", "n"])
        writer.writeheader()
        writer.writerows(records)
    plots = []
    if _plot_curves(runs, out / "curves.png"):
        plots.append(out / "curves.png")
    if _plot_gain(records, out / "tpp_gain.png"):
        plots.append(out / "tpp_gain.png")
    plots += _plot_overlays(runs, out)
    plots += _plot_classification(runs, out)
    return {"table": table, "markdown": out / "results.md", "csv": out / "results.csv", "plots": plots}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", help="output folders of evaluate runs")
    parser.add_argument("--out", required=True, help="folder for results.md/.csv and the plots")


def run(args: argparse.Namespace) -> int:
    result = make_report(args.run_dirs, args.out)
    print(result["table"])
    print(f"\ntable: {result['markdown']} and {result['csv']}")
    for plot in result["plots"]:
        print(f"plot:  {plot}")
    return 0
