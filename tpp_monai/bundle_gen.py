"""One generator for every bundle: ``python -m tpp_monai bundles [--check]``.

Each bundle is a dataset x PEFT method pair (``bundles/<dataset>_<method>/``) holding configuration only; all code
lives in ``tpp_monai`` and is referenced by dotted ``_target_`` paths. The configs are built here from the dataset
table (:mod:`tpp_monai.data.info`), the method registry (:mod:`tpp_monai.peft`) and the training recipes below, so
the 2D bundles differ only in those values. ``--check`` fails when a committed bundle differs from what this module
writes.
"""

from __future__ import annotations

import argparse
import difflib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tpp_monai import __version__
from tpp_monai.data.info import DATASETS, DatasetInfo
from tpp_monai.errors import UserError
from tpp_monai.network import FROM_MODEL_FILE
from tpp_monai.peft import METHODS, get_method

BUNDLES_DIR = Path(__file__).resolve().parents[1] / "bundles"
MONAI_VERSION = "1.6.1"
TORCH_VERSION = "2.13.0"

# ---------------------------------------------------------------------------------------------------------------
# Recipes


@dataclass(frozen=True)
class TPPRecipe:
    """The TPP stage (paper §4.2): MAE, AdamW lr 1.5e-3, wd 1.5e-2, batch 64, 40 warm-up epochs then cosine; 500
    epochs for classification and 1000 for segmentation; the inherited MAE decoder frozen for classification and
    updated for segmentation (§5.5)."""

    epochs: int
    mae_decoder: str


def tpp_recipe(info: DatasetInfo) -> TPPRecipe:
    return TPPRecipe(epochs=500, mae_decoder="freeze") if info.task == "cls" else TPPRecipe(1000, "update")


@dataclass(frozen=True)
class FinetuneRecipe:
    """Fine-tuning (paper Table 2 and §4.2, with MedCoSS's recipe: AdamW, weight decay 1e-4, per-epoch poly(0.9)
    decay, gradient-norm clipping at 12): loss, learning rate, batch size and iterations per dataset; MHIST's
    learning rate was grid-searched per method."""

    batch_size: int
    iterations: int
    lr: float


TABLE2 = {"mhist": (32, 2700), "oct_c8": (32, 57500), "chest_xray_pa": (32, 1980), "glas": (4, 25000),
          "qata": (16, 25000)}  # fmt: skip
# Paper §4.2; LoRA is not in the paper's grid: 5e-4 is this project's choice (between Adapter's and SSF's).
MHIST_LR = {"full_finetune": 1e-5, "linear_probe": 1e-2, "evp": 5e-5, "vpt": 1e-4, "ssf": 1e-3, "bitfit": 1e-3,
            "adapter": 1e-4, "adaptformer": 1e-3, "dtl": 5e-3, "lora": 5e-4}  # fmt: skip


def finetune_recipe(info: DatasetInfo, method: str) -> FinetuneRecipe:
    batch, iterations = TABLE2[info.name]
    return FinetuneRecipe(batch, iterations, MHIST_LR[method] if info.name == "mhist" else 1e-4)


BASELINES = ("full_finetune", "linear_probe")
# Small settings of the demo overlay: tiny backbone, random weights, demo data, a few epochs on 2 CPU cores.
DEMO_IMAGE_SIZE = 64


def bundle_names(spatial_dims: int | None = None) -> list[str]:
    """Every bundle this generator writes (only the 2D or the 3D ones with ``spatial_dims``)."""
    names = [name for name, _ in _bundles()]
    if spatial_dims is None:
        return names
    from tpp_monai import bundle_gen3d

    three = {name for name, _ in bundle_gen3d.bundles()}
    return [n for n in names if (n in three) == (int(spatial_dims) == 3)]


def _bundles() -> list[tuple[str, Callable[[], dict[str, object]]]]:
    get_method("adapter")  # registers the methods
    out = []
    for info in DATASETS.values():
        if info.spatial_dims != 2:
            continue
        for method, spec in sorted(METHODS.items()):
            if "medcoss" in spec.families and (spec.pretrainable or method in BASELINES):
                out.append((f"{info.name}_{method}", _files_factory(info, method)))
    from tpp_monai import bundle_gen3d  # the 3D (STU-Net) bundles; imported here because it imports this module

    return out + bundle_gen3d.bundles()


def _files_factory(info: DatasetInfo, method: str) -> Callable[[], dict[str, object]]:
    return lambda: bundle_files(info, method)


# ---------------------------------------------------------------------------------------------------------------
# Configs


def _common(info: DatasetInfo, method: str, workflow: str) -> dict:
    """Keys every workflow of every bundle shares (the common override keys)."""
    name = f"{info.name}_{method}"
    return {
        "imports": ["$import os", "$import torch", "$import monai", "$import tpp_monai.workflows as tpp"],
        "bundle_root": f"$tpp.bundle_root('{name}')",
        "dataset_name": info.name,
        "method": method,
        "method_options": {},
        "dataset_dir": "$@bundle_root + '/data'",
        "datalist": "$@dataset_dir + '/datalist.json'",
        "runs_dir": "$@bundle_root + '/runs'",
        "output_dir": f"$@runs_dir + '/{workflow}'",
        "tracking_uri": "$monai.utils.path_to_sqlite_uri(@runs_dir + '/mlruns.db')",
        "experiment_name": name,
        "run_name": f"$'{workflow}_' + __import__('time').strftime('%Y%m%d_%H%M%S')",
        "backbone": "medcoss_vit_b16",
        "backbone_ckpt": None,
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "amp": "$torch.cuda.is_available()",
        "num_workers": "$tpp.cpu_workers()",
        "seed": 0,
        "image_size": list(info.image_size),
        "tensorboard": True,
        "run_tags": {},
        "parent_run_id": None,
        "save_execute_config": True,
    }


