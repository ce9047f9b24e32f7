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
from tpp_monai.handlers import EvaluationWriter
from tpp_monai.report.experiment import write_report
from tpp_monai.report.markdown import summary_text

# the table lines of the paper's text (Lei et al., a text extraction of the arXiv PDF), verbatim, in the paper's order
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
    text = g["verdict"]["text"]
    assert text.startswith(f"tpp-mae gain +{sum(gains) / 4:.2f} ACC points [95 % CI +{low:.2f}, +{high:.2f}]")
    assert "over 4 seeds (4/4 wins)" in text
    assert g["mean_random"] == pytest.approx(100 * sum(ACC_RANDOM["adapter"]) / 4)


def test_gain_not_distinguishable_when_symmetric(grid_report):
    report, exp = grid_report
    g = _gain(report, "mhist", "vpt", "acc")
    low, high = _bootstrap_by_hand(g["seed_gains"])
    assert g["ci95"] == pytest.approx([low, high], abs=1e-9)
    assert low < 0 < high and g["wins"] == 2
    assert g["verdict"]["case"] == "no_effect" and "the interval contains 0" in g["verdict"]["text"]
    assert g["verdict"]["text"] in (exp / "report" / "report.md").read_text()


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
    assert f"random {g['mean_random']:.2f} ± {g['std_random']:.2f} (n=4)" in text and g["verdict"]["text"] in text
    assert "3 run(s) missing, unfinished or failed" in text
    with pytest.raises(UserError, match="not found"):
        write_report(tmp_path / "nowhere")


def test_stats_edge_cases():
    assert stats.paired_bootstrap_ci([80.0], [79.0]) is None
    one = stats.summarise_gain("dice", [0], [80.0], [79.0])
    assert one.std_tpp is None and "too few seeds for an interval" in one.verdict["text"] and one.ci95 is None
    assert one.verdict["case"] == "too_few_seeds" and one.detectable_effect is None
    with pytest.raises(ValueError, match="equal lengths"):
        stats.paired_gains([1.0, 2.0], [1.0])
    worse = stats.summarise_gain("acc", [0, 1, 2], [70.0, 71.0, 69.0], [75.0, 76.5, 74.0])
    assert worse.ci95[1] < 0 and worse.verdict["case"] == "worse" and worse.wins == 0
    assert "the paper has no gain for this cell" in worse.verdict["text"]


def test_paper_refs():
    assert paper_refs("Tables 3 and 4 (MedCoSS)") == ["Table 3", "Table 4"]
    assert paper_refs("Table 5-6, Figure 4") == ["Table 5", "Table 6", "Figure 4"]
    assert paper_refs(None) == []


# ---------------------------------------------------------------------------------------------------------------
# The transcription against the paper's text


def _paper_lines() -> list[str]:
    """The paper's table lines (the fixture copied verbatim from its text)."""
    return PAPER_TABLES.read_text().splitlines()


def test_table_lines_fixture_holds_the_papers_tables():
    fixture = PAPER_TABLES.read_text().splitlines()
    assert sum("|" in line for line in fixture) > 60


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


# ---------------------------------------------------------------------------------------------------------------
# Effect sizes beside the paper's, and convergence from the fine-tuning runs' history.csv


def _mde_by_hand(gains: list[float]) -> float:
    """(t_{0.975, n-1} + t_{0.80, n-1}) * s_d / sqrt(n), from scipy's t quantiles."""
    from scipy.stats import t

    n = len(gains)
    return float((t.ppf(0.975, n - 1) + t.ppf(0.80, n - 1)) * statistics.stdev(gains) / math.sqrt(n))


