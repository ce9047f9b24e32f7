"""``python -m tpp_monai demo``: does TPP help? The ``demo`` experiment preset, end to end, on embedded data.

1. stands in for the MedCoSS pre-training: a tiny MedCoSS ViT is pre-trained with MAE on the *other* 2D demo
   datasets and saved in the MedCoSS checkpoint format, MAE decoder included, so the TPP stage inherits the decoder
   as the paper does (§5.5); cached in ``<out>/upstream``;
2. writes the target: a synthetic GlaS-layout dataset with an IHC-like stain none of the upstream data has
   (``make_demo_dataset('glas', ..., appearance='ihc')``);
3. runs the preset ``tpp_monai/experiments/presets/demo.yaml``: per seed one ``pretrain_tpp`` (MAE on all training
   images), then ``finetune`` + ``evaluate`` from the TPP target parameters and from random ones, each on the
   preset's label fraction (few labels);
4. reports mean ± std per arm, the paired gain with its bootstrap 95 % interval and the TPP stage's loss curves.

Everything is tiny (64 px images, a 4-layer ViT, a few hundred steps) so it runs on 2 CPU cores; its numbers say
whether TPP helps on this synthetic task, not the paper's results.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import time
from pathlib import Path

from tpp_monai.bundlegen import BUNDLES_DIR, workflow_config_files
from tpp_monai.data.info import DATASETS
from tpp_monai.errors import ConfigError

PRESET = Path(__file__).resolve().parent / "experiments" / "presets" / "demo.yaml"
TARGET_APPEARANCE = "ihc"  # the target look the upstream stand-in never saw
TARGET_IMAGES = 80  # 32 training images (all for TPP, 8 labelled at the preset's fraction), 9 validation, 39 test
UPSTREAM_EPOCHS = 30


def pretrain_upstream(target: str, folder: Path, epochs: int = UPSTREAM_EPOCHS, seed: int = 0) -> Path:
    """MAE pre-training of the tiny MedCoSS backbone on the other 2D demo datasets; returns the checkpoint path.

    All tensors are trained here (this is the backbone's own pre-training, not TPP). The file has the MedCoSS
    pre-training container ``{"model": encoder + MAE decoder state, "epoch"}``. One file per target and seed, reused
    by later runs (the public checkpoint the paper starts every experiment from).
    """
    import torch
    from monai.data import CacheDataset, DataLoader

    from tpp_monai.backbones import build_backbone, get_backbone_spec
    from tpp_monai.engines import plain_tensor
    from tpp_monai.pretext.mae import MAEPretext, MaskedPatchLoss
    from tpp_monai.pretext.transforms import mae_transforms
    from tpp_monai.workflows import demo_dataset, images_of

    path = folder / f"tiny_medcoss_without_{target}_seed{seed}_ep{epochs}.pth"
    if path.is_file():
        print(f"\n=== upstream: reusing {path}")
        return path
    torch.manual_seed(seed)
    sources = [d for d, i in DATASETS.items() if i.spatial_dims == 2 and d != target]
    data = []
    for name in sources:
        root = demo_dataset(name, str(folder / "upstream_data"))
        data.append(CacheDataset(images_of(root + "/datalist.json", root), mae_transforms(name, 64, (64, 64)),
                                 progress=False))  # fmt: skip
    loader = DataLoader(torch.utils.data.ConcatDataset(data), batch_size=16, shuffle=True, drop_last=True)
    encoder = build_backbone("medcoss_vit_tiny", task="features")
    net = MAEPretext(encoder, "random", 64, decoder=get_backbone_spec("medcoss_vit_tiny").mae_decoder)
    net.requires_grad_(True)
    loss_fn = MaskedPatchLoss(encoder.patch_size)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1.5e-3, betas=(0.9, 0.95), weight_decay=0.05)
    print(f"\n=== upstream: MAE pre-training of the tiny MedCoSS backbone on {', '.join(sources)} demo images")
    for epoch in range(epochs):
        total = 0.0
        for batch in loader:
            image = plain_tensor(batch["image"])
            loss = loss_fn(net(image), image)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        if epoch % 5 == 4 or epoch == epochs - 1:
            print(f"epoch {epoch + 1}/{epochs}: MAE loss {total / len(loader):.4f}")
    state = {**encoder.state_dict(), **{k: v for k, v in net.decoder.state_dict().items()}}
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, "epoch": epochs}, path)
    return path


def make_target_data(dataset: str, folder: Path) -> str:
    """The demo's target dataset (official layout, unseen appearance) with its datalist; returns its root."""
    from tpp_monai.data import build_datalist, make_demo_dataset, write_datalist

    root = make_demo_dataset(dataset, folder, n=TARGET_IMAGES, appearance=TARGET_APPEARANCE)
    write_datalist(build_datalist(dataset, root), root / "datalist.json")
    return str(root)


# --------------------------------------------------------------------------------------------------------------
# The plan


def load_demo_plan(path: str | Path = PRESET) -> dict:
    """The preset as a plain dict (the contract's plan format), checked for what the demo uses."""
    import yaml

    plan = yaml.safe_load(Path(path).read_text())
    missing = {"name", "datasets", "methods", "init", "label_fractions", "seeds"} - set(plan or {})
    if missing:
        raise ConfigError(f"{path}: the plan lacks {', '.join(sorted(missing))}; see tpp_monai/experiments/presets")
    bad = set(plan["init"]) - {"random", "tpp-mae", "tpp-dino"}
    if bad:
        raise ConfigError(f"{path}: the demo runs init random/tpp-mae/tpp-dino, not {', '.join(sorted(bad))}")
    return plan


def resolve_plan(plan: dict, dataset_dir: str, backbone_ckpt: Path, seeds: list[int] | None = None) -> dict:
    """The preset with this machine's paths (the generated target data, the upstream checkpoint) filled in."""
    resolved = json.loads(json.dumps(plan))
    if seeds is not None:
        resolved["seeds"] = list(seeds)
    resolved.setdefault("overrides", {})["backbone_ckpt"] = str(backbone_ckpt)
    for dataset in resolved["datasets"]:
        resolved.setdefault("dataset_overrides", {}).setdefault(dataset, {})["dataset_dir"] = dataset_dir
    return resolved


def run_plan(plan: dict, out: Path) -> Path:
    """Run the resolved plan; returns the experiment folder (``<out>/<name>``, the contract's layout).

    Uses exp-core's ``tpp_monai.experiments.run_experiment`` when it is installed; until then the same runs go
    through :func:`_run_plan_locally`.
    """
    try:
        from tpp_monai.experiments import run_experiment
        from tpp_monai.experiments.plan import load_plan
    except ImportError:
        return _run_plan_locally(plan, out)
    plan_file = out / f"{plan['name']}_plan.json"
    plan_file.write_text(json.dumps(plan, indent=2) + "\n")
    return Path(run_experiment(load_plan(str(plan_file)), out))


def _run_plan_locally(plan: dict, out: Path) -> Path:
    """Stand-in for exp-core's executor (sequential, this process): the plan's TPP, finetune and evaluate runs, each
    a ``monai.bundle.run`` of the bundle's workflow with the plan's overlays and overrides, in the contract's
    folders (``runs/<stage>/<run_key>/run.json`` + outputs). A run whose ``run.json`` says done with the same
    settings is not run again. To be replaced by ``run_experiment`` when the experiment package lands."""
    exp = out / plan["name"]
    exp.mkdir(parents=True, exist_ok=True)
    (exp / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    stages = plan.get("stage_overrides") or {}
    tracking = f"sqlite:///{exp / 'mlruns.db'}"
    for dataset in plan["datasets"]:
        for method in plan["methods"]:
            bundle = BUNDLES_DIR / f"{dataset}_{method}"
            if not (bundle / "configs" / "pretrain_tpp.json").is_file():
                raise ConfigError(f"no TPP bundle {bundle.name!r} for the plan's {dataset!r} x {method!r}")
            common = {**(plan.get("overrides") or {}), **(plan.get("dataset_overrides") or {}).get(dataset, {}),
                      "tracking_uri": tracking, "runs_dir": str(exp / "runs")}  # fmt: skip
            for seed in plan["seeds"]:
                tpp_files = {}
                for init in (i for i in plan["init"] if i.startswith("tpp-")):
                    pretext = init.split("-", 1)[1]
                    settings = _settings(dataset, method, init, None, seed)
                    folder = exp / "runs" / "pretrain_tpp" / _run_key(settings, stage="pretrain_tpp")
                    overrides = {**common, **stages.get("pretrain_tpp", {}), "pretext": pretext, "seed": seed,
                                 "output_dir": str(folder), "run_name": folder.name}  # fmt: skip
                    _bundle_run(bundle, "pretrain_tpp", plan, settings, folder, overrides)
                    tpp_files[init] = str(folder / "tpp_target.pt")
                for fraction in plan["label_fractions"]:
                    for init in plan["init"]:
                        settings = _settings(dataset, method, init, fraction, seed)
                        key = _run_key(settings)
                        fine = exp / "runs" / "finetune" / key
                        overrides = {**common, **stages.get("finetune", {}), "seed": seed,
                                     "tpp_ckpt": tpp_files.get(init, "none"), "ckpt_dir": str(fine / "models"),
                                     "output_dir": str(fine), "run_name": f"finetune_{key}",
                                     "label_fraction": None if float(fraction) >= 1 else float(fraction)}  # fmt: skip
                        _bundle_run(bundle, "finetune", plan, settings, fine, overrides)
                        folder = exp / "runs" / "evaluate" / key
                        overrides = {**common, **stages.get("evaluate", {}), "seed": seed,
                                     "ckpt_dir": str(fine / "models"), "output_dir": str(folder),
                                     "run_name": f"evaluate_{key}"}  # fmt: skip
                        _bundle_run(bundle, "evaluate", plan, settings, folder, overrides)
    return exp


def _settings(dataset: str, method: str, init: str, fraction: float | None, seed: int) -> dict:
    pretext = init.split("-", 1)[1] if init.startswith("tpp-") else None
    source = dataset if pretext else None
    return {"dataset": dataset, "method": method, "init": init, "pretext": pretext, "source": source,
            "label_fraction": fraction, "seed": seed, "backbone": None}  # fmt: skip


def _run_key(settings: dict, stage: str = "") -> str:
    base = f"{settings['dataset']}_{settings['method']}__{settings['init']}"
    if stage == "pretrain_tpp":
        return f"{base}__s{settings['seed']}"
    return f"{base}__lf{settings['label_fraction']}__s{settings['seed']}"


def _bundle_run(bundle: Path, workflow: str, plan: dict, settings: dict, folder: Path, overrides: dict) -> None:
    """One workflow run, as ``python -m monai.bundle run`` would do it, recorded in ``folder/run.json``."""
    from monai.bundle import run

    digest = hashlib.sha256(json.dumps({"settings": settings, "overrides": overrides}, sort_keys=True,
                                       default=str).encode()).hexdigest()  # fmt: skip
    record_path = folder / "run.json"
    if record_path.is_file():
        previous = json.loads(record_path.read_text())
        if previous.get("status") == "done" and previous.get("digest") == digest:
            print(f"=== {workflow} {folder.name}: done before, kept")
            return
    configs = workflow_config_files(bundle, workflow, *(plan.get("overlays") or []))
    folder.mkdir(parents=True, exist_ok=True)
    record = {"stage": workflow, "bundle": bundle.name, "settings": settings, "overrides": overrides,
              "digest": digest, "status": "running", "attempts": 1, "log": None}  # fmt: skip
    record_path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"\n=== {workflow} {folder.name}", flush=True)
    run(workflow, config_file=configs, meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=str(bundle / "configs" / "logging.conf"), tracking="mlflow", **overrides)  # fmt: skip
    record_path.write_text(json.dumps({**record, "status": "done"}, indent=2, default=str) + "\n")


# --------------------------------------------------------------------------------------------------------------
# Results


def evaluation_records(exp: Path) -> list[dict]:
    """``{"settings", "metrics"}`` of every finished evaluate run of the experiment folder (contract layout)."""
    records = []
    for run_json in sorted((exp / "runs" / "evaluate").glob("*/run.json")):
        run = json.loads(run_json.read_text())
        metrics = run_json.parent / "metrics.json"
        if run.get("status") == "done" and metrics.is_file():
            records.append({"settings": run["settings"], "metrics": json.loads(metrics.read_text())["percent"]})
    return records


def tpp_loss_curves(exp: Path) -> dict[str, list[float]]:
    """Mean pretext loss per epoch of every TPP stage (its ``history.csv``), by run folder name."""
    curves = {}
    for history in sorted((exp / "runs" / "pretrain_tpp").glob("*/history.csv")):
        with open(history, newline="") as f:
            curves[history.parent.name] = [float(row["train_loss"]) for row in csv.DictReader(f)]
    return curves


def paired_gain(random: list[float], tpp: list[float], resamples: int = 10000, seed: int = 0) -> dict:
    """TPP minus random, paired by seed: mean, std of each arm, the mean gain, a percentile bootstrap 95 % interval
    over seeds, the count of seeds TPP won and a verdict in words. Fallback for exp-report's statistics."""
    import numpy as np

    a, b = np.asarray(random, float), np.asarray(tpp, float)
    diff = b - a
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (resamples, len(diff)))].mean(axis=1)
    low, high = (float(x) for x in np.percentile(means, [2.5, 97.5]))
    gain = float(diff.mean())
    if len(diff) < 2:
        low = high = float("nan")
        verdict = "one seed: no interval; run the demo with more seeds (--seeds)"
    elif low > 0:
        verdict = f"TPP helps: the gain's 95 % interval lies above zero ({len(diff)} seeds)"
    elif high < 0:
        verdict = f"TPP hurts: the gain's 95 % interval lies below zero ({len(diff)} seeds)"
    else:
        verdict = f"not distinguishable from zero: the gain's 95 % interval contains 0 ({len(diff)} seeds)"
    return {"mean_random": float(a.mean()), "std_random": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "mean_tpp": float(b.mean()), "std_tpp": float(b.std(ddof=1)) if len(b) > 1 else 0.0,
            "gain_mean": gain, "ci95": (low, high), "n_seeds": len(diff), "wins": int((diff > 0).sum()),
            "verdict": verdict}  # fmt: skip


