"""What a bundle says about itself: ``metadata.json``, ``docs/README.md``, ``LICENSE`` and ``large_files.yml``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from tpp_monai import __version__
from tpp_monai.bundlegen.parts import NOT_SETTINGS

if TYPE_CHECKING:  # annotations only: the kinds import this module
    from tpp_monai.bundlegen.base import BundleKind

REPO = Path(__file__).resolve().parents[2]
MONAI_VERSION = "1.6.1"
TORCH_VERSION = "2.13.0"
# The model-zoo metadata schema the bundles declare; a copy ships in tpp_monai/schemas (see its $comment).
SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"

# Where each backbone's pre-trained checkpoint is published (no file is redistributed here).
CHECKPOINTS = {
    "medcoss_vit_b16": {
        "path": "models/backbone/checkpoint-299.pth",
        "url": "https://drive.google.com/drive/folders/15RlO7l8njzqCt4ccXIwBIjPXZo94Z118",
        "source": "MedCoSS (Ye et al., CVPR 2024), README of https://github.com/yeerwen/MedCoSS, 'Pre-trained Model': "
        "folder MedCoSS_Report_Xray_CT_MR_Path_Buffer0.05",
    },
    "path_dino_vit_s16": {
        "path": "models/backbone/dino_vit_small_patch16_ep200.torch",
        "url": "https://github.com/lunit-io/benchmark-ssl-pathology/releases/download/pretrained-weights/"
        "dino_vit_small_patch16_ep200.torch",
        "source": "Path_DINO ViT-S/16 (Kang et al., CVPR 2023), release 'pretrained-weights' of "
        "https://github.com/lunit-io/benchmark-ssl-pathology (the paper's Table 9 backbone)",
    },
    "stunet_b": {
        "path": "models/backbone/base_ep4k.model",
        "url": "https://drive.google.com/file/d/1BHCp1Ort-OaVFwaZmvsG4qHiKiPeNb4h/view?usp=share_link",
        "source": "STU-Net-B trained on TotalSegmentator (Huang et al., 2023), README of "
        "https://github.com/uni-medical/STU-Net ('Pre-trained Models'; also on Baidu Netdisk "
        "https://pan.baidu.com/s/1a17XmOGiGSgbEvK-acSOSg?pwd=91w3)",
    },
    "swinunetr": {
        "path": "models/backbone/model.pt",
        "url": "https://github.com/Project-MONAI/model-zoo/tree/dev/models/swin_unetr_btcv_segmentation",
        "source": "MONAI model zoo swin_unetr_btcv_segmentation (BTCV, 13 organs; Hatamizadeh et al.): "
        "python -m monai.bundle download swin_unetr_btcv_segmentation, its models/model.pt",
    },
    "model_swinvit": {
        "path": "models/backbone/model_swinvit.pt",
        "url": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/model_swinvit.pt",
        "source": "self-supervised Swin encoder of Tang et al. (CVPR 2022), linked from "
        "https://github.com/Project-MONAI/research-contributions (SwinUNETR/Pretrain); the decoder starts random",
    },
}
# other checkpoints a bundle's README names
EXTRA_CHECKPOINTS = {"medcoss_vit_b16": ("path_dino_vit_s16",), "swinunetr": ("model_swinvit",)}

# Meaning of every key a user may override (README table); a bundle key missing here fails generation.
KEY_DOCS = {
    "bundle_root": "the bundle folder (the one holding configs/); found from the config file's location",
    "dataset_name": "dataset the bundle is for (fixed)",
    "method": "PEFT method (fixed)",
    "method_options": "options of the PEFT method, e.g. \"{'bottleneck': 64}\"; defaults are the paper's",
    "dataset_dir": "folder of the downloaded dataset",
    "datalist": "train/validation/test datalist (python -m tpp_monai datalist)",
    "runs_dir": "folder of every run's outputs and of the MLflow store",
    "output_dir": "this workflow's output folder",
    "tracking_uri": "MLflow store used with --tracking mlflow",
    "experiment_name": "MLflow experiment name",
    "run_name": "MLflow run name (workflow and start time)",
    "backbone": "backbone registry name",
    "backbone_ckpt": "pre-trained backbone checkpoint (large_files.yml says where to get it); none = random weights",
    "backbone_options": "backbone constructor overrides",
    "device": "torch device (the first GPU if any)",
    "amp": "bf16 mixed precision (on with a GPU)",
    "amp_kwargs": "autocast arguments of the engines",
    "num_workers": "data-loading workers (CPU count - 1, at most 8)",
    "seed": "random seed (data order, augmentation, initialisation)",
    "image_size": "network input size (3D: the training patch and sliding-window ROI, x y z)",
    "cache_rate": "fraction of the resampled volumes kept in memory",
    "sw_batch_size": "sliding-window batch size",
    "sw_overlap": "sliding-window overlap",
    "pretext": "TPP pretext: mae, mim or dino (default: the backbone's, tpp_monai.pretext.default_pretext)",
    "resume": "continue the run in output_dir from its last checkpoint",
    "distributed": "set by multi_gpu.json under torchrun",
    "tpp_epochs": "epochs of the TPP stage",
    "epochs": "epochs (fine-tuning: from iterations and the loader length)",
    "batch_size": "training batch size",
    "pretext_size": "MAE / MIM input size",
    "lr": "learning rate (TPP: from the pretext's recipe)",
    "weight_decay": "weight decay (TPP: cosine from weight_decay to weight_decay_end)",
    "weight_decay_end": "final weight decay of the TPP stage",
    "warmup_epochs": "linear warm-up epochs of the TPP stage",
    "mae_decoder": "MAE decoder: freeze, update or random",
    "mask_ratio": "MAE mask ratio",
    "dino": "DINO options (heads, temperatures, crops), e.g. \"{'out_dim': 4096}\"",
    "mim": "MIM options (mask_patch, mask_ratio, clip_grad), e.g. \"{'mask_ratio': 0.5}\"",
    "activation_checkpointing": "recompute transformer blocks in backward to save memory",
    "checkpoint_dir": "folder of the resumable checkpoints",
    "tpp_ckpt": "target-parameter folder to start from (none = random, the PEFT baseline)",
    "ckpt_dir": "folder of the best fine-tuned model",
    "model_file": "the fine-tuned model evaluate, inference and ckpt_export read",
    "iterations": "fine-tuning optimizer steps",
    "label_fraction": "fraction of training labels kept (stratified, seeded); null = all",
    "val_batch_size": "validation/test batch size",
    "grad_clip": "gradient-norm clipping",
    "val_interval": "validate every this many epochs",
    "num_classes": "classifier outputs",
    "momentum": "SGD momentum (Nesterov)",
    "input_dir": "folder of images for inference",
    "skip_bad_files": "leave unreadable inference inputs out (named) instead of stopping",
    "tensorboard": "write TensorBoard event files into output_dir",
    "run_tags": "MLflow tags of the run",
    "parent_run_id": "MLflow parent run (the experiment layer sets it)",
    "save_execute_config": "log the executed config as an MLflow artifact",
}


def license_text() -> str:
    """The project's licence (Apache-2.0, ``pyproject.toml``), as at the repository root."""
    return (REPO / "LICENSE").read_text()


