"""The main job (``python -m tpp_monai demo``) and the report it ends with."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from tpp_monai.report.runs import load_runs, make_report, summarise


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


DEMO_SEEDS = ("0", "1")  # two of the preset's three seeds: the smallest run with a paired interval


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, str, dict]:
    """One ``python -m tpp_monai demo`` (two seeds) for the tests below: its experiment folder, stdout and plan."""
    from tpp_monai.demo import load_demo_plan

    out = tmp_path_factory.mktemp("demo")
    proc = run_cli("tpp_monai", "demo", "--out", str(out), "--seeds", *DEMO_SEEDS)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    plan = load_demo_plan()
    return out / plan["name"], proc.stdout, {**plan, "seeds": [int(s) for s in DEMO_SEEDS]}


def _tpp_losses(exp: Path) -> dict[str, np.ndarray]:
    losses = {}
    for history in sorted((exp / "runs" / "pretrain_tpp").glob("*/history.csv")):
        with open(history, newline="") as f:
            losses[history.parent.name] = np.array([float(row["train_loss"]) for row in csv.DictReader(f)])
    return losses


def test_demo_runs_the_preset_and_prints_each_arm_and_the_gain_with_its_interval(demo_run) -> None:
    exp, out, plan = demo_run
    # every (init, seed) was evaluated; the printed mean ± std (n) are those of the metrics.json files
    dice: dict[str, dict[int, float]] = {}
    for folder in (exp / "runs" / "evaluate").iterdir():
        run = json.loads((folder / "run.json").read_text())
        metrics = json.loads((folder / "metrics.json").read_text())
        assert 0 <= metrics["metrics"]["dice"] <= 1
        dice.setdefault(run["settings"]["init"], {})[run["settings"]["seed"]] = metrics["percent"]["dice"]
    assert {init: sorted(seeds) for init, seeds in dice.items()} == {i: plan["seeds"] for i in plan["init"]}
    n = len(plan["seeds"])
    for init, seeds in dice.items():
        values = np.array([seeds[s] for s in plan["seeds"]])
        assert f"{init} {values.mean():.2f} ± {values.std(ddof=1):.2f} (n={n})" in out, init
    diffs = [dice["tpp-mae"][s] - dice["random"][s] for s in plan["seeds"]]
    assert f"tpp-mae gain {np.mean(diffs):+.2f} Dice points [95 % CI " in out
    assert f"over {n} seeds ({sum(d > 0 for d in diffs)}/{n} wins)" in out
    # the paper's gain beside it (Table 4, GlaS Dice, Adapter w/ TPP minus Adapter) and the three-case verdict
    from tpp_monai.experiments.paper import load_paper

    table4 = load_paper()["tables"]["Table 4"]
    col = table4["columns"].index(["glas", "dice"])
    paper = {r["label"]: r["values"][col] for r in table4["rows"] if r["method"] == "adapter"}
    assert f"paper {paper['Adapter w/ TPP'] - paper['Adapter']:+.2f} (Table 4" in out
    assert any(words in out for words in ("negligible: the interval excludes 0", "of the paper's order",
                                          "no effect distinguishable from zero"))  # fmt: skip
    assert f"with {n} seeds the interval is just the seeds' range" in out and "seeds would detect the paper's" in out
    # iterations to 95 % of random's best validation Dice, recomputed from the fine-tuning runs' history.csv
    curves: dict[str, dict[int, list]] = {}
    for history in (exp / "runs" / "finetune").glob("*/history.csv"):
        s = json.loads((history.parent / "run.json").read_text())["settings"]
        with open(history, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("val_dice")]
        curves.setdefault(s["init"], {})[s["seed"]] = [(int(r["iteration"]), 100 * float(r["val_dice"])) for r in rows]
    target = 0.95 * np.mean([max(v for _, v in curves["random"][s]) for s in plan["seeds"]])
    assert f"iterations to 95 % of random's best validation Dice ({target:.2f};" in out
    for init in ("random", "tpp-mae"):
        hits = [next((i for i, v in curves[init][s] if v >= target), None) for s in plan["seeds"]]
        reached = [h for h in hits if h is not None]
        text = f"never reached ({n} runs)" if not reached else f"{np.mean(reached):.0f}"
        assert f"{init} {text}" in out, (init, hits)
    assert "ratio tpp-mae/random" in out or "no ratio" in out
    # each TPP stage's loss per epoch is printed from its history and plotted
    losses = _tpp_losses(exp)
    assert len(losses) == n
    for name, curve in losses.items():
        assert len(curve) == plan["stage_overrides"]["pretrain_tpp"]["tpp_epochs"]
        assert f"{name}: epoch 1 {curve[0]:.3f} -> epoch {len(curve)} {curve[-1]:.3f}" in out
    plots = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("plot:")]
    assert any(p.endswith("tpp_loss.png") for p in plots)
    assert plots and all(Path(plot).stat().st_size > 1000 for plot in plots), plots


def test_demo_tpp_stage_learns_beyond_predicting_each_patch_mean(demo_run) -> None:
    exp, _, _ = demo_run
    # With norm_pix targets (zero mean, unbiased unit variance over the P = 16*16*3 values of a patch), predicting
    # each hidden patch's mean gives a loss of (P - 1) / P. The stage learns when its last epochs fall clearly below
    # its first epoch and below that level (the textured targets before stayed at it).
    values = 16 * 16 * 3
    mean_prediction = (values - 1) / values
    for name, curve in _tpp_losses(exp).items():
        last = curve[-5:].mean()
        assert last < 0.97 * curve[0] and last < mean_prediction, (name, curve)


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
