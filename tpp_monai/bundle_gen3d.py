"""The 3D bundles (paper §5.4, Table 10): STU-Net with Conv-Adapter and DINO target-parameter pre-training on LiTS and
KiTS19 (``lits_conv_adapter``, ``kits_conv_adapter``), and the full fine-tuning baselines (``lits_full_finetune``,
``kits_full_finetune``). Written by ``python -m tpp_monai bundles`` through :func:`tpp_monai.bundle_gen._bundles`,
with the common override keys and shared pieces of :mod:`tpp_monai.bundle_gen`.

What differs from the 2D bundles (``shared/reference/stunet.md``):

* backbone ``stunet_b`` (the size the STU-Net authors recommend for transfer, §1.7, #46), patches of ``image_size``
  (x, y, z after ``Orientationd("RAS")``) from volumes at 0.8 x 0.8 x 1.5 mm with per-volume z-score, sampled
  with tumour oversampling (:mod:`tpp_monai.data.transforms`);
* TPP stage: DINO only (:mod:`tpp_monai.pretext.dino`: teacher on the bottleneck, DeSD-style student heads on every
  decoder level so decoder adapters learn; 3D multi-crop in :mod:`tpp_monai.pretext.transforms`);
* fine-tuning: deep supervision on all five STU-Net heads with nnU-Net's Dice + CE weights, the STU-Net/nnU-Net
  optimiser (:class:`Finetune3DRecipe`);
* validation, evaluation and inference: Gaussian sliding window over whole volumes (deep supervision off in eval),
  softmax -> argmax; organ (label >= 1), tumour (label == 2), their mean and the label-1-only organ Dice per case,
  averaged; ``inference.json`` writes NIfTI label maps with each input's affine and shape.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

from tpp_monai.bundle_gen import (
    CHECKPOINT_LOADER,
    EVALUATE_INITIALIZE,
    EVALUATION_WRITER,
    GPU_SETTINGS,
    INVERT_PRED,
    TRAINABLE_PARAMS,
    _best_model_handlers,
    _common,
    _data_section,
    _evaluator,
    _finetune_handlers,
    _trainer,
    _training_initialize,
    _validator,
    _with_settings_record,
    assemble_bundle,
    finetune_settings,
    inference_settings,
    metadata,
    pretrain_tpp_base,
    run_tracker,
)
from tpp_monai.data.info import DATASETS, DatasetInfo
from tpp_monai.network import FROM_MODEL_FILE
from tpp_monai.peft import get_method

METHODS_3D = ("conv_adapter", "full_finetune")  # the paper's 3D method and its baseline
BASELINES_3D = ("full_finetune",)
BACKBONE_3D = "stunet_b"
DEEP_SUPERVISION_WEIGHTS = [1, 0.5, 0.25, 0.125, 0]  # nnU-Net: 1/2^i, the coarsest head off (stunet.md §1.4)
# 3D DINO crops (x, y, z): multiples of STU-Net's stride product (16, 16, 32) with a bottleneck of more than one voxel
# in training: global 6 x 6 x 2, local 3 x 3 x 1 (stunet.md §1.3, §3.3).
DINO_3D = {"global_size": [96, 96, 64], "local_size": [48, 48, 32], "num_local": 4}
DEMO_PATCH = [32, 32, 32]  # the smallest cube STU-Net trains on with the default strides (stunet.md §5.3)


@dataclass(frozen=True)
class TPP3DRecipe:
    """The 3D TPP stage (DINO on STU-Net; the paper gives no recipe, stunet.md §3.3): DINO's schedules (teacher
    momentum 0.996 -> 1, temperatures, centering, 10 warm-up epochs, weight decay 0.04 -> 0.4, last layer frozen in
    epoch 1) with AdamW at DINO's base learning rate 5e-4 without the linear batch scaling (it would leave 1e-5 at
    3D batch sizes for freshly initialised heads and adapters), DeSD's 300 epochs, batch 4 volumes of 2 global and
    4 local crops."""

    epochs: int = 300
    batch_size: int = 4
    lr: float = 5e-4
    warmup_epochs: int = 10


@dataclass(frozen=True)
class Finetune3DRecipe:
    """Fine-tuning, the STU-Net recipe (stunet.md §1.7: nnU-Net v1 defaults with the learning rate 10x smaller)
    adapted to PEFT.

    SGD with Nesterov momentum 0.99, weight decay 3e-5, per-epoch poly(0.9) decay, gradient-norm clipping at 12, batch
    2, Dice + CE on the five deep-supervision outputs, nnU-Net's 1000 epochs x 250 iterations = 250k iterations, patch
    192 x 192 x 64 (x, y, z; MOTS/MedCoSS's 64 x 192 x 192 z, y, x). Learning rate: full fine-tuning uses STU-Net's
    fine-tuning rate 1e-3; Conv-Adapter uses nnU-Net's from-scratch rate 1e-2, because everything it trains (adapters
    and the five new heads) starts from random initialisation, while the 10x reduction exists to protect pre-trained
    weights that are frozen here.
    """

    lr: float
    batch_size: int = 2
    iterations: int = 250_000
    momentum: float = 0.99
    weight_decay: float = 3e-5
    grad_clip: float = 12.0


def finetune_recipe_3d(method: str) -> Finetune3DRecipe:
    return Finetune3DRecipe(lr=1e-3 if method in BASELINES_3D else 1e-2)


def bundles() -> list[tuple[str, Callable[[], dict[str, object]]]]:
    """``(name, files factory)`` of every 3D bundle, for :func:`tpp_monai.bundle_gen._bundles`."""
    return [
        (f"{info.name}_{method}", _factory(info, method))
        for info in DATASETS.values()
        if info.spatial_dims == 3
        for method in METHODS_3D
    ]


def _factory(info: DatasetInfo, method: str) -> Callable[[], dict[str, object]]:
    return lambda: bundle_files_3d(info, method)


# ---------------------------------------------------------------------------------------------------------------
# Shared pieces of the 3D workflows


def _common_3d(info: DatasetInfo, method: str, workflow: str) -> dict:
    cfg = _common(info, method, workflow)
    cfg["imports"].append("$import tpp_monai.workflows3d as tpp3d")
    cfg.update(
        {
            "backbone": BACKBONE_3D,
            # deep supervision: five outputs in training (loss), one in eval (sliding window)
            "backbone_options": {"deep_supervision": True},
            "cache_rate": 1.0,  # fraction of the resampled volumes kept in memory; lower it when RAM is short
            "sw_batch_size": 2,
            "sw_overlap": 0.5,  # nnU-Net's tile overlap
        }
    )
    return cfg


def _with_3d_checks(initialize: list[str], extra: str = "") -> list[str]:
    """``initialize`` with the 3D checks right after the error hook, the process group and the GPU settings: they
    need no data, so a wrong patch size fails before the datalist is even read."""
    out = list(initialize)
    start = 0
    while start < len(out) and any(k in out[start] for k in ("install_excepthook", "init_distributed", GPU_SETTINGS)):
        start += 1
    out[start:start] = ["$tpp3d.check_3d(@dataset_name, @backbone, @image_size, @backbone_options" + extra + ")"]
    return out


def _network_def_3d(info: DatasetInfo, backbone_ckpt: str, tpp_ckpt: str) -> dict:
    return {
        "_target_": "tpp_monai.network.build_network",
        "backbone": "@backbone",
        "task": "seg",
        "num_classes": info.num_classes,
        "method": "@method",
        "method_options": "@method_options",
        "backbone_ckpt": backbone_ckpt,
        "tpp_ckpt": tpp_ckpt,
        "stage": "finetune",
        "backbone_options": "@backbone_options",
    }


def _sliding_window() -> dict:
    """Gaussian-weighted sliding window over the whole volume (nnU-Net: overlap 0.5, sigma 1/8 of the tile)."""
    return {
        "_target_": "SlidingWindowInferer",
        "roi_size": "@image_size",
        "sw_batch_size": "@sw_batch_size",
        "overlap": "@sw_overlap",
        "mode": "gaussian",
        "sigma_scale": 0.125,
    }


def _softmax() -> dict:
    return {"_target_": "Activationsd", "keys": "pred", "softmax": True}


def _argmax() -> dict:
    return {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}


def _dice_metrics(prefix: str) -> tuple[dict, dict]:
    """(key metric, additional metrics): per-case mean of organ and tumour Dice selects the model (stunet.md §4.4)."""
    handler = "tpp_monai.metrics.OrganTumourHandler"
    key = {f"{prefix}mean_dice": {"_target_": handler, "key": "mean", "save_details": False}}
    extra = {f"{prefix}{k}_dice": {"_target_": handler, "key": k, "save_details": False}
             for k in ("organ", "tumour", "organ_label1")}  # fmt: skip
    return key, extra


# ---------------------------------------------------------------------------------------------------------------
# Configs


def pretrain_tpp_config_3d(info: DatasetInfo, method: str) -> dict:
    """``configs/pretrain_tpp.json``: the 2D TPP stage (same trainer, schedules, handlers and outputs) with DINO on
    STU-Net: 3D multi-crop views, the DINO-3D recipe (:class:`TPP3DRecipe`), no MAE settings."""
    recipe = TPP3DRecipe()
    cfg = pretrain_tpp_base(info, method)
    for key in ("pretext_size", "mae_decoder", "mask_ratio"):  # MAE-only
        cfg.pop(key, None)
    cfg["network_def"].pop("keep_mae_decoder", None)
    cfg["network_def"]["backbone_options"] = "@backbone_options"  # e.g. strides: as in fine-tuning
    base = _common_3d(info, method, "pretrain_tpp")
    cfg["imports"] = base["imports"] + [i for i in cfg["imports"] if i not in base["imports"]]
    cfg.update({k: base[k] for k in ("backbone", "backbone_options", "cache_rate")})
    cfg.update(
        {
            "pretext": "dino",
            "tpp_epochs": recipe.epochs,
            "batch_size": recipe.batch_size,
            "lr": recipe.lr,
            "weight_decay": 0.04,
            "weight_decay_end": 0.4,
            "warmup_epochs": recipe.warmup_epochs,
            "dino": dict(DINO_3D),
            "pretext_net": {
                "_target_": "tpp_monai.pretext.build_pretext",
                "pretext": "@pretext",
                "encoder": "@network_def",
                "dino": "@dino",
            },
        }
    )
    train = cfg["train"]
    train["preprocessing"] = "$pretexts.pretext_transforms(@pretext, @dataset_name, dino=@dino)"
    train["dataset"]["cache_rate"] = "@cache_rate"
    cfg["initialize"] = _with_3d_checks(cfg["initialize"], ", pretext=@pretext, dino=@dino")
    return _with_settings_record(cfg)


def finetune_config_3d(info: DatasetInfo, method: str) -> dict:
    """``configs/finetune.json``: patch training with deep supervision (:class:`Finetune3DRecipe`), whole-volume
    validation every ``val_interval`` epochs; the best mean Dice is ``models/model.pt``."""
    recipe = finetune_recipe_3d(method)
    cfg = _common_3d(info, method, "finetune")
    cfg["imports"].append("$import tpp_monai.data as tpp_data")
    key_metric, extra_metrics = _dice_metrics("val_")
    train = _data_section("training", "$tpp_data.train_transforms(@dataset_name, @image_size)", "@batch_size", True)
    validate = _data_section(
        "validation", "$tpp_data.eval_transforms(@dataset_name, @image_size)", "@val_batch_size", False
    )
    for section in (train, validate):
        section["dataset"]["cache_rate"] = "@cache_rate"
    cfg.update(
        {
            **finetune_settings(method in BASELINES_3D, recipe.lr, recipe.batch_size, recipe.iterations),
            "momentum": recipe.momentum,
            "weight_decay": recipe.weight_decay,
            "grad_clip": recipe.grad_clip,
            "val_interval": 50,
            "network_def": _network_def_3d(info, "@backbone_ckpt", "@tpp_ckpt"),
            "network_module": "@network_def",
            "network": "$@network_module.to(@device)",
            "loss": {
                "_target_": "DeepSupervisionLoss",
                "loss": {"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True},
                "weights": DEEP_SUPERVISION_WEIGHTS,
            },
            "optimizer": {
                "_target_": "torch.optim.SGD",
                "params": TRAINABLE_PARAMS,
                "lr": "@lr",
                "momentum": "@momentum",
                "nesterov": True,
                "weight_decay": "@weight_decay",
            },
            "train": {
                **train,
                "iters_per_epoch": "$len(@train#dataloader)",
                "inferer": {"_target_": "SimpleInferer"},
                "handlers": _finetune_handlers(),
                "trainer": _trainer({"_target_": "tpp_monai.engines.PlainBatch"}),
            },
            "validate": {
                **validate,
                "inferer": _sliding_window(),
                "postprocessing": {"_target_": "Compose", "transforms": [_softmax(), _argmax()]},
                "key_metric": key_metric,
                "additional_metrics": extra_metrics,
                "handlers": _best_model_handlers(", backbone_options=@backbone_options"),
                "evaluator": _validator(),
            },
            "initialize": _with_3d_checks(
                _training_initialize(
                    "$tpp.check_settings(@dataset_name, @method, @backbone, datalist=@datalist, "
                    "dataset_dir=@dataset_dir, keys=('training', 'validation'), tpp_ckpt=@tpp_ckpt)",
                    "$tpp.check_output(@output_dir, @resume, @ckpt_dir)",
                )
            ),
            "finetune": ["$@train#trainer.run()"],
        }
    )
    return _with_settings_record(cfg)


def evaluate_config_3d(info: DatasetInfo, method: str) -> dict:
    """``configs/evaluate.json``: the best fine-tuned model on the test split, whole volumes at the training spacing
    (as MOTS/DoDNet, whose data are re-spaced once and evaluated there); ``metrics.json``, ``metrics.csv`` and
    ``dice_per_case.csv`` (organ, tumour, mean, organ label 1 per case)."""
    cfg = _common_3d(info, method, "evaluate")
    cfg["imports"].append("$import tpp_monai.data as tpp_data")
    key_metric, extra_metrics = _dice_metrics("")
    test = _data_section(
        "test", "$tpp_data.eval_transforms(@dataset_name, @image_size)", "@val_batch_size", False, cache=False
    )
    cfg.update(
        {
            "backbone_ckpt": "none",
            "ckpt_dir": "$@bundle_root + '/models'",
            "val_batch_size": 1,
            "network_def": _network_def_3d(info, FROM_MODEL_FILE, "none"),
            "network": "$@network_def.to(@device)",
            "test": test,
            "inferer": _sliding_window(),
            "postprocessing": {"_target_": "Compose", "transforms": [_softmax(), _argmax()]},
            "key_metric": key_metric,
            "additional_metrics": extra_metrics,
            "checkpoint_loader": CHECKPOINT_LOADER,
            "handlers": [
                "@checkpoint_loader",
                {"_target_": "StatsHandler", "iteration_log": False},
                {"_target_": "MetricsSaver", "save_dir": "@output_dir", "metrics": "*"},
                {
                    "_target_": "tpp_monai.workflows3d.PerCaseWriter",
                    "handler": "@key_metric#mean_dice",
                    "output_dir": "@output_dir",
                },
                EVALUATION_WRITER,
                run_tracker("evaluate", loader="@checkpoint_loader"),
            ],
            "evaluator": _evaluator(
                "@test#dataloader", "@inferer", "@postprocessing", "@handlers", ("@key_metric", "@additional_metrics")
            ),
            "initialize": _with_3d_checks(EVALUATE_INITIALIZE),
            "evaluate": ["$@evaluator.run()"],
        }
    )
    return cfg


def inference_config_3d(info: DatasetInfo, method: str) -> dict:
    """``configs/inference.json`` (model-zoo layout): a folder of CT volumes in, ``<name>_seg.nii.gz`` label maps
    (0 background, 1 organ, 2 tumour) out, each with its input's affine and shape: softmax probabilities are mapped
    back through the preprocessing (``Invertd``: spacing, orientation; linear, as nnU-Net resamples probabilities)
    before the argmax."""
    cfg = _common_3d(info, method, "inference")
    cfg["imports"].append("$import tpp_monai.data as tpp_data")
    post = {
        "_target_": "Compose",
        "transforms": [_softmax(), dict(INVERT_PRED), _argmax(), "$tpp3d.nifti_saver(@output_dir)"],
    }
    cfg.update(
        inference_settings(
            _network_def_3d(info, FROM_MODEL_FILE, "none"), "$tpp_data.image_transforms(@dataset_name)",
            _sliding_window(), post, [],
        )
    )  # fmt: skip
    cfg["initialize"] = _with_3d_checks(
        ["$tpp.install_excepthook()", GPU_SETTINGS, "$monai.utils.set_determinism(seed=@seed)"]
    )
    return cfg


def demo_config_3d(info: DatasetInfo) -> dict:
    """``configs/demo.json``: demo NIfTI volumes, ``stunet_tiny`` with random weights, 32^3 patches and DINO crops
    (16 x 32 x 32 local crops), a few epochs: each workflow well under a minute on 2 CPU cores."""
    return {
        "dataset_dir": f"$tpp.demo_dataset('{info.name}', @runs_dir + '/demo_data')",
        "backbone": "stunet_tiny",
        "backbone_ckpt": "none",
        "image_size": list(DEMO_PATCH),
        "tpp_epochs": 3,
        "warmup_epochs": 1,
        "batch_size": 2,
        "iterations": 6,
        "val_interval": 3,
        "num_workers": 0,
        "sw_batch_size": 4,
        "sw_overlap": 0.25,
        "dino": {
            "out_dim": 256,
            "hidden_dim": 64,
            "bottleneck_dim": 32,
            "global_size": list(DEMO_PATCH),
            "local_size": [16, 32, 32],
            "num_local": 2,
        },
    }


def metadata_3d(info: DatasetInfo, method: str) -> dict:
    """``configs/metadata.json``: the 2D model-zoo metadata with the 3D network, data and references."""
    meta = copy.deepcopy(metadata(info, method))
    organ = info.classes[1]
    meta.update(
        {
            "task": f"{info.title} {organ} and tumour segmentation (3D CT) with {method}",
            "description": (
                f"{get_method(method).summary}, on STU-Net-B (TotalSegmentator pre-training), for {info.title} "
                f"({info.modality}): organ and tumour segmentation. "
                + (
                    "Full fine-tuning baseline (paper Table 10)."
                    if method in BASELINES_3D
                    else "Target Parameter Pre-training (TPP) pre-trains the Conv-Adapters with DINO on the training "
                    "volumes before fine-tuning (pretrain_tpp, then finetune)."
                )
            ),
            "data_type": "nifti",
            "references": [
                *meta["references"][:1],
                "Huang et al., STU-Net: Scalable and Transferable Medical Image Segmentation Models Empowered by "
                "Large-Scale Supervised Pre-training, 2023",
                "Chen et al., Conv-Adapter: Exploring Parameter Efficient Transfer Learning for ConvNets, 2024",
                "Ye et al., DeSD: Self-Supervised Learning with Deep Self-Distillation for 3D Medical Image "
                "Segmentation, MICCAI 2022",
            ],
        }
    )
    # multiples of 32 meet STU-Net's rules with the released strides (stride product (16, 16, 32), bottleneck of more
    # than one voxel); the training patch is image_size
    shape = ["32*n", "32*n", "32*n"]
    meta["network_data_format"] = {
        "inputs": {
            "image": {
                "type": "image",
                "format": "hounsfield",
                "modality": info.modality,
                "num_channels": 1,
                "spatial_shape": shape,
                "dtype": "float32",
                "value_range": [-5, 5],
                "is_patch_data": True,
                "channel_def": {"0": "image"},
            }
        },
        "outputs": {
            "pred": {
                "type": "image",
                "format": "segmentation",
                "num_channels": info.num_classes,
                "spatial_shape": shape,
                "dtype": "float32",
                "value_range": [0, 1],
                "is_patch_data": True,
                "channel_def": {str(i): c for i, c in enumerate(info.classes)},
            }
        },
    }
    return meta


def readme_3d(info: DatasetInfo, method: str) -> str:
    name = f"{info.name}_{method}"
    tpp, ft = TPP3DRecipe(), finetune_recipe_3d(method)
    organ = info.classes[1]
    demo = f"\"['bundles/{name}/configs/{{workflow}}.json','bundles/{name}/configs/demo.json']\""
    lr_note = (
        "Full fine-tuning uses STU-Net's fine-tuning rate 1e-3."
        if method in BASELINES_3D
        else "Conv-Adapter uses nnU-Net's from-scratch rate 1e-2: all it trains starts from random initialisation."
    )
    ckpt = "--backbone_ckpt /path/to/base_ep4k.model"
    if method in BASELINES_3D:
        stage = (
            f"## Why there is no `pretrain_tpp` here\n\n{get_method(method).summary}. TPP pre-trains the *new* "
            "parameters a PEFT method adds; this baseline adds none, so pretrain_tpp does not apply and the bundle "
            "ships `finetune`, `evaluate` and `inference` only (the paper's baseline row of Table 10).\n"
        )
        tpp_note = ""
    else:
        g, loc = DINO_3D["global_size"], DINO_3D["local_size"]
        stage = f"""## TPP stage (DINO)

    python -m monai.bundle run pretrain_tpp --config_file bundles/{name}/configs/pretrain_tpp.json \\
        --dataset_dir /path/to/download {ckpt}