def run_tracker(stage: str, **refs: str) -> dict:
    """The :class:`tpp_monai.tracking.RunTracker` of a workflow (TensorBoard, MLflow params/tags/artifacts, plots);
    ``refs``: ``validator`` (training) or ``loader`` (evaluation)."""
    return {
        "_target_": "tpp_monai.tracking.RunTracker",
        "output_dir": "@output_dir",
        "stage": stage,
        "bundle": "@bundle_root",
        "run_tags": "@run_tags",
        "parent_run_id": "@parent_run_id",
        "config_path": "@save_execute_config",
        "tensorboard": "@tensorboard" if stage != "evaluate" else False,
        **refs,
    }


def _training_tail(resume_state: dict) -> list[dict]:
    """The handlers every training workflow ends ``train#handlers`` with: the resumable checkpoint (``resume_state``
    plus the random state and the engine), the NaN/inf guard, a progress bar and the epoch log."""
    return [
        {
            "_target_": "tpp_monai.handlers.SafeCheckpointSaver",
            "save_dir": "$@output_dir + '/checkpoints'",
            "save_dict": {**resume_state, "rng": "$tpp.RandomStates(@train#preprocessing)"},
            "engine_key": "trainer",
            "resume": "@resume",
            "save_interval": 1,
            "n_saved": 1,
        },
        {
            "_target_": "tpp_monai.handlers.NonFiniteLossGuard",
            "checkpoint_dir": "$@output_dir + '/checkpoints'",
            "lr": "@lr",
            "amp": "@amp",
        },
        {"_target_": "tpp_monai.handlers.ProgressBar"},
        {
            "_target_": "StatsHandler",
            "iteration_log": False,
            "tag_name": "train_loss",
            "output_transform": "$monai.handlers.from_engine(['loss'], first=True)",
        },
    ]


def _trainer(prepare_batch: str | dict) -> dict:
    """``train#trainer`` of every training workflow (bf16 autocast when ``amp``, gradients set to ``None``)."""
    return {
        "_target_": "tpp_monai.engines.LeanTrainer",
        "max_epochs": "@epochs",
        "device": "@device",
        "train_data_loader": "@train#dataloader",
        "network": "@network",
        "loss_function": "@loss",
        "optimizer": "@optimizer",
        "inferer": "@train#inferer",
        "prepare_batch": prepare_batch,
        "train_handlers": "@train#handlers",
        "amp": "@amp",
        "amp_kwargs": {"dtype": "$torch.bfloat16"},
        "optim_set_to_none": True,
    }


def pretrain_tpp_base(info: DatasetInfo, method: str) -> dict:
    """The TPP stage's config (MAE by default, ``--pretext dino``) before its settings record, which the 3D stage
    adds after its own changes."""
    recipe = tpp_recipe(info)
    cfg = _common(info, method, "pretrain_tpp")
    cfg["imports"].append("$import tpp_monai.pretext as pretexts")
    cfg.update(
        {
            "pretext": "mae",
            "resume": False,
            "distributed": False,
            "tpp_epochs": recipe.epochs,
            "epochs": "@tpp_epochs",
            "batch_size": 64,
            "pretext_size": 224,
            "lr": "$1.5e-3 if @pretext == 'mae' else 1e-4 * @batch_size / 256",
            "weight_decay": "$1.5e-2 if @pretext == 'mae' else 0.04",
            "weight_decay_end": "$@weight_decay if @pretext == 'mae' else 0.4",
            "warmup_epochs": "$40 if @pretext == 'mae' else 10",
            "mae_decoder": recipe.mae_decoder,
            "mask_ratio": 0.75,
            "dino": {},
            "activation_checkpointing": False,
            "network_def": {
                "_target_": "tpp_monai.network.build_network",
                "backbone": "@backbone",
                "task": "features",
                "method": "@method",
                "method_options": "@method_options",
                "backbone_ckpt": "@backbone_ckpt",
                "stage": "tpp",
                "keep_mae_decoder": "$@pretext == 'mae'",
            },
            "pretext_net": {
                "_target_": "tpp_monai.pretext.build_pretext",
                "pretext": "@pretext",
                "encoder": "@network_def",
                "image_size": "@pretext_size",
                "mae_decoder": "@mae_decoder",
                "mask_ratio": "@mask_ratio",
                "decoder": "$tpp.mae_decoder_geometry(@backbone)",
                "dino": "@dino",
            },
            "network_module": "@pretext_net",
            "network": "$@network_module.to(@device)",
            "loss": "$pretexts.pretext_loss(@pretext, @pretext_net, @dino).to(@device)",
            "optimizer": {
                "_target_": "torch.optim.AdamW",
                "params": "$tpp.param_groups(@pretext_net, @weight_decay)",
                "lr": "@lr",
                "betas": "$pretexts.adamw_betas(@pretext)",  # MAE (0.9, 0.95), DINO PyTorch's (0.9, 0.999)
                # one fused kernel per step (CPU and CUDA) instead of a Python loop over the tensors: 55 -> 10 ms
                # per TPP-MAE step of ViT-B/16 with adapters on 2 CPU cores
                "fused": True,
            },
            "train": {
                **_data_section(
                    "training",
                    "$pretexts.pretext_transforms(@pretext, @dataset_name, @pretext_size, @image_size, @dino)",
                    "@batch_size",
                    True,
                    records="$tpp.images_of(@datalist, @dataset_dir, 'training')",
                ),
                "iters_per_epoch": "$len(@train#dataloader)",
                "inferer": {"_target_": "SimpleInferer"},
                "handlers": [
                    {
                        "_target_": "tpp_monai.handlers.OptimizerScheduleHandler",
                        "optimizer": "@optimizer",
                        "lr": "$pretexts.lr_schedule(@pretext, @lr, @epochs, @train#iters_per_epoch, @warmup_epochs, "
                        "@dino)",
                        "weight_decay": "$tpp.wd_schedule(@weight_decay, @weight_decay_end, @epochs, "
                        "@train#iters_per_epoch)",
                    },
                    {
                        "_target_": "tpp_monai.pretext.PretextHandlers",
                        "net": "@pretext_net",
                        "loss": "@loss",
                        "epochs": "@epochs",
                        "iters_per_epoch": "@train#iters_per_epoch",
                        "dino": "@dino",
                    },
                    {
                        "_target_": "tpp_monai.handlers.HistoryWriter",
                        "path": "$@output_dir + '/history.csv'",
                        "optimizer": "@optimizer",
                    },
                    run_tracker("pretrain_tpp"),
                    {
                        "_target_": "tpp_monai.handlers.TargetStateSaver",
                        "model": "$pretexts.export_backbone(@pretext_net)",
                        "path": "$@output_dir + '/tpp_target.pt'",
                        "info": {"pretext": "@pretext", "dataset": "@dataset_name"},
                    },
                    *_training_tail(
                        {
                            "target_state": "$pretexts.TargetStateView(@network_def)",
                            "pretext": "$pretexts.resume_state(@pretext_net)",
                            "optimizer": "@optimizer",
                            "loss": "@loss",
                        }
                    ),
                ],
                "trainer": _trainer("$pretexts.PretextBatch(@pretext)"),
            },
            "initialize": _training_initialize(
                "$tpp.check_settings(@dataset_name, @method, @backbone, @pretext, @datalist, @dataset_dir, "
                "image_size=@image_size)",
                "$tpp.check_output(@output_dir, @resume)",
            ),
            "pretrain_tpp": ["$@train#trainer.run()"],
        }
    )
    return cfg


