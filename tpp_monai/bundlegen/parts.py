"""Config pieces every bundle shares: named components (``_target_``) for everything that holds logic, ``$`` only
for paths joined to a folder and for running an engine."""

from __future__ import annotations

W = "tpp_monai.workflows."  # the components the configs call


def comp(target: str, **kwargs: object) -> dict:
    """A config component: ``target`` (a ``tpp_monai.workflows`` name when it has no dot) called with ``kwargs``."""
    return {"_target_": target if "." in target else W + target, **kwargs}


def common(name: str, dataset: str, method: str, workflow: str, backbone: str, image_size: list) -> dict:
    """Keys every workflow config starts with (the common override keys)."""
    return {
        "bundle_root": comp("bundle_root"),
        "dataset_name": dataset,
        "method": method,
        "method_options": {},
        "dataset_dir": "$@bundle_root + '/data'",
        "datalist": "$@dataset_dir + '/datalist.json'",
        "runs_dir": "$@bundle_root + '/runs'",
        "output_dir": f"$@runs_dir + '/{workflow}'",
        "tracking_uri": "$monai.utils.path_to_sqlite_uri(@runs_dir + '/mlruns.db')",
        "experiment_name": name,
        "run_name": comp("run_name", workflow=workflow),
        "backbone": backbone,
        "backbone_ckpt": None,
        "device": comp("default_device"),
        "amp": comp("cuda_available"),
        "amp_kwargs": comp("autocast_kwargs"),
        "num_workers": comp("cpu_workers"),
        "seed": 0,
        "image_size": list(image_size),
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


def records(split: str) -> dict:
    """The records of one datalist split with absolute paths (training: the label fraction applied)."""
    extra = {"label_fraction": "@label_fraction", "seed": "@seed"} if split == "training" else {}
    return comp("records_of", datalist="@datalist", dataset_dir="@dataset_dir", key=split, **extra,
                dataset="@dataset_name")  # fmt: skip


def loader(section: str, batch_size: str, shuffle: bool) -> dict:
    return comp("data_loader", dataset=f"@{section}#dataset", batch_size=batch_size, shuffle=shuffle,
                num_workers="@num_workers")  # fmt: skip


def data_section(section: str, datalist: dict, transforms: dict, batch_size: str, shuffle: bool,
                 cache: bool = True, cache_rate: object = 1.0) -> dict:  # fmt: skip
    """datalist -> (cached) dataset -> loader (sharded under torchrun) of one split."""
    dataset = {"_target_": "CacheDataset" if cache else "Dataset", "data": f"@{section}#datalist",
               "transform": f"@{section}#preprocessing"}  # fmt: skip
    if cache:
        dataset.update({"cache_rate": cache_rate, "num_workers": "@num_workers", "progress": comp("progress_bars")})
    return {"datalist": datalist, "preprocessing": transforms, "dataset": dataset,
            "dataloader": loader(section, batch_size, shuffle)}  # fmt: skip


def network(module: str = "@network_module") -> dict:
    return comp("to_device", module=module, device="@device")


def trainer(prepare_batch: dict) -> dict:
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
        "amp_kwargs": "@amp_kwargs",
        "optim_set_to_none": True,
    }


def training_tail(resume_state: dict) -> list[dict]:
    """The handlers every training workflow ends ``train#handlers`` with: the resumable checkpoint (``resume_state``
    plus the random state and the engine), the NaN/inf guard, a progress bar and the epoch log."""
    return [
        {
            "_target_": "tpp_monai.handlers.SafeCheckpointSaver",
            "save_dir": "@checkpoint_dir",
            "save_dict": {**resume_state, "rng": comp("random_states", preprocessing="@train#preprocessing")},
            "engine_key": "trainer",
            "resume": "@resume",
            "save_interval": 1,
            "n_saved": 1,
        },
        {
            "_target_": "tpp_monai.handlers.NonFiniteLossGuard",
            "checkpoint_dir": "@checkpoint_dir",
            "lr": "@lr",
            "amp": "@amp",
        },
        {"_target_": "tpp_monai.handlers.ProgressBar"},
        {
            "_target_": "StatsHandler",
            "iteration_log": False,
            "tag_name": "train_loss",
            "output_transform": comp("monai.handlers.from_engine", keys=["loss"], first=True),
        },
    ]


def evaluator(loader_ref: str, inferer: str, post: str, handlers: str, metrics: tuple[str, str] | None) -> dict:
    """A ``SupervisedEvaluator`` (bf16 autocast when ``amp``), with key and additional metrics when given."""
    out = {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": loader_ref, "network": "@network",
           "inferer": inferer, "postprocessing": post, "val_handlers": handlers, "amp": "@amp",
           "amp_kwargs": "@amp_kwargs"}  # fmt: skip
    if metrics:
        out.update({"key_val_metric": metrics[0], "additional_metrics": metrics[1]})
    return out


def validator() -> dict:
    return evaluator("@validate#dataloader", "@validate#inferer", "@validate#postprocessing", "@validate#handlers",
                     ("@validate#key_metric", "@validate#additional_metrics"))  # fmt: skip


CHECKPOINT_LOADER = {"_target_": "tpp_monai.handlers.VerifiedCheckpointLoader", "load_path": "@model_file",
                     "load_dict": {"model": "@network_def"}}  # fmt: skip
EVALUATION_WRITER = {"_target_": "tpp_monai.handlers.EvaluationWriter", "output_dir": "@output_dir",
                     "loader": "@checkpoint_loader",
                     "info": {"evaluated_split": "test", "ckpt": "@model_file", "datalist": "@datalist",
                              "dataset_dir": "@dataset_dir"}}  # fmt: skip
IMAGE_META = comp("image_meta", _mode_="callable")
INVERT_PRED = {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
               "nearest_interp": False, "to_tensor": True}  # fmt: skip


def training_initialize(workflow: str, after_checks: list | None = None, after_network: list | None = None) -> list:
    """``initialize`` of the training workflows: the one pre-run step (:func:`tpp_monai.workflows.prepare`: every
    check, the process group, GPU settings, the seed), ``after_checks`` (the TPP stage's cost meter), the network
    (so option and checkpoint errors surface before any data is cached), ``after_network`` (finetune: peft's
    data-driven initialisation, before the optimizer takes the parameters), activation checkpointing and the record
    of every setting as resolved (``settings.json``)."""
    return [
        comp("prepare", workflow=workflow),
        *(after_checks or []),
        "@network_def",
        *(after_network or []),
        comp("activation_checkpointing", model="@network_module", enabled="@activation_checkpointing"),
        comp("record_settings", output_dir="@output_dir"),
    ]


def run_keys(workflow: str, engine: str) -> dict:
    """``run`` (MONAI's default run id, so the config runs without one) and the workflow's own id, a copy of it."""
    return {"run": [f"$@{engine}.run()"], workflow: "%run"}


MULTI_GPU = {
    "device": comp("local_device"),
    "network": {
        "_target_": "torch.nn.parallel.DistributedDataParallel",
        "module": network(),
        "device_ids": comp("ddp_device_ids", device="@device"),
        # trainable tensors the forward pass never uses (MedCoSS's 3D embedding under BitFit or full fine-tuning)
        # must not block the reduction; searching for them when there are none costs a pass and a warning
        "find_unused_parameters": comp("has_unused_trainable", model="@network_module"),
    },
    "distributed": True,
    "finalize": [comp("assert_replicas_agree", model="@network_module"), comp("finish_distributed")],
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