The backbone stays frozen; only the Conv-Adapters (encoder and decoder) and the DINO heads train. The teacher
(EMA of adapters and head) reads the pooled bottleneck; the student has that head plus one DeSD-style head per decoder
level, each matched to the teacher's distribution, so the decoder adapters learn too (`tpp_monai/pretext/dino.py`).
Views: 2 global {g[0]}x{g[1]}x{g[2]} and {DINO_3D["num_local"]} local {loc[0]}x{loc[1]}x{loc[2]} crops (x, y, z) of
one region of each volume, in-plane scale jitter, flips, noise, blur, brightness, contrast. AdamW lr {tpp.lr:g}
(DINO's base rate), weight decay 0.04 -> 0.4, {tpp.warmup_epochs} warm-up epochs then cosine, {tpp.epochs} epochs,
batch {tpp.batch_size} volumes; teacher momentum 0.996 -> 1, centering and temperatures as DINO. MAE is not
available on STU-Net (`--pretext mae` is refused). The stage writes `runs/pretrain_tpp/tpp_target.pt`: the adapters
only, with the method, options and backbone recorded.
"""
        tpp_note = (
            " It starts from `runs/pretrain_tpp/tpp_target.pt`; `--tpp_ckpt none` fine-tunes from randomly "
            "initialised adapters (the paper's PEFT baseline)."
        )
    return f"""# {name}: {info.title} with {method} on STU-Net

Generated by `python -m tpp_monai bundles`; do not edit by hand. {get_method(method).summary}. Backbone: STU-Net-B
pre-trained on TotalSegmentator (`base_ep4k.model`; `--backbone stunet_l` etc. for the other sizes), every weight
loaded except the deep-supervision heads, which are re-created for background / {organ} / tumour.

## Data
Download {info.title} yourself, then build the datalist (train/validation/test, paths relative to the download):

    python -m tpp_monai datalist {info.name} --root /path/to/download --out /path/to/download/datalist.json

Preprocessing (all workflows): orientation RAS, spacing 0.8 x 0.8 x 1.5 mm (x, y, z; MOTS/MedCoSS), per-volume
z-score (the normalisation STU-Net was pre-trained with). Resampled volumes are cached in memory (`--cache_rate` to
cache fewer). Image axes are (x, y, z), so `image_size` {list(info.image_size)} is a 64-slice patch of 192 x 192.

{stage}
## Fine-tuning

    python -m monai.bundle run finetune --config_file bundles/{name}/configs/finetune.json \\
        --dataset_dir /path/to/download {ckpt}

STU-Net's fine-tuning recipe (nnU-Net defaults) adapted to PEFT: SGD, Nesterov momentum {ft.momentum}, weight decay
{ft.weight_decay:g}, lr {ft.lr:g} with per-epoch poly(0.9) decay, gradient clipping {ft.grad_clip:g}, batch
{ft.batch_size}, {ft.iterations:,} iterations (nnU-Net's 1000 x 250), patches with tumour oversampling and nnU-Net-like
augmentation, Dice + CE on the five deep-supervision outputs (weights 1, 1/2, 1/4, 1/8, 0).
{lr_note}
Validation every `val_interval` epochs on whole volumes; the best mean Dice is written to `models/model.pt` with how it
was made.{tpp_note} Mixed precision (bf16) and `cudnn.benchmark` on a GPU; everything also runs on the CPU.

## Evaluation and inference

    python -m monai.bundle run evaluate --config_file bundles/{name}/configs/evaluate.json \\
        --dataset_dir /path/to/download
    python -m monai.bundle run --config_file bundles/{name}/configs/inference.json --input_dir /path/to/volumes

Sliding window with Gaussian weighting (ROI = `image_size`, overlap 0.5, no mirroring), softmax, argmax.
`evaluate` writes `runs/evaluate/metrics.json`, `metrics.csv` and `dice_per_case.csv`: organ Dice (label >= 1, the
organ including its tumour), tumour Dice (label == 2), their mean, and the label-1-only organ Dice, per case and then
averaged; a case with no tumour in prediction and ground truth scores tumour Dice 1. Metrics are computed at the
training spacing. `inference` writes `<name>_seg.nii.gz` label maps (0 background, 1 {organ}, 2 tumour) with each
input's own affine and shape.

## Demo (no download)
Add the demo overlay to any workflow: `--config_file {demo.format(workflow="finetune")}` (synthetic NIfTI volumes in
the official layout, `stunet_tiny` with random weights, 32^3 patches, a few epochs on 2 CPU cores).

Common overrides: `bundle_root`, `dataset_dir`, `datalist`, `output_dir`, `backbone`, `backbone_ckpt` (`none` = random
weights), `backbone_options`, `pretext`, `epochs`, `batch_size`, `num_workers`, `device`, `seed`, `tpp_ckpt`,
`ckpt_dir`, `image_size`, `cache_rate`, `method_options` (e.g. `"{{'reduction': 4}}"`). Add `--tracking mlflow` to
record a run (SQLite store `runs/mlruns.db`).

## Licence of the data
{info.title}: see the dataset's own terms; nothing is redistributed here.
"""


def bundle_files_3d(info: DatasetInfo, method: str) -> dict[str, object]:
    """Relative path -> content of one 3D bundle."""
    return assemble_bundle(
        metadata_3d(info, method),
        None if method in BASELINES_3D else pretrain_tpp_config_3d(info, method),
        {
            "finetune": finetune_config_3d(info, method),
            "evaluate": evaluate_config_3d(info, method),
            "inference": inference_config_3d(info, method),
        },
        demo_config_3d(info),
        readme_3d(info, method),
    )
