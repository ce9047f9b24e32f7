"""The main job (``python -m tpp_monai demo``) and the report it ends with."""

from __future__ import annotations

import json
from pathlib import Path

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


def test_demo_runs_end_to_end_and_prints_its_table(tmp_path) -> None:
    proc = run_cli("tpp_monai", "demo", "--out", str(tmp_path), timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "| method | glas DICE | glas HD95 |" in out
    assert "| adapter w/ TPP (MAE) |" in out and "| adapter |" in out
    assert "mlflow ui --backend-store-uri sqlite:///" in out
    for name in ("results.md", "results.csv", "curves.png", "tpp_gain.png", "overlays_glas.png"):
        assert (tmp_path / "report" / name).is_file(), name
    for variant in ("tpp", "random"):
        metrics = json.loads((tmp_path / "runs" / f"evaluate_{variant}" / "metrics.json").read_text())
        assert metrics["run_info"]["tpp"] is (variant == "tpp")
        assert 0 <= metrics["metrics"]["dice"] <= 1
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("glas_adapter").experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(
        ["pretrain_tpp_mae", "finetune_tpp", "finetune_random", "evaluate_tpp", "evaluate_random"]
    )
    assert all(r.info.status == "FINISHED" for r in runs)