def large_files(backbone: str) -> str:
    """``large_files.yml`` in model-zoo's format: the backbone checkpoints by their public source. No hash is
    given: the files sit behind Google Drive folders and release pages whose digests the publishers do not state,
    and they cannot be downloaded here to compute one."""
    lines = ["# Pre-trained backbone checkpoints (not redistributed); pass the file with --backbone_ckpt.",
             "large_files:"]  # fmt: skip
    for name in (backbone, *EXTRA_CHECKPOINTS.get(backbone, ())):
        entry = CHECKPOINTS[name]
        lines += [f"  - path: \"{entry['path']}\"", f"    url: \"{entry['url']}\"", "    hash_val: \"\"",
                  "    hash_type: \"\"", f"    # {name}: {entry['source']}"]  # fmt: skip
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# metadata.json


def _metadata_common(kind: BundleKind, task: str, description: str, data_type: str, references: list) -> dict:
    return {
        "schema": SCHEMA_URL,
        "version": __version__,
        "changelog": {__version__: "initial bundle generated by tpp_monai"},
        "monai_version": MONAI_VERSION,
        "pytorch_version": TORCH_VERSION,
        "numpy_version": "2.4",
        "required_packages_version": {"tpp-monai": __version__, "pytorch-ignite": "0.5.5"},
        "name": f"{kind.info.title} {kind.method} (TPP)",
        "task": task,
        "description": description,
        "authors": "tpp-monai",
        "copyright": "tpp-monai contributors; datasets under their own licences (see docs/README.md)",
        "data_source": kind.info.title,
        "data_type": data_type,
        "intended_use": "research only",
        "references": references,
    }


