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
        runs.append({"dir": Path(folder), "metrics": percent, "info": info,
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


def _plot_curves(runs: list[dict], path: Path) -> bool:
    import matplotlib.pyplot as plt

    histories = []
    for r in runs:
        history = Path(r["info"].get("finetune_dir", "")) / "history.csv"
        if history.is_file():
            with open(history) as f:
                histories.append((r, list(csv.DictReader(f))))
    if not histories:
        return False
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for run, rows in histories:
        epochs = [int(row["epoch"]) for row in rows]
        style = "-" if run["tpp"] else "--"
        name = f"{run['dataset']}: {_label(run)}"
        ax_loss.plot(epochs, [float(row["train_loss"]) for row in rows], style, label=name)
        val = "val_score" if "val_score" in rows[0] else next((k for k in rows[0] if k.startswith("val_")), None)
        if val:
            points = [(e, float(row[val])) for e, row in zip(epochs, rows) if row.get(val) not in (None, "")]
            if points:
                ax_val.plot(*zip(*points), style, label=f"{name} ({val})")
    ax_loss.set(title="fine-tuning loss", xlabel="epoch", ylabel="loss")
    ax_val.set(title="validation (model selection metric)", xlabel="epoch")
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_gain(records: list[dict], path: Path) -> bool:
    import matplotlib.pyplot as plt

    by_key = {(r["method"], r["dataset"], r["metric"]): r["mean"] for r in records}
    bars = []
    for (label, dataset, metric), value in sorted(by_key.items()):
        if " w/ TPP" not in label:
            continue
        base = by_key.get((label.split(" w/ TPP")[0], dataset, metric))
        if base is not None:
            gain = value - base if HIGHER_IS_BETTER[metric] else base - value
            bars.append((f"{dataset}\n{label.split(' w/')[0]}\n{metric.upper()}", gain))
    if not bars:
        return False
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(bars)), 4))
    names, gains = zip(*bars)
    ax.bar(names, gains, color=["tab:green" if g >= 0 else "tab:red" for g in gains])
    ax.axhline(0, color="black", lw=0.8)
    ax.set(title="TPP minus random initialisation (positive = TPP better; HD95 sign flipped)",
           ylabel="points (percent or pixels)")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_overlays(runs: list[dict], out: Path, count: int = 4) -> list[Path]:
    """Test images with the ground truth (green) and each run's prediction (red), per segmentation dataset."""
    import matplotlib.pyplot as plt
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
        fig, axes = plt.subplots(len(records), 1 + len(group), figsize=(3 * (1 + len(group)), 3 * len(records)),
                                 squeeze=False)  # fmt: skip
        for i, rec in enumerate(records):
            stem = Path(rec["image"]).name.split(".")[0]
            for j, run in enumerate([None, *group]):
                ax = axes[i][j]
                ax.axis("off")
                masks = list((run["dir"] / "predictions").glob(f"{stem}_mask.png")) if run else []
                size = Image.open(masks[0]).size if masks else None
                image = Image.open(root / rec["image"]).convert("RGB")
                gt = Image.open(root / rec["label"])
                if size:
                    image, gt = image.resize(size), gt.resize(size, Image.NEAREST)
                ax.imshow(np.asarray(image))
                ax.contour(np.asarray(gt) > 0, levels=[0.5], colors="lime", linewidths=1)
                if masks:
                    ax.contour(np.asarray(Image.open(masks[0])) > 0, levels=[0.5], colors="red", linewidths=1)
                if i == 0:
                    ax.set_title("image + ground truth" if run is None else _label(run), fontsize=9)
        fig.tight_layout()
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