def gains(records: list[dict], metric: str) -> list[dict]:
    """One :func:`paired_gain` entry per (dataset, method, label fraction, TPP init), pairing seeds with random."""
    groups: dict[tuple, dict[str, dict[int, float]]] = {}
    for r in records:
        s = r["settings"]
        group = groups.setdefault((s["dataset"], s["method"], s["label_fraction"]), {})
        group.setdefault(s["init"], {})[s["seed"]] = float(r["metrics"][metric])
    out = []
    for (dataset, method, fraction), arms in sorted(groups.items(), key=str):
        for init in sorted(i for i in arms if i != "random"):
            seeds = sorted(set(arms[init]) & set(arms.get("random", {})))
            if seeds:
                entry = paired_gain([arms["random"][s] for s in seeds], [arms[init][s] for s in seeds])
                out.append({"dataset": dataset, "method": method, "label_fraction": fraction, "init": init,
                            "metric": metric, **entry})  # fmt: skip
    return out


def summarise(exp: Path, metric: str = "dice") -> dict:
    """The experiment's report: exp-report's ``write_report`` when installed, else the demo's own summary (gain
    entries, TPP loss curves, ``report/report.md`` and ``report/tpp_loss.png``)."""
    curves = tpp_loss_curves(exp)
    try:
        from tpp_monai.experiments.report import write_report
    except ImportError:
        return _write_summary(exp, gains(evaluation_records(exp), metric), curves)
    report = dict(write_report(exp))
    report.setdefault("tpp_loss", curves)
    return report