TPP_REFERENCE = ("Lei et al., Pre-training Everywhere: Parameter-Efficient Fine-Tuning for Medical Image Analysis via "
                 "Target Parameter Pre-training")  # fmt: skip


PEFT_REFERENCE = (
    "Mangrulkar et al., PEFT: State-of-the-art Parameter-Efficient Fine-Tuning methods, "
    "https://github.com/huggingface/peft, 2022"
)


def metadata_2d(kind: BundleKind) -> dict:
    info = kind.info
    if info.task == "cls":
        output = {"type": "probabilities", "format": "classes", "num_channels": len(info.classes),
                  "spatial_shape": [len(info.classes)], "dtype": "float32", "value_range": [0, 1],
                  "is_patch_data": False, "channel_def": {str(i): c for i, c in enumerate(info.classes)}}  # fmt: skip
        value_range = [0, 1]
    else:
        output = {"type": "image", "format": "segmentation", "num_channels": 1, "spatial_shape": list(info.image_size),
                  "dtype": "float32", "value_range": [0, 1], "is_patch_data": False,
                  "channel_def": {"0": info.classes[1]}}  # fmt: skip
        value_range = [-5, 5]
    meta = _metadata_common(
        kind,
        f"{info.title} {'classification' if info.task == 'cls' else 'segmentation'} with {kind.method} PEFT",
        f"{kind.method} on a frozen MedCoSS ViT-B/16 for {info.title} ({info.modality})"
        + (" (PEFT baseline, no TPP stage)" if kind.baseline else "; TPP pre-trains its target parameters first"),
        "png/jpg/bmp images",
        [TPP_REFERENCE, "Ye et al., Continual Self-supervised Learning: Towards Universal Multi-modal Medical Data "
         "Representation Learning (MedCoSS), CVPR 2024"],
    )  # fmt: skip
    if kind.method.startswith("peft."):
        meta["references"].append(PEFT_REFERENCE)
    image = {"type": "image", "format": "magnitude", "modality": info.modality, "num_channels": info.in_channels,
             "spatial_shape": ["16*n"] * 2, "dtype": "float32", "value_range": value_range, "is_patch_data": False,
             "channel_def": {"0": "R", "1": "G", "2": "B"}}  # fmt: skip
    meta["network_data_format"] = {"inputs": {"image": image}, "outputs": {"pred": output}}
    return meta


def metadata_3d(kind: BundleKind) -> dict:
    info = kind.info
    organ = info.classes[1]
    stage = "baseline, no TPP stage" if kind.baseline else "TPP (DINO) pre-trains the Conv-Adapters first"
    meta = _metadata_common(
        kind,
        f"{info.title} {organ} and tumour segmentation (3D CT) with {kind.method}",
        f"{kind.method} on STU-Net-B (TotalSegmentator) for {info.title} {organ} and tumour segmentation; {stage}",
        "nifti",
        [TPP_REFERENCE,
         "Huang et al., STU-Net: Scalable and Transferable Medical Image Segmentation Models Empowered by "
         "Large-Scale Supervised Pre-training, 2023",
         "Chen et al., Conv-Adapter: Exploring Parameter Efficient Transfer Learning for ConvNets, 2024",
         "Ye et al., DeSD: Self-Supervised Learning with Deep Self-Distillation for 3D Medical Image "
         "Segmentation, MICCAI 2022"],
    )  # fmt: skip
    # multiples of 32 meet STU-Net's rules with the released strides (stride product (16, 16, 32), bottleneck of more
    # than one voxel); the training patch is image_size
    shape = ["32*n", "32*n", "32*n"]
    image = {"type": "image", "format": "hounsfield", "modality": info.modality, "num_channels": 1,
             "spatial_shape": shape, "dtype": "float32", "value_range": [-5, 5], "is_patch_data": True,
             "channel_def": {"0": "image"}}  # fmt: skip
    pred = {"type": "image", "format": "segmentation", "num_channels": info.num_classes, "spatial_shape": shape,
            "dtype": "float32", "value_range": [0, 1], "is_patch_data": True,
            "channel_def": {str(i): c for i, c in enumerate(info.classes)}}  # fmt: skip
    meta["network_data_format"] = {"inputs": {"image": image}, "outputs": {"pred": pred}}
    return meta


