"""`experiment report` on fabricated run folders, its statistics recomputed here, and the paper transcription
checked against the paper's text."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tpp_monai.errors import UserError
from tpp_monai.experiments import stats
from tpp_monai.experiments.paper import load_paper, paper_refs
from tpp_monai.experiments.report import summary_text, write_report
from tpp_monai.handlers import EvaluationWriter

PAPER_TEXT = Path(__file__).resolve().parents[2] / "shared" / "seeds" / "002_83264d4dec266f93.txt"
# the paper text's table lines, verbatim, for a clone without shared/ beside it (checked against the text where it is)
PAPER_TABLES = Path(__file__).with_name("fixtures") / "paper_tables.txt"

# ---------------------------------------------------------------------------------------------------------------
# Fabricated experiment folders (the layout of the experiments contract)


def _settings(dataset: str, method: str, init: str, fraction: float | None, seed: int, variant: str | None = None):
    """Settings as exp-core's graph records them (``source`` only for TPP on another dataset's images)."""
    pretext = init.split("-")[1] if init.startswith("tpp-") else None
    return {"dataset": dataset, "method": method, "init": init, "pretext": pretext, "source": None,
            "label_fraction": fraction, "seed": seed, "backbone": None, "variant": variant}  # fmt: skip


def _run_folder(exp: Path, stage: str, settings: dict, status: str = "done", overrides: dict | None = None) -> Path:
    s = settings
    key = f"{s['dataset']}_{s['method']}__{s['init']}__lf{s['label_fraction']}__s{s['seed']}"
    folder = exp / "runs" / stage / (key + (f"__{s['variant']}" if s["variant"] else ""))
    folder.mkdir(parents=True)
    (folder / "log.txt").write_text("log\n")
    record = {"stage": stage, "bundle": f"{s['dataset']}_{s['method']}", "settings": s, "overrides": overrides or {},
              "digest": "0" * 64, "status": status, "attempts": 1, "log": str(folder / "log.txt")}  # fmt: skip
    (folder / "run.json").write_text(json.dumps(record))
    return folder


def _evaluated(exp: Path, settings: dict, fractions: dict[str, float]) -> None:
    """An evaluate run whose metrics.json is written by the evaluate workflow's own writer."""
    folder = _run_folder(exp, "evaluate", settings)
    engine = SimpleNamespace(state=SimpleNamespace(metrics=fractions), data_loader=SimpleNamespace(dataset=[0] * 20))
    EvaluationWriter(
        folder, info={"dataset": settings["dataset"], "method": settings["method"], "tpp": settings["init"] != "random"}
    )(engine)


def _plan(exp: Path, not_started: tuple[str, ...] = (), **plan) -> None:
    """``plan.json`` as exp-core writes it: the plan and its graph (every node's stage and folder); the graph holds
    the run folders made so far plus the evaluate runs ``not_started``."""
    folders = [f for f in (exp / "runs").glob("*/*") if f.is_dir()] + [
        exp / "runs" / "evaluate" / k for k in not_started
    ]
    graph = {f"{f.parent.name}:{f.name}": {"stage": f.parent.name, "folder": str(f)} for f in folders}
    exp.mkdir(parents=True, exist_ok=True)
    (exp / "plan.json").write_text(json.dumps({**plan, "graph": graph}))


SEEDS = [0, 1, 2, 3]
ACC_RANDOM = {"adapter": [0.701, 0.712, 0.695, 0.720], "vpt": [0.650, 0.661, 0.640, 0.672]}
ACC_GAIN = {"adapter": [0.010, 0.015, 0.005, 0.020], "vpt": [0.010, -0.010, 0.020, -0.020]}  # fractions
HD_RANDOM = [52.0, 55.5, 49.0, 60.25]
HD_TPP_DROP = 2.0  # every seed: TPP has HD95 2 px lower
DICE_RANDOM = [0.801, 0.793, 0.812, 0.808]