def _write_summary(exp: Path, entries: list[dict], curves: dict[str, list[float]]) -> dict:
    """Write ``report.md``/``report.json`` and the TPP loss plot (stand-in for exp-report's ``write_report``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = exp / "report"
    folder.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=name)
    # norm-pix targets have zero mean and unit variance per patch: predicting each hidden patch's mean scores ~1.0
    ax.axhline(1.0, color="grey", linestyle="--", label="predicting each patch's mean")
    ax.set(xlabel="epoch", ylabel="MAE loss (masked patches, norm-pix)", title="TPP stage: pretext loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "tpp_loss.png", dpi=100)
    plt.close(fig)
    lines = ["# TPP demo", "", format_gains(entries), "", "![TPP loss](tpp_loss.png)", ""]
    (folder / "report.md").write_text("\n".join(lines))
    report = {"gain": entries, "tpp_loss": curves, "markdown": str(folder / "report.md"),
              "plots": [str(folder / "tpp_loss.png")]}  # fmt: skip
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_gains(entries: list[dict] | dict) -> str:
    """Mean ± std per arm, the gain with its 95 % interval, wins and verdict, one block per comparison (the
    contract's ``gain`` entries, as a list or keyed by comparison)."""
    blocks = []
    for key, e in entries.items() if isinstance(entries, dict) else enumerate(entries):
        low, high = e["ci95"]
        title = " / ".join(str(e[k]) for k in ("dataset", "method") if k in e) or str(key)
        blocks.append("\n".join([
            f"{title} / label fraction {e.get('label_fraction')} / {str(e.get('metric', '')).upper()} "
            f"({e['n_seeds']} seeds):",
            f"  random init      : {e['mean_random']:6.2f} ± {e['std_random']:.2f}",
            f"  {e.get('init', 'tpp'):<17}: {e['mean_tpp']:6.2f} ± {e['std_tpp']:.2f}",
            f"  gain (TPP - random): {e['gain_mean']:+.2f}, 95 % interval [{low:+.2f}, {high:+.2f}] "
            f"(paired bootstrap over seeds); TPP won {e['wins']} of {e['n_seeds']} seeds",
            f"  verdict: {e['verdict']}",
        ]))  # fmt: skip
    return "\n\n".join(blocks) if blocks else "no finished evaluation to compare"


def format_loss_curves(curves: dict[str, list[float]]) -> str:
    """First and last epoch of each TPP stage's pretext loss."""
    return "\n".join(
        f"  {name}: epoch 1 {c[0]:.3f} -> epoch {len(c)} {c[-1]:.3f} ({100 * (c[-1] / c[0] - 1):+.0f} %)"
        for name, c in curves.items()
        if c
    )


# --------------------------------------------------------------------------------------------------------------
# Command line


def run_demo(out: str | Path = "demo_out", seeds: list[int] | None = None, preset: str | Path = PRESET) -> dict:
    """Upstream stand-in, target data, the preset's runs and their summary; returns the summary."""
    from tpp_monai.workflows import install_excepthook

    install_excepthook()
    plan = load_demo_plan(preset)
    if len(plan["datasets"]) != 1:
        raise ConfigError(f"{preset}: the demo makes one target dataset; the plan names {plan['datasets']}")
    dataset = plan["datasets"][0]
    out = Path(out).resolve()
    start = time.time()
    backbone_ckpt = pretrain_upstream(dataset, out / "upstream")
    dataset_dir = make_target_data(dataset, out / "target_data")
    exp = run_plan(resolve_plan(plan, dataset_dir, backbone_ckpt, seeds), out)
    summary = summarise(exp, (plan.get("metrics") or ["dice"])[0])
    summary.update({"seconds": time.time() - start, "experiment": str(exp)})
    return summary


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", help="output folder (default ./demo_out)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: the preset's)")
    parser.add_argument("--preset", default=str(PRESET), help="plan file (default: the demo preset)")


def run(args: argparse.Namespace) -> int:
    summary = run_demo(args.out, args.seeds, args.preset)
    print("\n" + "=" * 100)
    print("TPP demo: Adapter on a synthetic IHC-stained GlaS-layout target with few labels, a tiny MedCoSS-style "
          "backbone pre-trained on the other demo datasets; the numbers answer the question on this synthetic "
          "task, not the paper's")  # fmt: skip
    print(format_gains(summary.get("gain", [])))
    print("\nTPP stage, pretext (MAE) loss per run:")
    print(format_loss_curves(summary.get("tpp_loss", {})))
    print(f"\nfinished in {summary['seconds'] / 60:.1f} min; experiment folder: {summary['experiment']}")
    if summary.get("markdown"):
        print(f"report: {summary['markdown']}")
    for plot in summary.get("plots", []):
        print(f"plot:   {plot}")
    return 0