# ---------------------------------------------------------------------------------------------------------------
# README


def _default(value: object) -> str:
    if isinstance(value, dict) and "_target_" in value:
        return f"computed (`{value['_target_'].rsplit('.', 1)[-1]}`)"
    if isinstance(value, str) and value.startswith("$"):
        return f"`{value[1:]}`"
    if isinstance(value, str) and value.startswith("@"):
        return f"= `{value[1:]}`"
    return f"`{json.dumps(value)}`"


def key_table(kind: BundleKind) -> str:
    """Every overridable key of the bundle's workflows, its default per workflow and its meaning."""
    configs = kind.configs()
    configs["evaluate"] = {**configs["finetune"], **configs["evaluate"]}

    rows: dict[str, dict[str, str]] = {}
    for workflow, cfg in configs.items():
        for key, value in (cfg or {}).items():
            if key in NOT_SETTINGS or key.startswith("_") or "#" in key:
                continue
            if key not in KEY_DOCS:
                raise KeyError(
                    f"config key {key!r} of {kind.name} has no meaning in KEY_DOCS (tpp_monai/bundlegen/docs.py)"
                )
            rows.setdefault(key, {})[workflow] = _default(value)
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, defaults in rows.items():
        distinct = sorted(set(defaults.values()))
        default = distinct[0] if len(distinct) == 1 else "; ".join(f"{w}: {d}" for w, d in defaults.items())
        lines.append(f"| `{key}` | {default} | {KEY_DOCS[key]} |")
    return "\n".join(lines)


def _install(kind: BundleKind) -> str:
    ckpt = CHECKPOINTS[kind.backbone]
    return f"""## Install

The configs reference the `tpp_monai` package, which is not on PyPI: install it from the tpp-monai source (the folder
holding `pyproject.toml`) first, then run from any folder:

    pip install torch==2.13.0 && pip install -r /path/to/tpp-monai/requirements.txt && pip install /path/to/tpp-monai

The bundle is self-contained: `bundle_root` is the folder holding `configs/`, wherever the bundle is copied or
unpacked, and every output goes under it (`runs/`, `models/`) unless `--runs_dir`, `--output_dir` or `--ckpt_dir`
say otherwise. The backbone checkpoint is not included; `large_files.yml` names its public source
({ckpt["url"]}); pass the file with `--backbone_ckpt`.
"""


def _export(kind: BundleKind) -> str:
    return """## TorchScript export (model-zoo's `ckpt_export`)

    python -m monai.bundle ckpt_export network_def --filepath models/model.ts --ckpt_file models/model.pt \\
        --meta_file configs/metadata.json --config_file configs/inference.json --bundle_root .

run from the bundle folder after `finetune`, exactly as model-zoo CI runs it (`--bundle_root` may be omitted).
`network_def` of `inference.json` reads the fine-tuned `model.pt` (its digest checked) and is traced on one
`image_size` input for TorchScript; the exported model gives the eager model's outputs.
"""