@pytest.fixture(scope="module")
def grid_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    exp = tmp_path_factory.mktemp("exp") / "table3"
    for method in ("adapter", "vpt"):
        for i, seed in enumerate(SEEDS):
            acc_r = ACC_RANDOM[method][i]
            for init, acc in (("random", acc_r), ("tpp-mae", acc_r + ACC_GAIN[method][i])):
                _evaluated(
                    exp, _settings("mhist", method, init, 1.0, seed), {"acc": acc, "auc": acc + 0.05, "f1": acc - 0.01}
                )
    for i, seed in enumerate(SEEDS):
        _evaluated(
            exp, _settings("glas", "adapter", "random", 1.0, seed), {"dice": DICE_RANDOM[i], "hd95": HD_RANDOM[i]}
        )
        _evaluated(
            exp,
            _settings("glas", "adapter", "tpp-mae", 1.0, seed),
            {"dice": DICE_RANDOM[i] + 0.004, "hd95": HD_RANDOM[i] - HD_TPP_DROP},
        )
    # vpt on glas: seed 3 of TPP failed, seed 3 of random never started, seed 2 of TPP has a broken metrics.json
    for seed in (0, 1, 2):
        _evaluated(exp, _settings("glas", "vpt", "random", 1.0, seed), {"dice": 0.70 + seed / 100, "hd95": 60.0})
    for seed in (0, 1):
        _evaluated(exp, _settings("glas", "vpt", "tpp-mae", 1.0, seed), {"dice": 0.71 + seed / 100, "hd95": 59.0})
    (_run_folder(exp, "evaluate", _settings("glas", "vpt", "tpp-mae", 1.0, 2)) / "metrics.json").write_text("{broken")
    _run_folder(exp, "evaluate", _settings("glas", "vpt", "tpp-mae", 1.0, 3), status="failed")
    # TPP stage histories: `train_loss` (HistoryWriter), `pretext_loss`, and one without a loss column
    for seed, column, losses in ((0, "train_loss", [1.0, 0.8, 0.5]), (1, "pretext_loss", [0.9, 0.95, 0.97])):
        folder = _run_folder(exp, "pretrain_tpp", _settings("mhist", "adapter", "tpp-mae", None, seed))
        (folder / "history.csv").write_text(
            "epoch,lr," + column + "\n" + "".join(f"{e + 1},0.001,{v}\n" for e, v in enumerate(losses))
        )
    folder = _run_folder(exp, "pretrain_tpp", _settings("mhist", "adapter", "tpp-mae", None, 2))
    (folder / "history.csv").write_text("epoch,lr\n1,0.1\n")
    _plan(exp, ("glas_vpt__random__lf1.0__s3",), name="table3", paper="Table 3 (MedCoSS ViT-B/16, 2D classification)",
          datasets=["mhist", "glas"], methods=["adapter", "vpt"], init=["random", "tpp-mae"], label_fractions=[1.0],
          seeds=SEEDS, metrics=None)  # fmt: skip
    return write_report(exp), exp