def pretrain_tpp_config(info: DatasetInfo, method: str) -> dict:
    """``configs/pretrain_tpp.json``: the TPP stage (MAE by default, ``--pretext dino``) with its settings record."""
    return _with_settings_record(pretrain_tpp_base(info, method))


SECTIONS = {"training": "train", "validation": "validate", "test": "test"}


def _records(split: str) -> str:
    if split == "training":
        return "$tpp.records_of(@datalist, @dataset_dir, 'training', @label_fraction, @seed, @dataset_name)"
    return f"$tpp.records_of(@datalist, @dataset_dir, '{split}', dataset=@dataset_name)"


def _data_section(
    split: str, transforms: str, batch_size: str, shuffle: bool, cache: bool = True, records: str | None = None
) -> dict:
    """datalist -> (cached) dataset -> sampler -> dataloader of one split.

    The sampler is a ``DistributedSampler`` when a process group is initialised (``multi_gpu.json`` under
    torchrun) and ``None`` otherwise, so the same config serves one process and several.
    """
    section = f"@{SECTIONS[split]}"
    return {
        "datalist": records or _records(split),
        "preprocessing": transforms,
        "dataset": {
            "_target_": "CacheDataset" if cache else "Dataset",
            "data": f"{section}#datalist",
            "transform": f"{section}#preprocessing",
            **({"cache_rate": 1.0, "num_workers": "@num_workers", "progress": "$tpp.progress_bars()"} if cache else {}),
        },
        "sampler": f"$tpp.distributed_sampler({section}#dataset, shuffle={shuffle})",
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": f"{section}#dataset",
            "batch_size": batch_size,
            "sampler": f"{section}#sampler",
            "shuffle": f"${section}#sampler is None and {shuffle}",
            **({"drop_last": f"$len({section}#dataset) > {batch_size}"} if shuffle else {}),
            "num_workers": "@num_workers",
            "pin_memory": "$torch.cuda.is_available()",
            **({"persistent_workers": "$@num_workers > 0"} if shuffle else {}),
        },
    }


def _network_def(info: DatasetInfo, backbone_ckpt: str, tpp_ckpt: str, classes: str | int | None = None) -> dict:
    num_classes = len(info.classes) if classes is None else classes
    task = {"cls": {"task": "cls", "num_classes": num_classes}, "seg": {"task": "seg", "out_channels": 1}}
    return {
        "_target_": "tpp_monai.network.build_network",
        "backbone": "@backbone",
        **task[info.task],
        "method": "@method",
        "method_options": "@method_options",
        "backbone_ckpt": backbone_ckpt,
        "tpp_ckpt": tpp_ckpt,
        "stage": "finetune",
    }


def _inferer(info: DatasetInfo, flips: bool = False) -> dict:
    if info.task == "cls":
        return {"_target_": "tpp_monai.inferers.PlainInferer"}
    return {
        "_target_": "tpp_monai.inferers.SegmentationInferer",
        "roi_size": "@image_size",
        "overlap": 0.5,
        "flips": [[2], [3], [2, 3]] if flips else [],
    }