def _common_sections(kind: BundleKind) -> str:
    demo = "\"['configs/{workflow}.json','configs/demo.json']\""
    return f"""## Demo (no download)
Add the demo overlay to any workflow: `--config_file {demo.format(workflow="finetune")}` (synthetic data in the
official layout, a tiny backbone with random weights, a few epochs on 2 CPU cores). `evaluate` runs on
`finetune.json` with `evaluate.json` over it: `--config_file "['configs/finetune.json','configs/evaluate.json']"`.
Every workflow also runs without its id (`python -m monai.bundle run --config_file ...` runs `run`).

{_export(kind)}
## Settings
Every key below can be overridden on the command line (`--key value`). Add `--tracking mlflow` to record a run
(SQLite store `runs/mlruns.db`); `configs/multi_gpu.json` as a further overlay runs `pretrain_tpp` and `finetune` under
`torchrun`.

{key_table(kind)}

## Licence
The bundle: Apache-2.0 (`LICENSE`). {kind.info.title}: see the dataset's own terms; nothing is redistributed here.
"""


def readme_2d(kind: BundleKind) -> str:
    from tpp_monai.pretext.mim import DEFAULT_MASK_PATCH

    info, name, method = kind.info, kind.name, kind.method
    recipe, ft = kind.recipe.tpp, kind.recipe.finetune
    decoder = "frozen" if recipe.mae_decoder == "freeze" else "updated"
    metric_text = "ACC, AUC, macro F1" if info.task == "cls" else "Dice and HD95 per image, Gaussian sliding window"
    output_text = "class probabilities to predictions.csv" if info.task == "cls" else "PNG masks at each input's size"
    if kind.baseline:
        stage = (
            f"## Why there is no `pretrain_tpp` here\n\n{kind.spec.summary}. TPP pre-trains the *new* "
            "parameters a PEFT method adds; this baseline adds none, so pretrain_tpp does not apply and the bundle "
            "ships `finetune`, `evaluate` and `inference` only (the paper's baseline rows of Tables 3 and 4).\n"
        )
        tpp_note = ""
    else:
        stage = f"""## TPP stage (MAE by default; `--pretext dino` for DINO, `--pretext mim` for masked-image modelling)

    python -m monai.bundle run pretrain_tpp --config_file configs/pretrain_tpp.json \\
        --dataset_dir /path/to/download --backbone_ckpt /path/to/medcoss/checkpoint-299.pth

Defaults follow the paper: AdamW lr {recipe.mae_lr:g}, weight decay 1.5e-2, batch {recipe.batch_size}, 40 warm-up
epochs then cosine, {recipe.epochs} epochs, the MedCoSS MAE decoder inherited and {decoder}. `--pretext mim`
(SimMIM-style, `tpp_monai/pretext/mim.py`): {DEFAULT_MASK_PATCH[2]}-pixel cells (60 %) set to a learned value, a 1x1
convolution and pixel shuffle on the last layer's patch tokens reconstruct them (L1 on the masked pixels), with the
same rate and schedule, SimMIM's betas (0.9, 0.999), weight decay 0.05 and gradient clipping at 5. The stage writes
`runs/pretrain_tpp/tpp_target/`: the target parameters only (safetensors), with the method, options and backbone
recorded (a peft adapter folder, `adapter_config.json` + `adapter_model.safetensors`, for a `--method peft.*`), and
`init_cost.json` (its wall time and peak memory).
"""
        tpp_note = (
            " It starts from `runs/pretrain_tpp/tpp_target/`; `--tpp_ckpt none` fine-tunes from randomly "
            "initialised target parameters (the paper's PEFT baseline)."
        )
    return f"""# {name}: {info.title} with {method}

{_install(kind)}
Generated by `python -m tpp_monai bundles`; do not edit by hand. {kind.spec.summary}. Backbone: MedCoSS
ViT-B/16 (`--backbone path_dino_vit_s16` for the Path_DINO ViT-S/16 of the paper's Table 9). Commands below run from
the bundle folder; from elsewhere give the config paths (`--config_file /path/to/{name}/configs/finetune.json`).

## Data
Download {info.title} yourself, then build the datalist (train/validation/test, paths relative to the download):

    python -m tpp_monai datalist {info.name} --root /path/to/download --out /path/to/download/datalist.json

{stage}
## Fine-tuning

    python -m monai.bundle run finetune --config_file configs/finetune.json \\
        --dataset_dir /path/to/download --backbone_ckpt /path/to/medcoss/checkpoint-299.pth

Paper Table 2 / MedCoSS recipe: lr {kind.ft_lr:g}, batch {ft.batch_size}, {ft.iterations:,} iterations, AdamW (weight
decay 1e-4), per-epoch poly(0.9) decay, gradient clipping 12; the best validation checkpoint
({"ACC+AUC+F1" if info.task == "cls" else "Dice"}) is written to `models/model.pt` with how it was made.{tpp_note}
`--label_fraction 0.1` keeps a stratified 10 % of the training labels (paper Figure 4).

## Evaluation and inference

    python -m monai.bundle run evaluate --config_file "['configs/finetune.json','configs/evaluate.json']" \\
        --dataset_dir /path/to/download
    python -m monai.bundle run --config_file configs/inference.json --input_dir /path/to/images

`evaluate` writes `runs/evaluate/metrics.json`, `metrics.csv` and per-image CSVs ({metric_text}).
`inference` writes {output_text}.
`python -m tpp_monai report runs/evaluate ... --out report` builds the paper's table and plots.

{_common_sections(kind)}"""


