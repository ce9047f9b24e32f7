"""Experiment plans with huggingface peft methods and peft's data-driven LoRA initialisations (no runs)."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from tpp_monai.errors import ConfigError
from tpp_monai.experiments.graph import build_graph, command
from tpp_monai.experiments.plan import load_plan

PLAN = {"name": "p", "datasets": ["glas"], "methods": ["peft.lora", "peft.dora"], "seeds": [0]}


def test_peft_methods_plan_on_their_own_or_a_host_bundle(tmp_path) -> None:
    graph = build_graph(load_plan(PLAN), tmp_path)
    assert graph.counts() == {"pretrain_tpp": 2, "finetune": 4, "evaluate": 4}
    bundles = {(n.settings["method"], n.stage): (n.bundle, n.overrides.get("method")) for n in graph.nodes.values()}
    # peft.dora has its own bundle; peft.lora runs on glas_lora with method overridden, in every stage
    assert {bundles[("peft.dora", s)] for s in ("pretrain_tpp", "finetune", "evaluate")} == {("glas_peft_dora", None)}
    assert {bundles[("peft.lora", s)] for s in ("pretrain_tpp", "finetune", "evaluate")} == {("glas_lora", "peft.lora")}
    node = graph.nodes["finetune/glas_peft_lora__random__lf1.0__s0"]
    argv, values = command(node, graph)
    assert "glas_lora/configs/finetune.json" in argv[argv.index("--config_file") + 1]
    assert values["method"] == "peft.lora" and values["tpp_ckpt"] == "none"


def test_peft_inits_fine_tune_from_init_lora_weights_without_a_tpp_stage(tmp_path) -> None:
    inits = ["random", "tpp-mae", "tpp-dino", "peft-eva", "peft-pissa", "peft-olora", "peft-corda"]
    graph = build_graph(load_plan({**PLAN, "methods": ["peft.lora"], "init": inits}), tmp_path)
    finetunes = {n.settings["init"]: n for n in graph.nodes.values() if n.stage == "finetune"}
    assert sorted(finetunes) == sorted(inits)
    for name in ("eva", "pissa", "olora", "corda"):
        node = finetunes[f"peft-{name}"]
        options = {"init_lora_weights": name, **({"eva_config": {"rho": 1.0}} if name == "eva" else {})}
        assert node.deps == [] and node.overrides["method_options"] == options
        evaluate = graph.nodes[f"evaluate/{node.folder.name}"]
        assert evaluate.overrides["method_options"] == options  # the same network is built
        assert command(node, graph)[1]["tpp_ckpt"] == "none"
    assert [graph.nodes[d].stage for d in finetunes["tpp-mae"].deps] == ["pretrain_tpp"]
    assert "init_lora_weights" not in str(finetunes["tpp-mae"].overrides)


def test_a_peft_init_on_another_method_and_an_unknown_tuner_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"init 'peft-eva'.*applies to peft\.lora, not 'peft\.dora'"):
        load_plan({**PLAN, "init": ["peft-eva"]})
    with pytest.raises(ConfigError, match=r"peft\.nonesuch"):
        load_plan({**PLAN, "methods": ["peft.nonesuch"]})
    with pytest.raises(ConfigError, match="peft-eva, peft-pissa, peft-olora, peft-corda"):
        load_plan({**PLAN, "init": ["peft-svd"]})


def test_peft_tuners_preset_plans_every_tuner_and_every_init(tmp_path) -> None:
    from tpp_monai.peft import applicable_methods

    plan = load_plan("peft-tuners", overlays=["demo"])  # every bundle it runs has the demo overlay
    tuners = [m for m in applicable_methods("medcoss_vit_b16", with_sources=True) if m.startswith("peft.")]
    assert plan.grids[0]["methods"] == tuners  # the preset lists every tuner the installed peft applies
    graph = build_graph(plan, tmp_path)
    finetunes = [n for n in graph.nodes.values() if n.stage == "finetune"]
    peft_arms = [n for n in finetunes if n.settings["init"].startswith("peft-")]
    assert len(peft_arms) == 4 * len(plan.seeds) and all(n.deps == [] for n in peft_arms)
    assert graph.counts()["finetune"] == (2 * len(tuners) + 5) * len(plan.seeds)
    proc = run_cli("tpp_monai", "experiment", "plan", "peft-tuners", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert f"finetune {graph.counts()['finetune']}" in proc.stdout
    assert "glas_peft_lora__peft-eva__lf1.0__s0" in proc.stdout and not (tmp_path / "peft-tuners").exists()


def test_report_shows_a_peft_init_arms_cost_beside_its_gain(tmp_path) -> None:
    """A peft-eva arm against random (fabricated run folders in the experiments layout): the gain entry carries the
    mean seconds and peak memory of the peft-eva fine-tuning runs' init_cost.json, and the report's table shows it."""
    import json

    from test_experiment_report import _evaluated, _plan, _run_folder, _settings

    from tpp_monai.report.experiment import write_report
    from tpp_monai.report.markdown import cost_text
    from tpp_monai.workflows.costs import write_init_cost

    seconds, peaks = [2.0, 4.0, 6.0], [100.0, 300.0, 200.0]
    for seed in range(3):
        for init, dice in (("random", 0.80 + seed / 100), ("peft-eva", 0.82 + seed / 100)):
            settings = _settings("glas", "peft.lora", init, 1.0, seed)
            folder = _run_folder(tmp_path / "x", "finetune", settings)
            if init == "peft-eva":
                write_init_cost(folder, "peft-eva", seconds[seed], "cpu", (peaks[seed], "process_max_rss"))
            _evaluated(tmp_path / "x", settings, {"dice": dice, "hd95": 50.0})
    _plan(tmp_path / "x", name="x", datasets=["glas"], methods=["peft.lora"], init=["random", "peft-eva"],
          label_fractions=[1.0], seeds=[0, 1, 2], metrics=None)  # fmt: skip
    report = write_report(tmp_path / "x")
    (gain,) = [g for g in report["gain"] if g["init"] == "peft-eva" and g["metric"] == "dice"]
    cost = gain["cost"]["peft-eva"]
    assert cost["seconds"] == 4.0 and cost["peak_memory_mib"] == 200.0 and cost["kinds"] == ["peft-eva"]
    assert gain["cost"]["random"]["seconds"] == 0.0
    text = cost_text(cost)
    assert text.startswith("4.0 s, peak 200 MiB")
    tables = "\n".join(p.read_text() for p in (tmp_path / "x").rglob("*.md"))
    assert text in tables, json.dumps(report["gain"], default=str)[:2000]


@pytest.mark.slow
def test_peft_eva_runs_in_a_plan_next_to_tpp_mae_on_demo_data(tmp_path) -> None:
    """peft.lora on the GlaS demo (glas_lora's demo overlay, vit_tiny): TPP-MAE and peft's EVA arms, each through
    finetune and evaluate; the EVA fine-tuning leaves its init_cost.json and the TPP arm's cost is its TPP stage's.
    EVA's incremental SVD takes minutes on 2 CPU cores, hence slow."""
    import subprocess
    import sys

    import yaml

    from tpp_monai.report.experiment import write_report

    plan = {"name": "eva", "datasets": ["glas"], "methods": ["peft.lora"], "init": ["tpp-mae", "peft-eva"],
            "label_fractions": [1.0], "seeds": [0], "overlays": ["demo"],
            "overrides": {"num_workers": 0, "val_interval": 1, "backbone": "vit_tiny"},
            "stage_overrides": {"pretrain_tpp": {"tpp_epochs": 1, "warmup_epochs": 1}, "finetune": {"iterations": 4},
                                "evaluate": {"test#inferer#flips": []}}, "metrics": ["dice"]}  # fmt: skip
    (tmp_path / "eva.yaml").write_text(yaml.safe_dump(plan))
    argv = [sys.executable, "-m", "tpp_monai", "experiment", "run", str(tmp_path / "eva.yaml"), "--out",
            str(tmp_path / "out"), "--no-tracking"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    exp = tmp_path / "out" / "eva"
    cost = json.loads((exp / "runs/finetune/glas_peft_lora__peft-eva__lf1.0__s0/init_cost.json").read_text())
    assert cost["kind"] == "peft-eva" and cost["seconds"] > 0
    assert (exp / "runs/pretrain_tpp/glas_peft_lora__mae__s0/init_cost.json").is_file()
    for init in ("tpp-mae", "peft-eva"):
        assert (exp / f"runs/evaluate/glas_peft_lora__{init}__lf1.0__s0/metrics.json").is_file()
    report = write_report(exp)
    groups = {g["init"] for g in report["groups"]}
    assert {"tpp-mae", "peft-eva"} <= groups