def _postprocessing(info: DatasetInfo, save_masks: str | None = None) -> dict:
    """Softmax probabilities (classification) or masks thresholded at 0.5 (segmentation), optionally saved."""
    if info.task == "cls":
        return {"_target_": "Compose", "transforms": [{"_target_": "Activationsd", "keys": "pred", "softmax": True}]}
    steps: list = [{"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5}]
    if save_masks:  # a copy back at the input image's size and geometry, thresholded and saved (metrics: as before)
        steps[:0] = [
            {"_target_": "CopyItemsd", "keys": "pred", "names": "mask"},
            {**INVERT_PRED, "keys": "mask", "transform": "@test#preprocessing"},
            {"_target_": "AsDiscreted", "keys": "mask", "threshold": 0.5},
            f"$tpp.mask_saver({save_masks[1:]}, 'mask')",
            {"_target_": "DeleteItemsd", "keys": "mask"},
        ]
    return {"_target_": "Compose", "transforms": steps}


def _metrics(info: DatasetInfo, prefix: str, test: bool) -> tuple[dict, dict]:
    """(key metric, additional metrics): MedCoSS selects by ACC+AUC+F1 (classification) or Dice (segmentation)."""
    if info.task == "cls":
        handler = "tpp_monai.metrics.ClassificationMetricHandler"
        key = {f"{prefix}score": {"_target_": handler, "key": "score"}}
        return key, {f"{prefix}{k}": {"_target_": handler, "key": k} for k in ("acc", "auc", "f1")}
    handler = "tpp_monai.metrics.SegMetricHandler"
    key = {f"{prefix}dice": {"_target_": handler, "key": "dice", "save_details": test}}
    return key, ({f"{prefix}hd95": {"_target_": handler, "key": "hd95", "save_details": True}} if test else {})


SETTINGS_EXCLUDED = {"imports", "initialize", "finalize", "network_def", "network", "network_module", "pretext_net",
                     "loss", "optimizer", "train", "validate", "test", "evaluator", "handlers", "inferer",
                     "postprocessing", "preprocessing", "dataset", "dataloader", "checkpoint_loader", "key_metric",
                     "additional_metrics", "datalist_records"}  # fmt: skip


GPU_SETTINGS = "$tpp.gpu_settings()"
EVALUATE_INITIALIZE = [
    "$tpp.install_excepthook()",
    GPU_SETTINGS,
    "$tpp.check_settings(@dataset_name, @method, @backbone, datalist=@datalist, dataset_dir=@dataset_dir, "
    "keys=('test',))",
    "$monai.utils.set_determinism(seed=@seed)",
]


def _training_initialize(check_settings: str, check_output: str) -> list[str]:
    """``initialize`` of the training workflows: clear errors first, then the process group (``multi_gpu.json``
    sets ``distributed``), fail-fast checks, seeding, the network (so option and checkpoint errors surface before
    any data is cached), and the record of the resolved settings."""
    return [
        "$tpp.install_excepthook()",
        "$tpp.init_distributed() if @distributed else None",
        GPU_SETTINGS,
        check_settings,
        check_output,
        "$monai.utils.set_determinism(seed=@seed)",
        "$@network_def",
        "$tpp.activation_checkpointing(@network_module, @activation_checkpointing)",
    ]


def _recorded_keys(cfg: dict) -> list[str]:
    """The plain top-level settings of a workflow (what ``settings.json`` records)."""
    run_ids = ("pretrain_tpp", "finetune", "evaluate", "run")
    return [
        k for k, v in cfg.items()
        if k not in SETTINGS_EXCLUDED and k not in run_ids and not (isinstance(v, dict) and "_target_" in v)
    ]  # fmt: skip


def _with_settings_record(cfg: dict) -> dict:
    """Append to ``initialize`` the record of every plain top-level setting (seed, lr, epochs, paths...)."""
    keys = _recorded_keys(cfg)
    cfg["initialize"].append("$tpp.record_settings(@output_dir, {" + ", ".join(f"'{k}': @{k}" for k in keys) + "})")
    return cfg


TRAINABLE_PARAMS = "$[p for p in @network_def.parameters() if p.requires_grad]"
CHECKPOINT_LOADER = {
    "_target_": "tpp_monai.handlers.VerifiedCheckpointLoader",
    "load_path": "$@ckpt_dir + '/model.pt'",
    "load_dict": {"model": "@network_def"},
}
EVALUATION_WRITER = {
    "_target_": "tpp_monai.handlers.EvaluationWriter",
    "output_dir": "@output_dir",
    "loader": "@checkpoint_loader",
    "info": {"evaluated_split": "test", "ckpt": "$@ckpt_dir + '/model.pt'", "datalist": "@datalist",
             "dataset_dir": "@dataset_dir"},
}  # fmt: skip


def _evaluator(loader: str, inferer: str, post: str, handlers: str, metrics: tuple[str, str] | None) -> dict:
    """A ``SupervisedEvaluator`` (bf16 autocast when ``amp``), with key and additional metrics when given."""
    evaluator = {
        "_target_": "SupervisedEvaluator",
        "device": "@device",
        "val_data_loader": loader,
        "network": "@network",
        "inferer": inferer,
        "postprocessing": post,
        "val_handlers": handlers,
        "amp": "@amp",
        "amp_kwargs": {"dtype": "$torch.bfloat16"},
    }
    if metrics:
        evaluator.update({"key_val_metric": metrics[0], "additional_metrics": metrics[1]})
    return evaluator


def _validator() -> dict:
    """``validate#evaluator``: the ``validate`` section's loader, inferer, postprocessing, metrics and handlers."""
    return _evaluator("@validate#dataloader", "@validate#inferer", "@validate#postprocessing", "@validate#handlers",
                      ("@validate#key_metric", "@validate#additional_metrics"))  # fmt: skip


def _finetune_handlers() -> list[dict]:
    """``train#handlers`` of every ``finetune``: poly schedule, gradient clipping, validation, the history CSV and
    the training tail (the resume state names the best-model saver of ``validate#handlers``)."""
    return [
        {
            "_target_": "tpp_monai.handlers.OptimizerScheduleHandler",
            "optimizer": "@optimizer",
            "lr": "$tpp.poly_schedule(@lr, @epochs, @train#iters_per_epoch)",
        },
        {"_target_": "tpp_monai.handlers.GradientClipHandler", "params": TRAINABLE_PARAMS, "max_norm": "@grad_clip"},
        {
            "_target_": "tpp_monai.handlers.ValidationHandler",
            "validator": "@validate#evaluator",
            "interval": "@val_interval",
            "epoch_level": True,
        },
        {
            "_target_": "tpp_monai.handlers.HistoryWriter",
            "path": "$@output_dir + '/history.csv'",
            "optimizer": "@optimizer",
            "validator": "@validate#evaluator",
            "metrics": ["@validate#key_metric", "@validate#additional_metrics"],
        },
        run_tracker("finetune", validator="@validate#evaluator"),
        *_training_tail(
            {
                "trainable": "$tpp.trainable_state(@network_def)",
                "optimizer": "@optimizer",
                "best_model": "@validate#handlers#1",
            }
        ),
    ]


def _best_model_handlers(extra_info: str = "") -> list[dict]:
    """``validate#handlers``: the epoch log and the best model as ``<ckpt_dir>/model.pt`` with how it was made."""
    return [
        # errors only: the history writer logs one line per validation
        {"_target_": "StatsHandler", "iteration_log": False, "epoch_log": False},
        {
            "_target_": "tpp_monai.handlers.SafeCheckpointSaver",
            "save_dir": "@ckpt_dir",
            "save_dict": {"model": "@network_def"},
            "save_key_metric": True,
            "key_metric_filename": "model.pt",
            "run_info": "$tpp.run_info(dataset=@dataset_name, method=@method, method_options=@method_options, "
            "backbone=@backbone, backbone_ckpt=@backbone_ckpt, tpp_ckpt=@tpp_ckpt, seed=@seed, lr=@lr, "
            f"label_fraction=@label_fraction, finetune_dir=@output_dir{extra_info})",
        },
    ]


def finetune_settings(baseline: bool, lr: float, batch_size: int, iterations: int) -> dict:
    """The plain settings every fine-tuning workflow (2D and 3D) starts with: the TPP file (``none`` for a
    baseline), the best-model folder, resume, the recipe's lr / batch / iterations (epochs follow from the loader),
    label subsampling and activation checkpointing."""
    return {
        "tpp_ckpt": "none" if baseline else "$@runs_dir + '/pretrain_tpp/tpp_target.pt'",
        "ckpt_dir": "$@bundle_root + '/models'",
        "resume": False,
        "distributed": False,
        "lr": lr,
        "batch_size": batch_size,
        "iterations": iterations,
        "epochs": "$tpp.epochs_for(@iterations, @train#iters_per_epoch)",
        "activation_checkpointing": False,
        "label_fraction": None,
        "val_batch_size": 1,
    }


def finetune_config(info: DatasetInfo, method: str) -> dict:
    """``configs/finetune.json``: target parameters (from ``pretrain_tpp``, or random with ``--tpp_ckpt none``) and a
    fresh head trained with the backbone frozen; the best validation checkpoint is ``models/model.pt``."""
    recipe = finetune_recipe(info, method)
    baseline = method in BASELINES
    cfg = _common(info, method, "finetune")
    cfg["imports"].append("$import tpp_monai.data as tpp_data")
    key_metric, extra_metrics = _metrics(info, "val_", test=False)
    loss = (
        {"_target_": "torch.nn.CrossEntropyLoss"}
        if info.task == "cls"
        else {"_target_": "DiceCELoss", "sigmoid": True, "smooth_nr": 1.0, "smooth_dr": 1.0}
    )
    cfg.update(
        {
            **finetune_settings(baseline, recipe.lr, recipe.batch_size, recipe.iterations),
            "weight_decay": 1e-4,
            "grad_clip": 12.0,
            "val_interval": 1,
            **({"num_classes": len(info.classes)} if info.task == "cls" else {}),
            "network_def": _network_def(info, "@backbone_ckpt", "@tpp_ckpt", classes="@num_classes"),
            "network_module": "@network_def",
            "network": "$@network_module.to(@device)",
            "loss": loss,
            "optimizer": {
                "_target_": "torch.optim.AdamW",
                "params": TRAINABLE_PARAMS,
                "lr": "@lr",
                "weight_decay": "@weight_decay",
                "fused": True,
            },
            "train": {
                **_data_section(
                    "training", "$tpp_data.train_transforms(@dataset_name, @image_size)", "@batch_size", True
                ),
                "iters_per_epoch": "$len(@train#dataloader)",
                "inferer": {"_target_": "SimpleInferer"},
                "handlers": _finetune_handlers(),
                "trainer": _trainer({"_target_": "tpp_monai.engines.PlainBatch"}),
            },
            "validate": {
                **_data_section(
                    "validation", "$tpp_data.eval_transforms(@dataset_name, @image_size)", "@val_batch_size", False
                ),
                "inferer": _inferer(info),
                "postprocessing": _postprocessing(info),
                "key_metric": key_metric,
                "additional_metrics": extra_metrics,
                "handlers": _best_model_handlers(),
                "evaluator": _validator(),
            },
            "initialize": _training_initialize(
                "$tpp.check_settings(@dataset_name, @method, @backbone, datalist=@datalist, dataset_dir=@dataset_dir, "
                "keys=('training', 'validation'), tpp_ckpt=@tpp_ckpt, image_size=@image_size"
                + (", num_classes=@num_classes)" if info.task == "cls" else ")"),
                "$tpp.check_output(@output_dir, @resume, @ckpt_dir)",
            ),
            "finetune": ["$@train#trainer.run()"],
        }
    )
    return _with_settings_record(cfg)


def evaluate_config(info: DatasetInfo, method: str) -> dict:
    """``configs/evaluate.json``: the best fine-tuned model on the test split; metrics as JSON and CSV, per image."""
    cfg = _common(info, method, "evaluate")
    cfg["imports"].append("$import tpp_monai.data as tpp_data")
    key_metric, extra_metrics = _metrics(info, "", test=True)
    writer = {"_target_": "tpp_monai.writers.ClassificationWriter", "output_dir": "@output_dir",
              "dataset": "@dataset_name"}  # fmt: skip
    savers = [writer] if info.task == "cls" else []
    cfg.update(
        {
            "backbone_ckpt": "none",
            "ckpt_dir": "$@bundle_root + '/models'",
            "val_batch_size": 1,
            "network_def": _network_def(info, FROM_MODEL_FILE, "none"),
            "network": "$@network_def.to(@device)",
            "test": _data_section(
                "test", "$tpp_data.eval_transforms(@dataset_name, @image_size)", "@val_batch_size", False, cache=False
            ),
            "inferer": _inferer(info, flips=info.name == "glas"),
            "postprocessing": _postprocessing(info, save_masks="$@output_dir + '/predictions'"),
            "key_metric": key_metric,
            "additional_metrics": extra_metrics,
            "checkpoint_loader": CHECKPOINT_LOADER,
            "handlers": [
                "@checkpoint_loader",
                {"_target_": "StatsHandler", "iteration_log": False},
                {
                    "_target_": "MetricsSaver",
                    "save_dir": "@output_dir",
                    "metrics": "*",
                    "metric_details": "*",
                    "batch_transform": "$lambda batch: [b['image'].meta for b in batch]",
                    "summary_ops": "*",
                },
                *savers,
                EVALUATION_WRITER,
                run_tracker("evaluate", loader="@checkpoint_loader"),
            ],
            "evaluator": _evaluator(
                "@test#dataloader", "@inferer", "@postprocessing", "@handlers", ("@key_metric", "@additional_metrics")
            ),
            "initialize": EVALUATE_INITIALIZE,
            "evaluate": ["$@evaluator.run()"],
        }
    )
    return cfg


INVERT_PRED = {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
               "nearest_interp": False, "to_tensor": True}  # fmt: skip


def inference_settings(network_def: dict, transforms: str, inferer: dict, postprocessing: dict, writers: list):
    """What every ``inference.json`` (2D and 3D) holds: a folder of images in, one per batch, through
    ``transforms``, the fine-tuned ``models/model.pt`` (digest checked), ``inferer`` and ``postprocessing``, then
    ``writers``."""
    return {
        "backbone_ckpt": "none",
        "ckpt_dir": "$@bundle_root + '/models'",
        "input_dir": "$@bundle_root + '/data/images'",
        "network_def": network_def,
        "network": "$@network_def.to(@device)",
        "datalist": "$tpp.image_files(@input_dir)",
        "preprocessing": {"_target_": "Compose", "transforms": transforms},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": "@num_workers",
        },
        "inferer": inferer,
        "postprocessing": postprocessing,
        "handlers": [CHECKPOINT_LOADER, {"_target_": "StatsHandler", "iteration_log": False}, *writers],
        "evaluator": _evaluator("@dataloader", "@inferer", "@postprocessing", "@handlers", None),
        "run": ["$@evaluator.run()"],
    }


def inference_config(info: DatasetInfo, method: str) -> dict:
    """``configs/inference.json`` (model-zoo layout): a folder of images in, masks (PNG) or class probabilities
    (CSV) out, with the fine-tuned ``models/model.pt``."""
    cfg = _common(info, method, "inference")
    cfg["imports"].append("$import tpp_monai.data as tpp_data")
    post = _postprocessing(info)
    if info.task == "cls":
        writers = [{"_target_": "tpp_monai.writers.ClassificationWriter", "output_dir": "@output_dir",
                    "dataset": "@dataset_name"}]  # fmt: skip
    else:
        # back to each input's own size (the resize of the preprocessing undone) before thresholding and saving
        post["transforms"].insert(0, dict(INVERT_PRED))
        post["transforms"].append("$tpp.mask_saver(@output_dir)")  # fmt: skip
        writers = []
    cfg.update(
        inference_settings(
            _network_def(info, FROM_MODEL_FILE, "none"), "$tpp_data.image_transforms(@dataset_name, @image_size)",
            _inferer(info, flips=info.name == "glas"), post, writers,
        )
    )  # fmt: skip
    cfg["initialize"] = ["$tpp.install_excepthook()", GPU_SETTINGS, "$monai.utils.set_determinism(seed=@seed)"]
    return cfg


def multi_gpu_config() -> dict:
    """``configs/multi_gpu.json``: overlay for ``pretrain_tpp`` and ``finetune`` under torchrun (DDP; NCCL on GPUs,
    gloo on CPU). Only rank 0 writes checkpoints and tracking (the handlers check the rank); the samplers shard the
    data as soon as the process group exists; the DINO centre is all-reduced and the EMA follows identical students,
    which ``finalize`` verifies."""
    return {
        "device": "$torch.device('cuda:' + os.environ.get('LOCAL_RANK', '0')) if torch.cuda.is_available() "
        "else torch.device('cpu')",
        "network": {
            "_target_": "torch.nn.parallel.DistributedDataParallel",
            "module": "$@network_module.to(@device)",
            "device_ids": "$[@device] if torch.cuda.is_available() else None",
            # trainable tensors the forward pass never uses (MedCoSS's 3D embedding under BitFit or full fine-tuning)
            # must not block the reduction; searching for them when there are none costs a pass and a warning
            "find_unused_parameters": "$tpp.has_unused_trainable(@network_module)",
        },
        "distributed": True,
        "finalize": ["$tpp.assert_replicas_agree(@network_module)", "$tpp.finish_distributed()"],
    }


def demo_config(info: DatasetInfo) -> dict:
    """``configs/demo.json``: overlay for the demo data, a tiny random backbone and a few epochs (about a minute)."""
    size = [DEMO_IMAGE_SIZE] * info.spatial_dims
    return {
        "dataset_dir": f"$tpp.demo_dataset('{info.name}', @runs_dir + '/demo_data')",
        "backbone": "medcoss_vit_tiny",
        "backbone_ckpt": "none",
        "image_size": size,
        "pretext_size": DEMO_IMAGE_SIZE,
        "tpp_epochs": 60,
        "iterations": 150,
        "val_interval": 5,
        "batch_size": 4,
        "warmup_epochs": 2,
        "mae_decoder": "random",
        "num_workers": 0,
        "dino": {
            "out_dim": 1024,
            "hidden_dim": 256,
            "bottleneck_dim": 64,
            "global_size": DEMO_IMAGE_SIZE,
            "local_size": 32,
            "num_local": 2,
        },
    }


def metadata(info: DatasetInfo, method: str) -> dict:
    """``configs/metadata.json`` in the model-zoo format."""
    spec = get_method(method)
    dims = info.spatial_dims
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
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": __version__,
        "changelog": {__version__: "initial bundle generated by tpp_monai"},
        "monai_version": MONAI_VERSION,
        "pytorch_version": TORCH_VERSION,
        "numpy_version": "2.4",
        "required_packages_version": {"tpp-monai": __version__, "pytorch-ignite": "0.5.5"},
        "name": f"{info.title} {method} (TPP)",
        "task": f"{info.title} {'classification' if info.task == 'cls' else 'segmentation'} with {method} PEFT",
        "description": (
            f"{spec.summary}, on a frozen MedCoSS ViT-B/16, for {info.title} ({info.modality}). Target Parameter "
            "Pre-training (TPP) pre-trains the method's target parameters with MAE or DINO on the training images "
            "before fine-tuning (pretrain_tpp, then finetune)."
        ),
        "authors": "tpp-monai",
        "copyright": "tpp-monai contributors; datasets under their own licences (see docs/README.md)",
        "data_source": info.title,
        "data_type": "png/jpg/bmp images",
        "intended_use": "research only",
        "references": [
            "Lei et al., Pre-training Everywhere: Parameter-Efficient Fine-Tuning for Medical Image Analysis via "
            "Target Parameter Pre-training",
            "Ye et al., Continual Self-supervised Learning: Towards Universal Multi-modal Medical Data Representation "
            "Learning (MedCoSS), CVPR 2024",
        ],
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": info.modality,
                    "num_channels": info.in_channels,
                    "spatial_shape": ["16*n"] * dims,
                    "dtype": "float32",
                    "value_range": value_range,
                    "is_patch_data": False,
                    "channel_def": {"0": "R", "1": "G", "2": "B"},
                },
            },
            "outputs": {"pred": output},
        },
    }