def readme_3d(kind: BundleKind) -> str:
    from tpp_monai.pretext.mim import DEFAULT_MASK_PATCH

    info, name, method = kind.info, kind.name, kind.method
    DINO_3D = kind.dino_crops
    tpp, ft = kind.recipe.tpp, kind.recipe.finetune
    organ = info.classes[1]
    lr_note = (
        "Full fine-tuning uses STU-Net's fine-tuning rate 1e-3."
        if kind.baseline
        else "Conv-Adapter uses nnU-Net's from-scratch rate 1e-2: all it trains starts from random initialisation."
    )
    ckpt = "--backbone_ckpt /path/to/base_ep4k.model"
    if kind.baseline:
        stage = (
            f"## Why there is no `pretrain_tpp` here\n\n{kind.spec.summary}. TPP pre-trains the *new* "
            "parameters a PEFT method adds; this baseline adds none, so pretrain_tpp does not apply and the bundle "
            "ships `finetune`, `evaluate` and `inference` only (the paper's baseline row of Table 10).\n"
        )
        tpp_note = ""
    else:
        g, loc = DINO_3D["global_size"], DINO_3D["local_size"]
        stage = f"""## TPP stage (DINO)

    python -m monai.bundle run pretrain_tpp --config_file configs/pretrain_tpp.json \\
        --dataset_dir /path/to/download {ckpt}

The backbone stays frozen; only the Conv-Adapters (encoder and decoder) and the DINO heads train. The teacher
(EMA of adapters and head) reads the pooled bottleneck; the student has that head plus one DeSD-style head per decoder
level, each matched to the teacher's distribution, so the decoder adapters learn too (`tpp_monai/pretext/dino.py`).
Views: 2 global {g[0]}x{g[1]}x{g[2]} and {DINO_3D["num_local"]} local {loc[0]}x{loc[1]}x{loc[2]} crops (x, y, z) of
one region of each volume, in-plane scale jitter, flips, noise, blur, brightness, contrast. AdamW lr {tpp.lr:g}
(DINO's base rate), weight decay 0.04 -> 0.4, {tpp.warmup_epochs[1]} warm-up epochs then cosine, {tpp.epochs} epochs,
batch {tpp.batch_size} volumes; teacher momentum 0.996 -> 1, centering and temperatures as DINO. `--pretext mim`
pre-trains the adapters by masked-image modelling instead (SimMIM-style, `tpp_monai/pretext/mim.py`): random
{DEFAULT_MASK_PATCH[3]}^3-voxel cells (60 %) of a training-patch-sized crop are set to a learned value and a 1x1x1
convolution on the full-resolution decoder output reconstructs them (L1 on the masked voxels), weight decay 0.05,
gradient clipping at 5.
MAE needs a backbone that drops tokens (`--pretext mae` is refused on STU-Net). The stage writes
`runs/pretrain_tpp/tpp_target/`: the adapters only (safetensors), with the method, options and backbone recorded, and
`init_cost.json` (wall time, peak memory).
"""
        tpp_note = (
            " It starts from `runs/pretrain_tpp/tpp_target/`; `--tpp_ckpt none` fine-tunes from randomly "
            "initialised adapters (the paper's PEFT baseline)."
        )
    return f"""# {name}: {info.title} with {method} on STU-Net

{_install(kind)}
Generated by `python -m tpp_monai bundles`; do not edit by hand. {kind.spec.summary}. Backbone: STU-Net-B
pre-trained on TotalSegmentator (`base_ep4k.model`; `--backbone stunet_l` etc. for the other sizes), every weight
loaded except the deep-supervision heads, which are re-created for background / {organ} / tumour. Commands below run
from the bundle folder.

## Data
Download {info.title} yourself, then build the datalist (train/validation/test, paths relative to the download):

    python -m tpp_monai datalist {info.name} --root /path/to/download --out /path/to/download/datalist.json

Preprocessing (all workflows): orientation RAS, spacing 0.8 x 0.8 x 1.5 mm (x, y, z; MOTS/MedCoSS), per-volume
z-score (the normalisation STU-Net was pre-trained with). Resampled volumes are cached in memory (`--cache_rate` to
cache fewer). Image axes are (x, y, z), so `image_size` {list(info.image_size)} is a 64-slice patch of 192 x 192.

{stage}
## Fine-tuning

    python -m monai.bundle run finetune --config_file configs/finetune.json \\
        --dataset_dir /path/to/download {ckpt}

STU-Net's fine-tuning recipe (nnU-Net defaults) adapted to PEFT: SGD, Nesterov momentum {ft.momentum}, weight decay
{ft.weight_decay:g}, lr {kind.ft_lr:g} with per-epoch poly(0.9) decay, gradient clipping {ft.grad_clip:g}, batch
{ft.batch_size}, {ft.iterations:,} iterations (nnU-Net's 1000 x 250), patches with tumour oversampling and nnU-Net-like
augmentation, Dice + CE on the five deep-supervision outputs (weights 1, 1/2, 1/4, 1/8, 0).
{lr_note}
Validation every `val_interval` epochs on whole volumes; the best mean Dice is written to `models/model.pt` with how it
was made.{tpp_note} Mixed precision (bf16) and `cudnn.benchmark` on a GPU; everything also runs on the CPU.

## Evaluation and inference

    python -m monai.bundle run evaluate --config_file "['configs/finetune.json','configs/evaluate.json']" \\
        --dataset_dir /path/to/download
    python -m monai.bundle run --config_file configs/inference.json --input_dir /path/to/volumes

Sliding window with Gaussian weighting (ROI = `image_size`, overlap 0.5, no mirroring), softmax, argmax.
`evaluate` writes `runs/evaluate/metrics.json`, `metrics.csv` and `dice_per_case.csv`: organ Dice (label >= 1, the
organ including its tumour), tumour Dice (label == 2), their mean, and the label-1-only organ Dice, per case and then
averaged; a case with no tumour in prediction and ground truth scores tumour Dice 1. Metrics are computed at the
training spacing. `inference` writes `<name>_seg.nii.gz` label maps (0 background, 1 {organ}, 2 tumour) with each
input's own affine and shape.

{_common_sections(kind)}"""