def test_paper_gain_detectable_effect_and_seeds_needed(grid_report):
    report, exp = grid_report
    g = _gain(report, "mhist", "adapter", "acc")
    table3 = load_paper()["tables"]["Table 3"]
    col = table3["columns"].index(["mhist", "acc"])
    rows = {r["label"]: r["values"][col] for r in table3["rows"] if r["method"] == "adapter"}
    assert g["paper_gain"] == pytest.approx(rows["Adapter w/ TPP"] - rows["Adapter"])
    assert g["detectable_effect"] == pytest.approx(_mde_by_hand(g["seed_gains"]))
    spread = statistics.stdev(g["seed_gains"])
    needed = next(n for n in range(2, 1000) if _mde_by_hand_spread(n, spread) <= g["paper_gain"])
    assert g["seeds_needed"] == needed
    negligible = g["gain_mean"] < 0.1 * g["paper_gain"] or g["gain_mean"] < g["detectable_effect"]
    assert g["verdict"]["case"] == ("negligible" if negligible else "paper_order")
    assert f"paper {g['paper_gain']:+.2f} (Table 3" in g["verdict"]["text"]
    assert "with 4 seeds the interval is nearly the seeds' range" in g["verdict"]["text"]
    assert f"{needed} seeds would detect the paper's gain" in g["verdict"]["text"]
    # HD95: the paper's gain is random minus TPP (Table 4 lists TPP lower), as the report's gain
    hd = _gain(report, "glas", "adapter", "hd95")
    assert hd["paper_gain"] == pytest.approx(49.06 - 44.25) and hd["paper_gain"] > 0
    md = (exp / "report" / "report.md").read_text()
    assert "paper's gain" in md and "detectable effect" in md and "seeds needed" in md


def _mde_by_hand_spread(n: int, spread: float) -> float:
    from scipy.stats import t

    return float((t.ppf(0.975, n - 1) + t.ppf(0.80, n - 1)) * spread / math.sqrt(n))


def test_verdict_three_cases():
    seeds = [0, 1, 2]
    random = [80.0, 81.0, 79.5]
    # +0.02 points on every seed, tiny spread: the interval excludes 0 but the gain is a twentieth of the paper's
    tiny = stats.summarise_gain("dice", seeds, [r + g for r, g in zip(random, [0.019, 0.020, 0.021])], random,
                                paper_gain=0.43)  # fmt: skip
    assert tiny.ci95[0] > 0 and tiny.verdict["case"] == "negligible"
    assert "under a tenth of the paper's gain" in tiny.verdict["text"]
    assert "with 3 seeds the interval is just the seeds' range" in tiny.verdict["text"]
    assert f"{tiny.seeds_needed} seeds would detect the paper's gain" in tiny.verdict["text"]
    assert tiny.seeds_needed == next(n for n in range(2, 100) if _mde_by_hand_spread(n, 0.001) <= 0.43)
    order = stats.summarise_gain("dice", seeds, [r + g for r, g in zip(random, [0.40, 0.45, 0.50])], random,
                                 paper_gain=0.43)  # fmt: skip
    assert order.verdict["case"] == "paper_order" and order.gain_mean >= order.detectable_effect
    none = stats.summarise_gain("dice", seeds, [r + g for r, g in zip(random, [0.3, -0.2, 0.1])], random,
                                paper_gain=0.43)  # fmt: skip
    assert none.ci95[0] < 0 < none.ci95[1] and none.verdict["case"] == "no_effect"
    many = stats.summarise_gain("dice", list(range(6)), [81.0, 82.0, 80.0, 81.5, 80.5, 81.2],
                                [80.0, 81.5, 79.0, 80.0, 80.0, 80.1], paper_gain=0.43)  # fmt: skip
    assert "seeds' range" not in many.verdict["text"]


CONV_VAL = {  # per arm, per seed: val_dice (fraction) at iterations 10, 20, 30, 40
    "random": {0: [0.50, 0.70, 0.78, 0.80], 1: [0.45, 0.66, 0.80, 0.82], 2: [0.40, 0.60, 0.75, 0.81]},
    "tpp-mae": {0: [0.72, 0.79, 0.81, 0.82], 1: [0.60, 0.74, 0.80, 0.83], 2: [0.40, 0.50, 0.60, 0.70]},
}