# ignite's engines log every start, epoch and checkpoint at INFO; the runs log one line per epoch and validation
LOGGING_CONF = """[loggers]
keys=root,ignite

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[logger_ignite]
level=WARNING
handlers=
qualname=ignite
propagate=1

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


def readme(info: DatasetInfo, method: str) -> str:
    name = f"{info.name}_{method}"
    recipe, ft = tpp_recipe(info), finetune_recipe(info, method)
    decoder = "frozen" if recipe.mae_decoder == "freeze" else "updated"
    metric_text = "ACC, AUC, macro F1" if info.task == "cls" else "Dice and HD95 per image, Gaussian sliding window"
    output_text = "class probabilities to predictions.csv" if info.task == "cls" else "PNG masks at each input's size"
    demo = f"\"['bundles/{name}/configs/{{workflow}}.json','bundles/{name}/configs/demo.json']\""
    if method in BASELINES:
        stage = (
            f"## Why there is no `pretrain_tpp` here\n\n{get_method(method).summary}. TPP pre-trains the *new* "
            "parameters a PEFT method adds; this baseline adds none, so pretrain_tpp does not apply and the bundle "
            "ships `finetune`, `evaluate` and `inference` only (the paper's baseline rows of Tables 3 and 4).\n"
        )
        tpp_note = ""
    else:
        stage = f"""## TPP stage (MAE by default; `--pretext dino` for DINO)

    python -m monai.bundle run pretrain_tpp --config_file bundles/{name}/configs/pretrain_tpp.json \\
        --dataset_dir /path/to/download --backbone_ckpt /path/to/medcoss/checkpoint-299.pth

