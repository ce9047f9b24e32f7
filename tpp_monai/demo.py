"""``python -m tpp_monai demo``: the whole TPP pipeline on a synthetic dataset, through the real bundles.

1. stands in for the MedCoSS pre-training: a tiny MedCoSS ViT is pre-trained with MAE on the *other* 2D demo
   datasets (MedCoSS's upstream data is multi-modal and excludes the downstream sets) and saved in the MedCoSS
   checkpoint format, MAE decoder included, so the TPP stage inherits the decoder as the paper does (§5.5);
   then makes the demo dataset (official layout) and builds its datalist;
2. ``pretrain_tpp``: pre-trains the method's target parameters (MAE by default) with the backbone frozen;
3. ``finetune`` twice: from the pre-trained target parameters, and from random ones (the paper's PEFT baseline);
4. ``evaluate`` both on the test split, then writes the comparison table and plots (``tpp_monai.report``).

Every workflow runs as ``python -m monai.bundle run <id> --config_file "[<config>, demo.json]"`` would (the same
``monai.bundle.run`` function), with MLflow tracking into one SQLite store. Everything is tiny (64 px images, a
4-layer ViT, a few hundred steps) so the whole run takes a few minutes on 2 CPU cores; its numbers show the
pipeline working, not the paper's results.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from tpp_monai.bundlegen import BUNDLES_DIR, workflow_config_files
from tpp_monai.data.info import DATASETS
from tpp_monai.data.recipes import recipe_for
from tpp_monai.errors import ConfigError


def _run(bundle: Path, run_id: str, config: str, **overrides: object) -> None:
    from monai.bundle import run

    configs = workflow_config_files(bundle, config, "demo")
    print(f"\n=== {run_id}: {', '.join(f'{k}={v}' for k, v in overrides.items() if k.endswith(('ckpt', 'dir')))}")
    run(run_id, config_file=configs, meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=str(bundle / "configs" / "logging.conf"), tracking="mlflow", **overrides)  # fmt: skip


def pretrain_upstream(target: str, folder: Path, epochs: int = 30, seed: int = 0) -> Path:
    """MAE pre-training of the tiny MedCoSS backbone on the other 2D demo datasets; returns the checkpoint path.

    All tensors are trained here (this is the backbone's own pre-training, not TPP). The file has the MedCoSS
    pre-training container ``{"model": encoder + MAE decoder state, "epoch"}``.
    """
    import torch
    from monai.data import CacheDataset, DataLoader

    from tpp_monai.backbones import build_backbone, get_backbone_spec
    from tpp_monai.engines import plain_tensor
    from tpp_monai.pretext.mae import MAEPretext, MaskedPatchLoss
    from tpp_monai.pretext.transforms import mae_transforms
    from tpp_monai.workflows import demo_dataset, images_of

    path = folder / f"tiny_medcoss_without_{target}_seed{seed}.pth"  # never reused for another target or seed
    if path.is_file():
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
    torch.save({"model": state, "epoch": epochs}, path)
    return path


def run_demo(dataset: str = "glas", method: str = "adapter", out: str | Path = "demo_out", pretext: str = "mae",
             seed: int = 0) -> dict:  # fmt: skip
    """Run the pipeline; returns the report (table and file paths)."""
    from tpp_monai.report import make_report
    from tpp_monai.workflows import demo_dataset, install_excepthook

    install_excepthook()
    bundle = BUNDLES_DIR / f"{dataset}_{method}"
    if not (bundle / "configs" / "pretrain_tpp.json").is_file():
        valid = sorted(p.name for p in BUNDLES_DIR.glob("*") if (p / "configs" / "pretrain_tpp.json").is_file())
        raise ConfigError(f"no TPP bundle {bundle.name!r}; choose --dataset/--method from: {', '.join(valid)}")
    runs = Path(out).resolve() / "runs"
    for previous in ("pretrain_tpp", "finetune_tpp", "finetune_random", "evaluate_tpp", "evaluate_random"):
        shutil.rmtree(runs / previous, ignore_errors=True)  # the demo's own earlier outputs: a re-run starts afresh
    start = time.time()
    backbone_ckpt = pretrain_upstream(dataset, runs, seed=seed)
    common = {"runs_dir": str(runs), "dataset_dir": demo_dataset(dataset, str(runs / "demo_data")), "seed": seed,
              "backbone_ckpt": str(backbone_ckpt), "tracking_uri": f"sqlite:///{runs / 'mlruns.db'}"}  # fmt: skip
    # the bundle's own decoder choice (frozen for classification, updated for segmentation), inherited from the
    # upstream checkpoint (the overlay's "random" is for runs without one)
    decoder = recipe_for(dataset).tpp.mae_decoder
    _run(bundle, "pretrain_tpp", "pretrain_tpp", pretext=pretext, mae_decoder=decoder,
         run_name=f"pretrain_tpp_{pretext}", **common)  # fmt: skip
    evaluated = []
    for variant, tpp_ckpt in (("tpp", str(runs / "pretrain_tpp" / "tpp_target.pt")), ("random", "none")):
        ckpt_dir = str(runs / f"finetune_{variant}" / "models")
        _run(bundle, "finetune", "finetune", tpp_ckpt=tpp_ckpt, ckpt_dir=ckpt_dir,
             output_dir=str(runs / f"finetune_{variant}"), run_name=f"finetune_{variant}", **common)  # fmt: skip
        _run(bundle, "evaluate", "evaluate", ckpt_dir=ckpt_dir, output_dir=str(runs / f"evaluate_{variant}"),
             run_name=f"evaluate_{variant}", **common)  # fmt: skip
        evaluated.append(runs / f"evaluate_{variant}")
    report = make_report(evaluated, Path(out).resolve() / "report")
    report["seconds"] = time.time() - start
    report["mlflow"] = runs / "mlruns.db"
    return report


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="glas", choices=[d for d, i in DATASETS.items() if i.spatial_dims == 2])
    parser.add_argument("--method", default="adapter", help="a PEFT method with a TPP bundle (default adapter)")
    parser.add_argument("--pretext", default="mae", choices=["mae", "dino"])
    parser.add_argument("--out", default="demo_out", help="output folder (default ./demo_out)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    report = run_demo(args.dataset, args.method, args.out, args.pretext, args.seed)
    print("\n" + "=" * 100)
    print(f"TPP demo: {args.dataset}, {args.method}, {args.pretext.upper()} pretext - a tiny backbone and synthetic "
          "data, so the numbers show the pipeline working, not the paper's results")  # fmt: skip
    print(report["table"])
    print(f"\nfinished in {report['seconds'] / 60:.1f} min")
    print(f"table: {report['markdown']}")
    for plot in report["plots"]:
        print(f"plot:  {plot}")
    print(
        f"MLflow runs: mlflow ui --backend-store-uri sqlite:///{report['mlflow']}   (then open http://127.0.0.1:5000)"
    )
    return 0