def readme_swinunetr(kind: BundleKind) -> str:
    """README of a 3D SwinUNETR bundle (:mod:`tpp_monai.bundlegen.swinunetr3d`)."""
    info, name, method = kind.info, kind.name, kind.method
    tpp = kind.recipe.tpp
    organ = info.classes[1]
    ckpt = "--backbone_ckpt /path/to/swin_unetr_btcv_segmentation/models/model.pt"
    if kind.baseline:
        stage = (
            f"## Why there is no `pretrain_tpp` here\n\n{kind.spec.summary}. It adds no parameters, so there is no "
            "TPP stage: this is the baseline the LoRA bundle is compared with.\n"
        )
    else:
        g, loc = kind.dino_crops["global_size"], kind.dino_crops["local_size"]
        stage = f"""## TPP stage (DINO)

    python -m monai.bundle run pretrain_tpp --config_file configs/pretrain_tpp.json \\
        --dataset_dir /path/to/download {ckpt}

The SwinUNETR encoder stays frozen; huggingface peft wraps its attention (`attn.qkv`) layers with LoRA and only the
LoRA factors and the DINO head train, on the pooled deepest Swin stage (the global feature). Views: 2 global
{g[0]}x{g[1]}x{g[2]} and {kind.dino_crops["num_local"]} local {loc[0]}x{loc[1]}x{loc[2]} crops (multiples of 32, as
SwinUNETR needs). AdamW lr {tpp.lr:g}, {tpp.epochs} epochs, batch {tpp.batch_size}. The stage writes
`runs/pretrain_tpp/tpp_target/`, a peft adapter folder (`adapter_config.json`, `adapter_model.safetensors`) that
`peft.PeftModel.from_pretrained` loads, and `init_cost.json`; `finetune` starts from it (`--tpp_ckpt none`: from
peft's own LoRA start, the PEFT baseline).
"""
    return f"""# {name}: {info.title} with {method} on MONAI's SwinUNETR

{_install(kind)}
Generated by `python -m tpp_monai bundles`; do not edit by hand. {kind.spec.summary}. Backbone: MONAI's SwinUNETR
(feature size 48), from the model zoo's `swin_unetr_btcv_segmentation` `models/model.pt` (its encoder; the decoder
is re-created for background / {organ} / tumour) or from Tang et al.'s self-supervised encoder `model_swinvit.pt`
(`--backbone_ckpt /path/to/model_swinvit.pt`); both are read in their own key layouts, strictly (missing and
unexpected keys are named). Commands below run from the bundle folder.

## Data
As the STU-Net bundles of {info.title}: download it yourself, then

    python -m tpp_monai datalist {info.name} --root /path/to/download --out /path/to/download/datalist.json

Orientation RAS, spacing 0.8 x 0.8 x 1.5 mm, per-volume z-score, patches of `image_size` {list(info.image_size)}
(x, y, z; every axis a multiple of 32, SwinUNETR's rule, checked before anything is built).

{stage}
## Fine-tuning

    python -m monai.bundle run finetune --config_file configs/finetune.json \\
        --dataset_dir /path/to/download {ckpt}

AdamW lr {kind.ft_lr:g}, Dice + CE on SwinUNETR's output, tumour oversampling, validation on whole volumes by
Gaussian sliding window; the best mean Dice is written to `models/model.pt`.

## Another backbone, method or options
Every bundle takes `--backbone`, `--method` and `--method_options` on the command line, e.g.

    python -m monai.bundle run finetune --config_file configs/finetune.json --method peft.dora \\
        --method_options "{{'r': 16, 'lora_alpha': 32}}"
    python -m monai.bundle run pretrain_tpp --config_file configs/pretrain_tpp.json --method lora
    python -m monai.bundle run finetune --config_file configs/finetune.json --backbone stunet_b \\
        --backbone_options "{{'deep_supervision': True}}" --backbone_ckpt /path/to/base_ep4k.model

`--method` takes any built-in method that applies to the backbone (`python -m tpp_monai params --backbone swinunetr
--all` lists them with their counts) or `peft.<tuner>` (any tuner of the installed peft that can wrap SwinUNETR's
layers: `peft.lora`, `peft.dora`, `peft.ia3`, ...; a tuner that cannot is refused before anything is built);
`--method_options` go to the method (for `peft.*`: the tuner's config, e.g. `target_modules`, `r`). `--backbone`
takes a 3D backbone (`swinunetr`, `stunet_s`...`stunet_h`); each needs its own checkpoint and patch rules.

## Evaluation and inference

    python -m monai.bundle run evaluate --config_file "['configs/finetune.json','configs/evaluate.json']" \\
        --dataset_dir /path/to/download
    python -m monai.bundle run --config_file configs/inference.json --input_dir /path/to/volumes

As the STU-Net bundles: organ, tumour and mean Dice per case (`runs/evaluate/dice_per_case.csv`), NIfTI label maps
with each input's affine and shape.

{_common_sections(kind)}"""
