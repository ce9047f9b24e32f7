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

from tpp_monai.errors import UserError
from tpp_monai.handlers import DISTANCE_METRICS

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


def _label(run: dict) -> str:
    if not run["tpp"]:
        return run["method"]
    return f"{run['method']} w/ TPP" + (f" ({run['pretext'].upper()})" if run["pretext"] else "")


def summarise(runs: list[dict]) -> tuple[list[str], list[list[str]], list[dict]]:
    """Header, Markdown-ready rows (``mean ± std``) and flat CSV records, grouped by (method, TPP) x dataset."""
    from tpp_monai.data.info import get_dataset

    datasets = sorted({r["dataset"] for r in runs})
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in runs:
        groups[(_label(r), r["dataset"])].append(r)
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


def read_history(path: str | Path) -> dict[str, list]:
    """``history.csv`` as columns of numbers (``nan`` where a cell is empty, e.g. epochs without validation)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = list(rows[0]) if rows else []
    return {c: [float(r[c]) if r.get(c) not in (None, "") else float("nan") for r in rows] for c in columns}


def validation_columns(history: dict[str, list]) -> list[str]:
    """The validation metrics of a history that have at least one value (model-selection score first)."""
    names = [c for c in history if c.startswith("val_") and any(v == v for v in history[c])]
    return sorted(names, key=lambda c: c != "val_score")


def _points(history: dict[str, list], column: str) -> tuple[list, list]:
    pairs = [(e, v) for e, v in zip(history["epoch"], history[column]) if v == v]
    return ([p[0] for p in pairs], [p[1] for p in pairs]) if pairs else ([], [])


def plot_history(history_csv: str | Path, path: str | Path, title: str | None = None) -> Path | None:
    """``curves.png`` of one run: mean training loss, validation metrics (when validated) and learning rate."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    history = read_history(history_csv)
    if not history.get("epoch"):
        return None
    val = validation_columns(history)
    panels = 1 + bool(val) + ("lr" in history)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4), squeeze=False, sharex=True)
    axes = list(axes[0])
    ax = axes.pop(0)
    few = "o" if len(history["epoch"]) < 30 else None  # a marker keeps a one-epoch run visible
    ax.plot(history["epoch"], history["train_loss"], color="tab:blue", marker=few, ms=3)
    ax.set(title="training loss (epoch mean)", xlabel="epoch", ylabel="loss")
    if val:
        ax = axes.pop(0)
        for column in val:
            ax.plot(*_points(history, column), "o-", ms=3, label=column)
        ax.set(title="validation", xlabel="epoch", ylabel="metric (fraction)")
        ax.legend(fontsize=8)
    if "lr" in history:
        ax = axes.pop(0)
        ax.plot(history["epoch"], history["lr"], color="tab:gray", marker=few, ms=3)
        ax.set(title="learning rate (end of epoch)", xlabel="epoch", yscale="log")
    for ax in fig.axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(history["epoch"]) == 1:
            ax.set_xticks(history["epoch"])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def read_predictions(path: str | Path) -> tuple[list[str], np.ndarray, list[str]] | None:
    """(class names, probabilities ``(N, C)``, true class names) of a labelled ``predictions.csv``; ``None`` when
    the file has no label column (inference)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        columns = reader.fieldnames or []
    classes = [c[len("prob_"):] for c in columns if c.startswith("prob_")]
    if "label" not in columns or not rows or not classes:
        return None
    probs = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    return classes, probs, [r["label"] for r in rows]


def _roc_lines(ax: object, classes: list[str], probs: np.ndarray, labels: list[str], name: str = "") -> None:
    """One ROC curve per class (one-vs-rest); for two classes the positive (second) class only."""
    from sklearn.metrics import roc_auc_score, roc_curve

    truth = np.array([classes.index(label) for label in labels])
    shown = [1] if len(classes) == 2 else range(len(classes))
    for k in shown:
        positive = truth == k
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive, probs[:, k])
        auc = roc_auc_score(positive, probs[:, k])
        ax.plot(fpr, tpr, label=f"{name}{classes[k]} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="gray", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


def _confusion(ax: object, classes: list[str], probs: np.ndarray, labels: list[str], title: str) -> None:
    from sklearn.metrics import confusion_matrix

    truth = [classes.index(label) for label in labels]
    matrix = confusion_matrix(truth, probs.argmax(1), labels=list(range(len(classes))))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                color="white" if count > matrix.max() / 2 else "black")  # fmt: skip
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=title)


def plot_classification(predictions_csv: str | Path, out: str | Path) -> list[Path]:
    """``roc.png`` and ``confusion_matrix.png`` of one evaluated classification run."""
    import matplotlib.pyplot as plt

    read = read_predictions(predictions_csv)
    if read is None:
        return []
    classes, probs, labels = read
    out = Path(out)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    _roc_lines(ax, classes, probs, labels)
    ax.set_title("ROC (one class vs the rest)")
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=100)
    plt.close(fig)
    size = 2.5 + 0.45 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 0.5, size))
    _confusion(ax, classes, probs, labels, f"confusion matrix ({len(labels)} images)")
    fig.tight_layout()
    fig.savefig(out / "confusion_matrix.png", dpi=100)
    plt.close(fig)
    return [out / "roc.png", out / "confusion_matrix.png"]


def run_plots(folder: str | Path) -> list[Path]:
    """The plots of one run folder: ``curves.png`` from ``history.csv``; ``roc.png`` and ``confusion_matrix.png``
    from a labelled ``predictions.csv``."""
    import matplotlib

    matplotlib.use("Agg")
    folder = Path(folder)
    written = []
    if (folder / "history.csv").is_file():
        written.append(plot_history(folder / "history.csv", folder / "curves.png", title=str(folder.name)))
    if (folder / "predictions.csv").is_file():
        written += plot_classification(folder / "predictions.csv", folder)
    return [p for p in written if p is not None]


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
        name = f"{run['dataset']}: {_label(run)}"
        ax_loss.plot(history["epoch"], history["train_loss"], style, label=name)
        val = validation_columns(history)
        if val:
            ax_val.plot(*_points(history, val[0]), style, marker="o", ms=3, label=f"{name} ({val[0]})")
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


UNITS = {"hd95": "HD95 (pixels, lower is better)"}


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
            name = f"{_label(run)}: " if len(classes) == 2 else f"{_label(run)} "
            _roc_lines(axes[0][0], classes, probs, labels, name if len(group) > 1 else "")
        axes[0][0].set_title(f"{dataset}: ROC (one class vs the rest)", fontsize=10)
        for ax, (run, (classes, probs, labels)) in zip(axes[0][1:], group):
            _confusion(ax, classes, probs, labels, f"{_label(run)}\nseed {run['info'].get('seed', '?')}")
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
    from tpp_monai.data.info import DATASETS

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
                    ax.set_title("image + ground truth" if run is None else _label(run), fontsize=9)
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
