"""The main job (``python -m tpp_monai demo``) and the report it ends with."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from tpp_monai.report import load_runs, make_report, summarise


def _fake_run(folder: Path, method: str, tpp: bool, seed: int, dice: float, hd95: float) -> Path:
    folder.mkdir(parents=True)
    info = {"dataset": "glas", "method": method, "tpp": tpp, "tpp_pretext": "mae" if tpp else None, "seed": seed}
    (folder / "metrics.json").write_text(json.dumps({"metrics": {}, "percent": {"dice": dice, "hd95": hd95},
                                                     "run_info": info}))  # fmt: skip
    return folder


def test_report_groups_seeds_into_mean_and_std(tmp_path) -> None:
    runs = [
        _fake_run(tmp_path / "a0", "adapter", False, 0, 80.0, 10.0),
        _fake_run(tmp_path / "a1", "adapter", False, 1, 82.0, 12.0),
        _fake_run(tmp_path / "t0", "adapter", True, 0, 84.0, 8.0),
        _fake_run(tmp_path / "t1", "adapter", True, 1, 86.0, 6.0),
    ]

    header, rows, _ = summarise(load_runs(runs))
    assert header == ["method", "glas DICE", "glas HD95"]
    assert rows == [
        ["adapter", "81.00 ± 1.41", "11.00 ± 1.41"],
        ["adapter w/ TPP (MAE)", "85.00 ± 1.41", "7.00 ± 1.41"],
    ]
    result = make_report(runs, tmp_path / "report")
    assert (tmp_path / "report" / "results.csv").read_text().count("\n") == 5  # header + 2 methods x 2 metrics
    assert (tmp_path / "report" / "tpp_gain.png").stat().st_size > 1000
    assert "85.00 ± 1.41" in result["table"]


def test_report_names_a_folder_without_metrics(tmp_path) -> None:
    proc = run_cli("tpp_monai", "report", str(tmp_path), "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and "no metrics.json" in proc.stderr and str(tmp_path) in proc.stderr
    (tmp_path / "metrics.json").write_text('{"metrics": {}')  # cut short
    proc = run_cli("tpp_monai", "report", str(tmp_path), "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and "not a metrics.json written by `evaluate`" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_report_tabulates_3d_organ_and_tumour_dice(tmp_path) -> None:
    folder = tmp_path / "lits"
    folder.mkdir()
    percent = {"mean_dice": 70.0, "organ_dice": 90.0, "tumour_dice": 50.0, "organ_label1_dice": 91.0}
    info = {"dataset": "lits", "method": "conv_adapter", "tpp": True, "tpp_pretext": "dino"}
    (folder / "metrics.json").write_text(json.dumps({"metrics": {}, "percent": percent, "run_info": info}))
    header, rows, _ = summarise(load_runs([folder]))
    assert header == ["method", "lits ORGAN_DICE", "lits TUMOUR_DICE", "lits MEAN_DICE"]
    assert rows == [["conv_adapter w/ TPP (DINO)", "90.00", "50.00", "70.00"]]
    make_report([folder], tmp_path / "report")
    assert (tmp_path / "report" / "results.csv").is_file()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, str, dict]:
    """One ``python -m tpp_monai demo`` for the tests below: its experiment folder, stdout and plan."""
    from tpp_monai.demo import load_demo_plan

    out = tmp_path_factory.mktemp("demo")
    proc = run_cli("tpp_monai", "demo", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    plan = load_demo_plan()
    return out / plan["name"], proc.stdout, plan


def _tpp_losses(exp: Path) -> dict[str, np.ndarray]:
    losses = {}
    for history in sorted((exp / "runs" / "pretrain_tpp").glob("*/history.csv")):
        with open(history, newline="") as f:
            losses[history.parent.name] = np.array([float(row["train_loss"]) for row in csv.DictReader(f)])
    return losses


DEMO_OPEN = (
    "issue 13 item 7 is open: the demo preset has not yet run to completion on a quiet machine since the experiment "
    "package landed; run these two when the demo's TPP stage learns"
)


@pytest.mark.skip(reason=DEMO_OPEN)
def test_demo_runs_the_preset_and_prints_the_gain_with_its_interval(demo_run) -> None:
    exp, out, plan = demo_run
    # every (init, seed) of the preset was evaluated; the printed means are those of the metrics.json files
    dice: dict[str, dict[int, float]] = {}
    for folder in (exp / "runs" / "evaluate").iterdir():
        run = json.loads((folder / "run.json").read_text())
        metrics = json.loads((folder / "metrics.json").read_text())
        assert 0 <= metrics["metrics"]["dice"] <= 1
        dice.setdefault(run["settings"]["init"], {})[run["settings"]["seed"]] = metrics["percent"]["dice"]
    assert {init: sorted(seeds) for init, seeds in dice.items()} == {i: sorted(plan["seeds"]) for i in plan["init"]}
    for init, seeds in dice.items():
        values = np.array([seeds[s] for s in plan["seeds"]])
        assert f"{values.mean():6.2f} ± {values.std(ddof=1):.2f}" in out, init
    gain = np.mean([dice["tpp-mae"][s] - dice["random"][s] for s in plan["seeds"]])
    assert f"gain (TPP - random): {gain:+.2f}, 95 % interval [" in out
    assert "verdict: " in out and f"{len(plan['seeds'])} seeds" in out
    # each TPP stage recorded its loss per epoch, and the demo printed it
    losses = _tpp_losses(exp)
    assert len(losses) == len(plan["seeds"])
    for name, curve in losses.items():
        assert len(curve) == plan["stage_overrides"]["pretrain_tpp"]["tpp_epochs"]
        assert f"{name}: epoch 1 {curve[0]:.3f} -> epoch {len(curve)} {curve[-1]:.3f}" in out
    plots = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("plot:")]
    assert plots and all(Path(plot).stat().st_size > 1000 for plot in plots), plots


@pytest.mark.xfail(
    strict=True,
    reason="issue 13 item 7 not met yet: at demo scale (64 px, 16 px patches, 4 visible) the MAE loss stays at the "
    "patch-mean level; see the exp-demo report. Remove this mark when the demo's TPP stage learns.",
)
@pytest.mark.skip(reason=DEMO_OPEN)
def test_demo_tpp_stage_learns_beyond_predicting_each_patch_mean(demo_run) -> None:
    exp, _, _ = demo_run
    # With norm_pix targets (zero mean, unbiased unit variance over the P = 16*16*3 values of a patch), predicting
    # each hidden patch's mean gives a loss of (P - 1) / P. The stage learns when its last epochs are clearly below.
    values = 16 * 16 * 3
    mean_prediction = (values - 1) / values
    for name, curve in _tpp_losses(exp).items():
        assert curve[-3:].mean() < 0.95 * mean_prediction, (name, curve)


def test_demo_gain_pairs_seeds_and_bootstraps_its_interval() -> None:
    import statistics

    from tpp_monai.demo import format_gains, gains

    random, tpp = {0: 80.0, 1: 82.0, 2: 81.0}, {0: 83.0, 1: 86.0, 2: 80.5}
    records = [{"settings": {"dataset": "glas", "method": "adapter", "label_fraction": 0.25, "init": init,
                             "seed": seed}, "metrics": {"dice": value}}
               for init, arm in (("random", random), ("tpp-mae", tpp)) for seed, value in arm.items()]  # fmt: skip
    (entry,) = gains(records, "dice")
    diffs = [tpp[s] - random[s] for s in random]
    assert entry["mean_random"] == statistics.mean(random.values())
    assert abs(entry["std_tpp"] - statistics.stdev(tpp.values())) < 1e-12
    assert abs(entry["gain_mean"] - statistics.mean(diffs)) < 1e-12
    low, high = entry["ci95"]
    # every bootstrap mean of the three differences lies between their smallest and largest
    assert min(diffs) <= low <= entry["gain_mean"] <= high <= max(diffs)
    assert entry["wins"] == sum(d > 0 for d in diffs) and entry["n_seeds"] == 3
    assert ("contains 0" in entry["verdict"]) == (low <= 0 <= high)
    text = format_gains([entry])
    assert f"{statistics.mean(tpp.values()):6.2f} ± {statistics.stdev(tpp.values()):.2f}" in text
    assert f"[{low:+.2f}, {high:+.2f}]" in text


def test_demo_target_is_deterministic_in_the_official_layout(tmp_path) -> None:
    from tpp_monai.data import build_datalist, make_demo_dataset
    from tpp_monai.errors import ConfigError

    a = make_demo_dataset("glas", tmp_path / "a", n=12, appearance="ihc")
    b = make_demo_dataset("glas", tmp_path / "b", n=12, appearance="ihc")
    files = sorted(p.name for p in a.iterdir() if not p.name.startswith("."))
    assert files == sorted(p.name for p in b.iterdir() if not p.name.startswith("."))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    he = make_demo_dataset("glas", tmp_path / "he", n=12)
    assert (he / "train_1.bmp").read_bytes() != (a / "train_1.bmp").read_bytes()
    datalist = build_datalist("glas", a)
    assert sum(len(datalist[k]) for k in ("training", "validation", "test")) == 12
    with pytest.raises(ConfigError, match="unknown appearance 'he2'; valid: ihc"):
        make_demo_dataset("glas", tmp_path / "c", n=12, appearance="he2")
