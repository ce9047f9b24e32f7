"""``python -m tpp_monai demo``: does TPP help? The ``demo`` experiment preset, end to end, on embedded data.

1. stands in for the MedCoSS pre-training: a tiny MedCoSS ViT is pre-trained with MAE on the *other* 2D demo
   datasets and saved in the MedCoSS checkpoint format, MAE decoder included, so the TPP stage inherits the decoder
   as the paper does (§5.5); cached in ``<out>/upstream``;
2. writes the target: a synthetic GlaS-layout dataset with an IHC-like stain none of the upstream data has
   (``make_demo_dataset('glas', ..., appearance='ihc')``);
3. runs the preset ``tpp_monai/experiments/presets/demo.yaml`` with :func:`tpp_monai.experiments.run_experiment`:
   per seed one ``pretrain_tpp`` (MAE on all training images), then ``finetune`` + ``evaluate`` from the TPP target
   parameters and from random ones, each on the preset's label fraction (few labels);
4. reports through :func:`tpp_monai.report.experiment.write_report`: mean ± std per arm, the paired gain with its
   bootstrap 95 % interval and the TPP stage's loss curves.

Everything is tiny (64 px images, a 4-layer ViT, a few hundred steps) so it runs on 2 CPU cores; its numbers say
whether TPP helps on this synthetic task, not the paper's results.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tpp_monai.data.info import DATASETS
from tpp_monai.errors import ConfigError

PRESET = Path(__file__).resolve().parent / "experiments" / "presets" / "demo.yaml"
TARGET_APPEARANCE = "ihc"  # the target look the upstream stand-in never saw
TARGET_IMAGES = 80  # 32 training images (all for TPP, 8 labelled at the preset's fraction), 9 validation, 39 test
UPSTREAM_EPOCHS = 40
# MedCoSS initialises LayerScale at 1e-3; in a few hundred steps of the stand-in's pre-training it stays near 0.01,
# so every block, and every adapter inside its LayerScale, would add about 1 % to the residual stream and the TPP
# stage could hardly change the features. The stand-in starts LayerScale at 0.1 (a trained ViT's typical scale).
UPSTREAM_LAYER_SCALE = 0.1


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

    path = folder / f"tiny_medcoss_without_{target}_seed{seed}_ep{epochs}_ls{UPSTREAM_LAYER_SCALE}.pth"
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
    encoder = build_backbone("medcoss_vit_tiny", task="features", layer_scale_init=UPSTREAM_LAYER_SCALE)
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
        if epoch % 10 == 9 or epoch == epochs - 1:
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
    """The preset as a plain dict, checked for what the demo uses (one dataset, random/TPP initialisations)."""
    import yaml

    if not Path(path).is_file():
        raise ConfigError(f"--preset {path}: no such plan file; give a YAML/JSON plan such as {PRESET}")
    plan = yaml.safe_load(Path(path).read_text())
    missing = {"name", "datasets", "methods", "init", "label_fractions", "seeds"} - set(plan or {})
    if missing:
        raise ConfigError(f"{path}: the plan lacks {', '.join(sorted(missing))}; see tpp_monai/experiments/presets")
    bad = set(plan["init"]) - {"random", "tpp-mae", "tpp-dino"}
    if bad:
        raise ConfigError(f"{path}: the demo runs init random/tpp-mae/tpp-dino, not {', '.join(sorted(bad))}")
    if len(plan["datasets"]) != 1:
        raise ConfigError(f"{path}: the demo makes one target dataset; the plan names {plan['datasets']}")
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


def format_loss_curves(curves: list[dict]) -> str:
    """First and last epoch of each TPP stage's pretext loss (the report's ``tpp_loss_curves``)."""
    return "\n".join(
        f"  {c['run_key']}: epoch 1 {c['first']:.3f} -> epoch {c['epochs']} {c['last']:.3f} "
        f"({100 * (c['last'] / c['first'] - 1):+.0f} %)"
        for c in curves
    )


# --------------------------------------------------------------------------------------------------------------
# Command line


def run_demo(out: str | Path = "demo_out", seeds: list[int] | None = None, preset: str | Path = PRESET) -> dict:
    """Upstream stand-in, target data, the preset's runs and their report; returns the report (``write_report``)."""
    from tpp_monai.experiments import run_experiment
    from tpp_monai.report.experiment import write_report
    from tpp_monai.workflows import install_excepthook

    install_excepthook()
    plan = load_demo_plan(preset)
    out = Path(out).resolve()
    start = time.time()
    backbone_ckpt = pretrain_upstream(plan["datasets"][0], out / "upstream")
    dataset_dir = make_target_data(plan["datasets"][0], out / "target_data")
    plan_file = out / f"{plan['name']}_plan.json"
    plan_file.write_text(json.dumps(resolve_plan(plan, dataset_dir, backbone_ckpt, seeds), indent=2) + "\n")
    exp = run_experiment(plan_file, out)
    report = write_report(exp)
    report["seconds"] = time.time() - start
    return report


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", help="output folder (default ./demo_out)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: the preset's)")
    parser.add_argument("--preset", default=str(PRESET), help="plan file (default: the demo preset)")


def run(args: argparse.Namespace) -> int:
    from tpp_monai.report.markdown import summary_text

    report = run_demo(args.out, args.seeds, args.preset)
    print("\n" + "=" * 100)
    print("TPP demo: Adapter on a synthetic IHC-stained GlaS-layout target with few labels, a tiny MedCoSS-style "
          "backbone pre-trained on the other demo datasets; the numbers answer the question on this synthetic "
          "task, not the paper's")  # fmt: skip
    print(summary_text(report))
    print("\nTPP stage, pretext (MAE) loss per run:")
    print(format_loss_curves(report["tpp_loss_curves"]))
    print(f"\nfinished in {report['seconds'] / 60:.1f} min; experiment folder: {report['exp_dir']}")
    for plot in report["plots"]:
        print(f"plot:   {plot}")
    return 0
