"""The plots of one run folder, drawn when the run ends (:class:`tpp_monai.tracking.RunTracker`): ``curves.png``
from ``history.csv``; ``roc.png`` and ``confusion_matrix.png`` from a labelled ``predictions.csv``."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


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


def history_points(history: dict[str, list], column: str) -> tuple[list, list]:
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
            ax.plot(*history_points(history, column), "o-", ms=3, label=column)
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
    classes = [c[len("prob_") :] for c in columns if c.startswith("prob_")]
    if "label" not in columns or not rows or not classes:
        return None
    probs = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    return classes, probs, [r["label"] for r in rows]


def roc_lines(ax: object, classes: list[str], probs: np.ndarray, labels: list[str], name: str = "") -> None:
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


def confusion_panel(ax: object, classes: list[str], probs: np.ndarray, labels: list[str], title: str) -> None:
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
    roc_lines(ax, classes, probs, labels)
    ax.set_title("ROC (one class vs the rest)")
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=100)
    plt.close(fig)
    size = 2.5 + 0.45 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 0.5, size))
    confusion_panel(ax, classes, probs, labels, f"confusion matrix ({len(labels)} images)")
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