def _bootstrap_by_hand(gains: list[float], resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """The documented procedure, written out: indices from default_rng(seed).integers(0, n, (R, n)), the mean of
    every resample, then linear-interpolated 2.5th and 97.5th percentiles of the sorted means."""
    n = len(gains)
    indices = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    means = sorted(sum(gains[j] for j in row) / n for row in indices.tolist())

    def quantile(q: float) -> float:
        pos = q * (len(means) - 1)
        lo = math.floor(pos)
        return means[lo] + (pos - lo) * (means[min(lo + 1, len(means) - 1)] - means[lo])

    return quantile(0.025), quantile(0.975)


def _gain(report: dict, dataset: str, method: str, metric: str) -> dict:
    (entry,) = [g for g in report["gain"] if (g["dataset"], g["method"], g["metric"]) == (dataset, method, metric)]
    return entry


def test_group_means_and_sample_std(grid_report):
    report, _ = grid_report
    for method in ("adapter", "vpt"):
        for init in ("random", "tpp-mae"):
            (record,) = [
                r
                for r in report["groups"]
                if (r["dataset"], r["method"], r["init"], r["metric"]) == ("mhist", method, init, "acc")
            ]
            values = [100 * (r + (g if init == "tpp-mae" else 0)) for r, g in zip(ACC_RANDOM[method], ACC_GAIN[method])]
            assert record["n"] == 4 and record["seeds"] == SEEDS
            assert record["mean"] == pytest.approx(sum(values) / 4)
            assert record["std"] == pytest.approx(statistics.stdev(values))  # sample std, ddof=1


def test_gain_interval_and_verdict_clearly_positive(grid_report):
    report, _ = grid_report
    g = _gain(report, "mhist", "adapter", "acc")
    gains = [100 * x for x in ACC_GAIN["adapter"]]
    assert g["seed_gains"] == pytest.approx(gains)
    assert g["gain_mean"] == pytest.approx(sum(gains) / 4)
    low, high = _bootstrap_by_hand(g["seed_gains"])
    assert g["ci95"] == pytest.approx([low, high], abs=1e-9)
    assert low > 0 and g["wins"] == 4 and g["n_seeds"] == 4
    assert g["verdict"].startswith(f"TPP gain +{sum(gains) / 4:.2f} ACC points [95 % CI +{low:.2f}, +{high:.2f}]")
    assert "over 4 seeds (4/4 wins)" in g["verdict"] and "TPP better" in g["verdict"]
    assert g["mean_random"] == pytest.approx(100 * sum(ACC_RANDOM["adapter"]) / 4)


def test_gain_not_distinguishable_when_symmetric(grid_report):
    report, exp = grid_report
    g = _gain(report, "mhist", "vpt", "acc")
    low, high = _bootstrap_by_hand(g["seed_gains"])
    assert g["ci95"] == pytest.approx([low, high], abs=1e-9)
    assert low < 0 < high and g["wins"] == 2
    assert "not distinguishable from zero" in g["verdict"]
    assert g["verdict"] in (exp / "report" / "report.md").read_text()


def test_identical_gains_give_a_point_interval_and_hd95_sign(grid_report):
    report, _ = grid_report
    hd = _gain(report, "glas", "adapter", "hd95")
    assert hd["gain_mean"] == pytest.approx(HD_TPP_DROP) and hd["ci95"] == pytest.approx([HD_TPP_DROP] * 2)
    assert hd["wins"] == 4 and hd["higher_is_better"] is False
    dice = _gain(report, "glas", "adapter", "dice")
    assert dice["ci95"] == pytest.approx([0.4, 0.4])


def test_missing_failed_and_unreadable_runs_are_listed(grid_report):
    report, exp = grid_report
    by_status = {(p["status"], p["run_key"]) for p in report["missing"]}
    assert ("failed", "glas_vpt__tpp-mae__lf1.0__s3") in by_status
    assert ("unreadable", "glas_vpt__tpp-mae__lf1.0__s2") in by_status
    not_started = [p for p in report["missing"] if p["status"] == "not started"]
    assert [p["run_key"] for p in not_started] == ["glas_vpt__random__lf1.0__s3"]
    failed = next(p for p in report["missing"] if p["status"] == "failed")
    assert failed["log"].endswith("log.txt")
    # what remains pairs on seeds 0 and 1 only
    g = _gain(report, "glas", "vpt", "dice")
    assert g["seeds"] == [0, 1] and g["n_seeds"] == 2
    md = (exp / "report" / "report.md").read_text()
    assert "glas_vpt__tpp-mae__lf1.0__s3" in md and failed["log"] in md


def test_report_shows_the_papers_table3_numbers(grid_report):
    report, exp = grid_report
    md = (exp / "report" / "report.md").read_text()
    table3 = load_paper()["tables"]["Table 3"]
    col = table3["columns"].index(["mhist", "acc"])
    for label in ("Adapter", "Adapter w/ TPP", "VPT"):
        row = next(r for r in table3["rows"] if r["label"] == label)
        paper_line = next(line for line in md.splitlines() if line.startswith("| ↳ paper, Table 3 | " + label + " |"))
        assert f"{row['values'][col]:.2f}" in paper_line
    adapter = next(
        r
        for r in report["groups"]
        if (r["dataset"], r["method"], r["init"], r["metric"]) == ("mhist", "adapter", "tpp-mae", "acc")
    )
    assert adapter["paper"] == {"table": "Table 3", "label": "Adapter w/ TPP", "value": 83.42}


def test_plots_and_tpp_loss_curve(grid_report):
    report, exp = grid_report
    names = {Path(p).name for p in report["plots"]}
    assert {"gain_adapter.png", "gain_vpt.png", "tpp_loss.png"} <= names
    assert all(Path(p).stat().st_size > 1000 for p in report["plots"])
    losses = {c["run_key"]: c for c in report["tpp_loss_curves"]}
    assert len(losses) == 2  # the history without a loss column is skipped
    falling, flat = losses["mhist_adapter__tpp-mae__lfNone__s0"], losses["mhist_adapter__tpp-mae__lfNone__s1"]
    assert (falling["first"], falling["last"], falling["falls"]) == (1.0, 0.5, True)
    assert (flat["first"], flat["last"], flat["falls"]) == (0.9, 0.97, False)
    saved = json.loads((exp / "report" / "report.json").read_text())
    assert saved["gain"] == json.loads(json.dumps(report["gain"]))


def test_label_fraction_curves(tmp_path: Path):
    exp = tmp_path / "fractions"
    fractions, seeds = [0.1, 0.5, 1.0], [0, 1, 2]
    expected = {}
    for fraction in fractions:
        for seed in seeds:
            for init, bonus in (("random", 0.0), ("tpp-mae", 0.02 * (1 - fraction) + 0.001 * seed)):
                dice = 0.5 + 0.3 * fraction + 0.01 * seed + bonus
                expected.setdefault((fraction, init), []).append(100 * dice)
                _evaluated(exp, _settings("qata", "adapter", init, fraction, seed), {"dice": dice, "hd95": 30.0})
    _plan(exp, name="fractions", paper=None, datasets=["qata"], methods=["adapter"], init=["random", "tpp-mae"],
          label_fractions=fractions, seeds=seeds, metrics=["dice"])  # fmt: skip
    report = write_report(exp, tmp_path / "out")
    assert (tmp_path / "out" / "fractions_qata_adapter.png").is_file()
    assert [c for c in report["columns"]] == [["qata", "dice"]]  # the plan's metric only
    for (fraction, init), values in expected.items():
        (record,) = [r for r in report["groups"] if (r["label_fraction"], r["init"]) == (fraction, init)]
        assert record["mean"] == pytest.approx(statistics.fmean(values))
        assert record["std"] == pytest.approx(statistics.stdev(values))
    gains = {g["label_fraction"]: g for g in report["gain"]}
    assert sorted(gains) == fractions
    assert gains[1.0]["gain_mean"] == pytest.approx(100 * 0.001)
    assert report["missing"] == []


def test_variant_rows_of_table11_and_metric_names(tmp_path: Path):
    """A TPP sub-grid named ``decoder-freeze`` whose TPP stage set ``mae_decoder: freeze`` is the paper's "Freeze" row;
    it pairs with the random runs (no variant); the plan's ``accuracy`` is the metrics.json key ``acc``."""
    exp = tmp_path / "table11"
    for seed in (0, 1, 2):
        tpp = _settings("chest_xray_pa", "adapter", "tpp-mae", None, seed, variant="decoder-freeze")
        _run_folder(exp, "pretrain_tpp", tpp, overrides={"mae_decoder": "freeze", "pretext": "mae"})
        _evaluated(exp, _settings("chest_xray_pa", "adapter", "random", 1.0, seed), {"acc": 0.90 + seed / 100})
        _evaluated(exp, _settings("chest_xray_pa", "adapter", "tpp-mae", 1.0, seed, variant="decoder-freeze"),
                   {"acc": 0.92 + seed / 100})  # fmt: skip
    axes = {"datasets": ["chest_xray_pa"], "methods": ["adapter"], "init": ["random"], "label_fractions": [1.0]}
    _plan(exp, name="table11", paper="Table 11 (MAE decoder during TPP)", seeds=[0, 1, 2], metrics=["accuracy"], **axes)
    report = write_report(exp)
    (tpp,) = [r for r in report["groups"] if r["init"] == "tpp-mae"]
    freeze = next(r for r in load_paper()["tables"]["Table 11"]["rows"] if r["label"] == "Freeze")
    assert tpp["paper"] == {"table": "Table 11", "label": "Freeze", "value": freeze["values"][0]}
    assert tpp["variant"] == {"variant": "decoder-freeze"} and tpp["paper_variant"] == {"mae_decoder": "freeze"}
    (gain,) = report["gain"]
    assert gain["metric"] == "acc" and gain["gain_mean"] == pytest.approx(2.0) and gain["n_seeds"] == 3
    assert report["columns"] == [["chest_xray_pa", "acc"]]


def test_transfer_rows_of_table7(tmp_path: Path):
    """TPP on another dataset's images is that dataset's row of Table 7; on the dataset's own images, its diagonal."""
    exp = tmp_path / "table7"
    transfer = {**_settings("mhist", "adapter", "transfer:glas:mae", 1.0, 0), "pretext": "mae", "source": "glas"}
    _evaluated(exp, transfer, {"acc": 0.8, "auc": 0.85, "f1": 0.79})
    _evaluated(exp, _settings("glas", "adapter", "tpp-mae", 1.0, 0), {"dice": 0.85, "hd95": 50.0})
    _plan(exp, name="table7", paper="Table 7 (cross-dataset TPP)", datasets=["mhist", "glas"], methods=["adapter"],
          init=["transfer:glas:mae"], label_fractions=[1.0], seeds=[0], metrics=None)  # fmt: skip
    report = write_report(exp)
    table7 = load_paper()["tables"]["Table 7"]
    rows = {r["label"]: r["values"] for r in table7["rows"]}
    cells = {(r["dataset"], r["metric"]): r["paper"] for r in report["groups"]}
    f1 = table7["columns"].index(["mhist", "f1"])
    hd = table7["columns"].index(["glas", "hd95"])
    assert cells[("mhist", "f1")] == {"table": "Table 7", "label": "GlaS", "value": rows["GlaS"][f1]}
    assert cells[("glas", "hd95")] == {"table": "Table 7", "label": "GlaS", "value": rows["GlaS"][hd]}


def test_summary_text_and_bad_folder(grid_report, tmp_path: Path):
    report, _ = grid_report
    text = summary_text(report)
    g = _gain(report, "mhist", "adapter", "acc")
    assert f"random {g['mean_random']:.2f} ± {g['std_random']:.2f} (n=4)" in text and g["verdict"] in text
    assert "3 run(s) missing, unfinished or failed" in text
    with pytest.raises(UserError, match="not found"):
        write_report(tmp_path / "nowhere")


def test_stats_edge_cases():
    assert stats.paired_bootstrap_ci([80.0], [79.0]) is None
    one = stats.summarise_gain("dice", [0], [80.0], [79.0])
    assert one.std_tpp is None and "too few seeds for an interval" in one.verdict and one.ci95 is None
    with pytest.raises(ValueError, match="equal lengths"):
        stats.paired_gains([1.0, 2.0], [1.0])
    worse = stats.summarise_gain("acc", [0, 1, 2], [70.0, 71.0, 69.0], [75.0, 76.5, 74.0])
    assert worse.ci95[1] < 0 and "TPP worse" in worse.verdict and worse.wins == 0


def test_paper_refs():
    assert paper_refs("Tables 3 and 4 (MedCoSS)") == ["Table 3", "Table 4"]
    assert paper_refs("Table 5-6, Figure 4") == ["Table 5", "Table 6", "Figure 4"]
    assert paper_refs(None) == []


# ---------------------------------------------------------------------------------------------------------------
# The transcription against the paper's text


def _paper_lines() -> list[str]:
    """The paper's text where shared/ is beside the repository, else the verbatim copy of its table lines."""
    return (PAPER_TEXT if PAPER_TEXT.is_file() else PAPER_TABLES).read_text().splitlines()


def test_table_lines_fixture_is_verbatim_from_the_paper():
    fixture = PAPER_TABLES.read_text().splitlines()
    assert sum("|" in line for line in fixture) > 60
    if not PAPER_TEXT.is_file():
        return  # nothing to compare with on this machine; the transcription test below uses the fixture
    text = PAPER_TEXT.read_text().splitlines()
    position = 0
    for line in fixture:  # every fixture line is a line of the paper, in the paper's order
        position = text.index(line, position) + 1


PAPER_NAMES = {
    "mhist": "MHIST",
    "oct_c8": "Retinal OCT-C8",
    "chest_xray_pa": "Chest X-ray PA",
    "glas": "GlaS",
    "qata": "QaTa",
    "lits": "LiTS",
    "kits": "KiTS",
}
PAPER_METRICS = {
    "acc": "ACC",
    "auc": "AUC",
    "f1": "F1",
    "ratio": "Ratio",
    "dice": "Dice",
    "hd95": "HD",
    "mean_dice": "Mean",
    "organ_dice": "Organ",
    "tumour_dice": "Tumor",
}
NUMBER = re.compile(r"\d+\.\d+")


@pytest.mark.parametrize("name", [n for n, t in load_paper()["tables"].items() if t["rows"]])
def test_transcription_matches_the_paper_text(name: str):
    lines = _paper_lines()
    tables = load_paper()["tables"]
    table = tables[name]
    headers = {t["header"] for t in tables.values() if t["header"]}
    start = [i for i, line in enumerate(lines) if line == table["header"]][table["occurrence"] - 1]
    end = next((i for i in range(start + 1, len(lines)) if lines[i] in headers or "|" not in lines[i]), len(lines))
    region = lines[start:end]
    # the header names the datasets, and the line below it the metrics, in the order of `columns`
    datasets = list(dict.fromkeys(d for d, _ in table["columns"]))
    positions = [region[0].index(PAPER_NAMES[d] + " |") for d in datasets]
    assert positions == sorted(positions), f"{name}: dataset order differs from the header {region[0]!r}"
    metric_cells = [c.strip() for c in region[1].split("|") if c.strip()]
    assert metric_cells == [PAPER_METRICS[m] for _, m in table["columns"]], f"{name}: metric columns differ"
    for row in table["rows"]:
        line = next((x for x in region[2:] if x.startswith(row["label"] + " |")), None)
        assert line is not None, f"{name}: no row {row['label']!r} in the table's text"
        cells = [c.strip() for c in line.split("|")[1:]]
        if row.get("modality") and cells[0] == row["modality"]:
            cells = cells[1:]
        text_values = [float(c) if NUMBER.fullmatch(c) else None for c in cells if NUMBER.fullmatch(c) or c == "-"]
        assert text_values == row["values"], f"{name} row {row['label']!r}: {line!r}"