Defaults follow the paper: AdamW lr 1.5e-3, weight decay 1.5e-2, batch 64, 40 warm-up epochs then cosine,
{recipe.epochs} epochs, the MedCoSS MAE decoder inherited and {decoder}. The stage writes
`runs/pretrain_tpp/tpp_target.pt`: the target parameters only, with the method, options and backbone recorded.
"""
        tpp_note = (
            " It starts from `runs/pretrain_tpp/tpp_target.pt`; `--tpp_ckpt none` fine-tunes from randomly "
            "initialised target parameters (the paper's PEFT baseline)."
        )
    return f"""# {name}: {info.title} with {method}

Generated by `python -m tpp_monai bundles`; do not edit by hand. {get_method(method).summary}. Backbone: MedCoSS
ViT-B/16 (`--backbone path_dino_vit_s16` for the Path_DINO ViT-S/16 of the paper's Table 9).

## Data
Download {info.title} yourself, then build the datalist (train/validation/test, paths relative to the download):

    python -m tpp_monai datalist {info.name} --root /path/to/download --out /path/to/download/datalist.json

{stage}
## Fine-tuning

    python -m monai.bundle run finetune --config_file bundles/{name}/configs/finetune.json \\
        --dataset_dir /path/to/download --backbone_ckpt /path/to/medcoss/checkpoint-299.pth

Paper Table 2 / MedCoSS recipe: lr {ft.lr:g}, batch {ft.batch_size}, {ft.iterations:,} iterations, AdamW (weight
decay 1e-4), per-epoch poly(0.9) decay, gradient clipping 12; the best validation checkpoint
({"ACC+AUC+F1" if info.task == "cls" else "Dice"}) is written to `models/model.pt` with how it was made.{tpp_note}
`--label_fraction 0.1` keeps a stratified 10 % of the training labels (paper Figure 4).

## Evaluation and inference

    python -m monai.bundle run evaluate --config_file bundles/{name}/configs/evaluate.json \\
        --dataset_dir /path/to/download
    python -m monai.bundle run --config_file bundles/{name}/configs/inference.json --input_dir /path/to/images

`evaluate` writes `runs/evaluate/metrics.json`, `metrics.csv` and per-image CSVs ({metric_text}).
`inference` writes {output_text}.
`python -m tpp_monai report runs/evaluate ... --out report` builds the paper's table and plots.

## Demo (no download)
Add the demo overlay to any workflow: `--config_file {demo.format(workflow="finetune")}` (synthetic data in the
official layout, a tiny backbone with random weights, a few epochs on 2 CPU cores).

Common overrides: `bundle_root`, `dataset_dir`, `datalist`, `output_dir`, `backbone`, `backbone_ckpt` (`none` = random
weights), `pretext`, `epochs`, `batch_size`, `num_workers`, `device`, `seed`, `method_options` (e.g.
`"{{'bottleneck': 64}}"`). Add `--tracking mlflow` to record a run (SQLite store `runs/mlruns.db`).

## Licence of the data
{info.title}: see the dataset's own terms; nothing is redistributed here.
"""


PREFLIGHT_SPLITS = {"pretrain_tpp": (["training"], False), "finetune": (["training", "validation"], True),
                    "evaluate": (["test"], True)}  # fmt: skip


def with_input_checks(cfg: dict, workflow: str) -> dict:
    """Checks before anything is built (:mod:`tpp_monai.checks`): the user's settings and input files right after
    the error hook; a resume's settings against the recorded ones after ``check_output`` (which locked the folder);
    the data preflight after ``check_settings`` (which found the datalist); for inference, the folder
    read through ``preflight_inference`` (``--skip_bad_files``). Settings computed from the data are checked from
    the command line only, since resolving them would build the data pipeline."""
    from tpp_monai.checks import INPUT_FILES, SETTINGS

    def plain(value: object) -> bool:
        return not (isinstance(value, str) and "#" in value)

    settings = {k: f"@{k}" for k in SETTINGS if k in cfg and plain(cfg[k])}
    files = {k: f"@{k}" for k in INPUT_FILES if k in cfg and cfg[k] != "none"}
    init = cfg["initialize"] = list(cfg["initialize"])  # a copy: some lists are shared constants
    init.insert(1, {"_target_": "tpp_monai.checks.validate_settings", "settings": settings, "files": files})
    if "resume" in cfg:  # resume only with the recorded settings, checked before any model is built
        at = next(i for i, item in enumerate(init) if isinstance(item, str) and "check_output(" in item) + 1
        recorded = {k: f"@{k}" for k in _recorded_keys(cfg) if plain(cfg[k])}
        init.insert(at, {"_target_": "tpp_monai.run_folder.check_resume_settings", "output_dir": "@output_dir",
                         "settings": recorded, "resume": "@resume"})  # fmt: skip
    if workflow in PREFLIGHT_SPLITS:
        keys, labels = PREFLIGHT_SPLITS[workflow]
        at = next(i for i, item in enumerate(init) if isinstance(item, str) and "check_settings(" in item) + 1
        init.insert(at, {"_target_": "tpp_monai.checks.preflight_data", "datalist": "@datalist",
                         "dataset_dir": "@dataset_dir", "dataset": "@dataset_name", "keys": keys, "labels": labels})
    elif workflow == "inference":
        cfg["skip_bad_files"] = False
        cfg["datalist"] = {"_target_": "tpp_monai.checks.preflight_inference", "files": cfg["datalist"],
                           "dataset": "@dataset_name", "skip_bad_files": "@skip_bad_files"}  # fmt: skip
    return cfg


def assemble_bundle(metadata: dict, pretrain: dict | None, workflows: dict[str, dict], demo: dict, readme: str):
    """Relative path -> content (dict for JSON, str for text) of one bundle, from its parts; ``pretrain`` is
    ``None`` for the baselines (no target parameters, no TPP stage)."""
    files: dict[str, object] = {"configs/metadata.json": metadata}
    if pretrain is not None:
        files["configs/pretrain_tpp.json"] = with_input_checks(pretrain, "pretrain_tpp")
    files.update({f"configs/{name}.json": with_input_checks(cfg, name) for name, cfg in workflows.items()})
    files.update(
        {
            "configs/demo.json": demo,
            "configs/multi_gpu.json": multi_gpu_config(),
            "configs/logging.conf": LOGGING_CONF,
            "docs/README.md": readme,
        }
    )
    return files


def bundle_files(info: DatasetInfo, method: str) -> dict[str, object]:
    """Relative path -> content of one 2D bundle."""
    return assemble_bundle(
        metadata(info, method),
        None if method in BASELINES else pretrain_tpp_config(info, method),
        {
            "finetune": finetune_config(info, method),
            "evaluate": evaluate_config(info, method),
            "inference": inference_config(info, method),
        },
        demo_config(info),
        readme(info, method),
    )


def render(content: object) -> str:
    return content if isinstance(content, str) else json.dumps(content, indent=4) + "\n"


def write_bundles(out: Path = BUNDLES_DIR) -> list[str]:
    """(Re)write every bundle under ``out``; bundle folders that the table no longer has are left alone."""
    names = []
    for name, files in _bundles():
        root = out / name
        if (root / "configs").exists():
            shutil.rmtree(root / "configs")
        for rel, content in files().items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(render(content))
        names.append(name)
    return names


def check_bundles(out: Path = BUNDLES_DIR) -> list[str]:
    """Differences between the committed bundles and the generator's output (empty when in sync)."""
    problems = []
    expected_names = set()
    for name, files in _bundles():
        expected_names.add(name)
        for rel, content in files().items():
            path = out / name / rel
            want = render(content)
            if not path.is_file():
                problems.append(f"{name}/{rel}: missing")
            elif path.read_text() != want:
                diff = difflib.unified_diff(path.read_text().splitlines(), want.splitlines(), lineterm="", n=0)
                problems.append(f"{name}/{rel}: differs\n" + "\n".join(list(diff)[2:8]))
        for path in sorted((out / name / "configs").glob("*")):
            if f"configs/{path.name}" not in files():
                problems.append(f"{name}/configs/{path.name}: not written by the generator")
    return problems


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=BUNDLES_DIR, help="bundles folder (default: the repo's)")
    parser.add_argument("--check", action="store_true", help="fail if the bundles differ from the generator's output")


def run(args: argparse.Namespace) -> int:
    if args.check:
        problems = check_bundles(args.out)
        if problems:
            raise UserError(
                f"{len(problems)} bundle file(s) differ from the generator:\n"
                + "\n".join(problems[:20])
                + "\nrun `python -m tpp_monai bundles` to rewrite them"
            )
        print(f"{len(bundle_names())} bundles match the generator")
        return 0
    names = write_bundles(args.out)
    print(f"wrote {len(names)} bundles under {args.out}")
    return 0