@pytest.fixture(scope="module")
def conv_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """GlaS Adapter at label fractions 0.5 and 1.0, 3 seeds; the fine-tuning runs' history.csv validate every other
    epoch; seed 2 of TPP never reaches the target; the same curves at both fractions."""
    exp = tmp_path_factory.mktemp("exp") / "conv"
    for fraction in (0.5, 1.0):
        for init, by_seed in CONV_VAL.items():
            for seed, values in by_seed.items():
                s = _settings("glas", "adapter", init, fraction, seed)
                folder = _run_folder(exp, "finetune", s)
                lines = ["epoch,iteration,train_loss,lr,elapsed_s,val_dice"]
                for k in range(8):  # 5 iterations per epoch, validation every 2 epochs
                    val = values[k // 2] if k % 2 == 1 else ""
                    lines.append(f"{k + 1},{5 * (k + 1)},0.5,0.001,{1.5 * (k + 1) + seed:.3f},{val}")
                (folder / "history.csv").write_text("\n".join(lines) + "\n")
                _evaluated(exp, s, {"dice": values[-1] * fraction, "hd95": 50.0 - 10 * values[-1]})
    _plan(exp, name="conv", paper="Table 4 (MedCoSS)", datasets=["glas"], methods=["adapter"],
          init=["random", "tpp-mae"], label_fractions=[0.5, 1.0], seeds=[0, 1, 2], metrics=None)  # fmt: skip
    return write_report(exp), exp


def _history_by_hand(path: Path) -> list[tuple[int, float, float]]:
    """(iteration, elapsed_s, val_dice in percent) of the validated rows of one history.csv."""
    import csv

    with open(path, newline="") as f:
        return [(int(r["iteration"]), float(r["elapsed_s"]), 100 * float(r["val_dice"]))
                for r in csv.DictReader(f) if r["val_dice"]]  # fmt: skip


def test_convergence_matches_the_runs_history_files(conv_report):
    report, exp = conv_report
    for fraction in (0.5, 1.0):
        (g,) = [g for g in report["gain"] if g["metric"] == "dice" and g["label_fraction"] == fraction]
        conv = g["convergence"]
        curves = {init: {} for init in CONV_VAL}
        for folder in (exp / "runs" / "finetune").glob("*/"):
            s = json.loads((folder / "run.json").read_text())["settings"]
            if s["label_fraction"] == fraction:
                curves[s["init"]][s["seed"]] = _history_by_hand(folder / "history.csv")
        target = 0.95 * statistics.mean(max(v for _, _, v in c) for c in curves["random"].values())
        assert conv["metric"] == "val_dice" and conv["target"] == pytest.approx(target)
        expected = {}
        for init, by_seed in curves.items():
            hits = [next(((i, t) for i, t, v in by_seed[s] if v >= target), (None, None)) for s in (0, 1, 2)]
            expected[init] = hits
            assert conv["iterations"][init] == [h[0] for h in hits]
            assert conv["seconds"][init] == [h[1] for h in hits]
            assert conv["reached"][init] == [h[0] is not None for h in hits]
            reached = [h[0] for h in hits if h[0] is not None]
            assert conv["summary"][init]["iterations"]["mean"] == pytest.approx(statistics.mean(reached))
            assert conv["summary"][init]["iterations"]["reached"] == len(reached)
        assert expected["tpp-mae"][2] == (None, None)  # never reached: reported, not dropped
        assert conv["budget"]["tpp-mae"] == [40, 40, 40] and conv["ratio_excluded"] == 1
        both = [k for k in range(3) if expected["tpp-mae"][k][0] and expected["random"][k][0]]
        logs = [math.log(expected["tpp-mae"][k][0] / expected["random"][k][0]) for k in both]
        assert conv["ratio"] == pytest.approx(math.exp(statistics.mean(logs)))
        assert conv["ratio_ci"][0] <= conv["ratio"] <= conv["ratio_ci"][1]
        # HD95 validated no column of its own: measured on the model-selection column, named in the entry
        (hd,) = [g for g in report["gain"] if g["metric"] == "hd95" and g["label_fraction"] == fraction]
        assert hd["convergence"]["metric"] == "val_dice" and hd["convergence"]["iterations"] == conv["iterations"]
    md = (exp / "report" / "report.md").read_text()
    assert "## Convergence: iterations to the target" in md
    assert "(2/3 reached)" in md
    text = summary_text(report)
    assert "iterations to 95 % of random's best validation Dice" in text and "ratio tpp-mae/random" in text
    names = sorted(Path(p).name for p in report["plots"])
    assert "convergence_adapter.png" in names and "fractions_glas_adapter.png" in names
