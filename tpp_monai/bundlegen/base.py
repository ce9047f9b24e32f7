"""The one interface of a bundle kind (2D ViT, 3D STU-Net) and the workflow skeletons both kinds fill in."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from tpp_monai.bundlegen import parts
from tpp_monai.bundlegen.files import large_files, license_text
from tpp_monai.bundlegen.parts import comp
from tpp_monai.data.info import DatasetInfo
from tpp_monai.data.recipes import BASELINES
from tpp_monai.network import FROM_MODEL_FILE
from tpp_monai.peft import get_method

# workflow -> the config files it runs with, in order (evaluate.json is an overlay on finetune.json)
WORKFLOW_FILES = {
    "pretrain_tpp": ("pretrain_tpp",),
    "finetune": ("finetune",),
    "evaluate": ("finetune", "evaluate"),
    "inference": ("inference",),
}


class BundleKind(ABC):
    """One bundle (dataset x PEFT method) of one kind: its configs, metadata and README.

    A kind implements the seven methods below; :meth:`files` assembles them. The skeletons (``_pretrain``,
    ``_finetune``, ``_evaluate``, ``_inference``) hold what every kind shares.
    """

    spatial_dims: ClassVar[int]
    backbone: ClassVar[str]

    def __init__(self, info: DatasetInfo, method: str) -> None:
        self.info, self.method = info, method
        self.recipe = info.recipe
        self.spec = get_method(method, "method")
        self.ft_lr = self.finetune_lr()

    def finetune_lr(self) -> float:
        """The fine-tuning learning rate of this dataset and method (the dataset's recipe)."""
        return self.recipe.finetune.lr_for(self.info.name, self.method)

    @property
    def name(self) -> str:
        return f"{self.info.name}_{self.method.replace('.', '_')}"  # peft.dora -> glas_peft_dora

    @property
    def baseline(self) -> bool:
        """No target parameters, so no TPP stage (full fine-tuning, linear probing)."""
        return self.method in BASELINES

    @abstractmethod
    def pretrain_tpp(self) -> dict: ...

    @abstractmethod
    def finetune(self) -> dict: ...

    @abstractmethod
    def evaluate(self) -> dict: ...

    @abstractmethod
    def inference(self) -> dict: ...

    @abstractmethod
    def demo(self) -> dict: ...

    @abstractmethod
    def metadata(self) -> dict: ...

    @abstractmethod
    def readme(self) -> str: ...

    def workflows(self) -> list[str]:
        return [w for w in WORKFLOW_FILES if not (w == "pretrain_tpp" and self.baseline)]

    def configs(self) -> dict[str, dict]:
        """Workflow -> its config file's content (``evaluate``: the overlay), with the input checks."""
        finetune = self.finetune()
        out = {} if self.baseline else {"pretrain_tpp": self.pretrain_tpp()}
        out.update({"finetune": finetune, "evaluate": self.evaluate(), "inference": self.inference()})
        return out

    def files(self) -> dict[str, object]:
        """Relative path -> content (dict for JSON, str for text) of the bundle."""
        files: dict[str, object] = {"configs/metadata.json": self.metadata()}
        files.update({f"configs/{name}.json": cfg for name, cfg in self.configs().items()})
        files.update({
            "configs/demo.json": self.demo(),
            "configs/multi_gpu.json": parts.MULTI_GPU,
            "configs/logging.conf": parts.LOGGING_CONF,
            "docs/README.md": self.readme(),
            "LICENSE": license_text(),
            "large_files.yml": large_files(self.backbone),
        })  # fmt: skip
        return files

    # -- shared skeletons ------------------------------------------------------------------------------------------

    def _common(self, workflow: str) -> dict:
        return parts.common(self.name, self.info.name, self.method, workflow, self.backbone, list(self.info.image_size))

    def _pretrain(self, settings: dict, network_def: dict, pretext_net: dict, transforms: dict,
                  cache_rate: object = 1.0) -> dict:  # fmt: skip
        """``pretrain_tpp.json``: the pretext trains only the target parameters; the folder ``tpp_target/`` holds them
        (safetensors; a peft adapter folder for ``peft.*`` methods), ``init_cost.json`` what the stage cost."""
        cfg = self._common("pretrain_tpp")
        cfg.update({"resume": False, "distributed": False, **settings, "activation_checkpointing": False,
                    "checkpoint_dir": "$@output_dir + '/checkpoints'"})  # fmt: skip
        cfg.update({
            # the stage's wall time and peak memory from the start of initialize to the end: init_cost.json
            "init_cost": comp("StageCost", output_dir="@output_dir", device="@device",
                              resume="@resume"),
            "network_def": network_def,
            "pretext_net": pretext_net,
            "network_module": "@pretext_net",
            "network": parts.network(),
            "loss": comp("to_device", module=comp("tpp_monai.pretext.pretext_loss", pretext="@pretext",
                                                  net="@pretext_net", dino="@dino"), device="@device"),
            "optimizer": {
                "_target_": "torch.optim.AdamW",
                "params": comp("tpp_monai.handlers.param_groups", model="@pretext_net", weight_decay="@weight_decay"),
                "lr": "@lr",
                # MAE (0.9, 0.95), DINO PyTorch's (0.9, 0.999)
                "betas": comp("tpp_monai.pretext.adamw_betas", pretext="@pretext"),
                # one fused kernel per step (CPU and CUDA) instead of a Python loop over the tensors: 55 -> 10 ms
                # per TPP-MAE step of ViT-B/16 with adapters on 2 CPU cores
                "fused": True,
            },
            "train": {
                **parts.data_section("train", comp("images_of", datalist="@datalist", dataset_dir="@dataset_dir",
                                                   key="training"), transforms, "@batch_size", True,
                                     cache_rate=cache_rate),
                "iters_per_epoch": "$len(@train#dataloader)",
                "inferer": {"_target_": "SimpleInferer"},
                "handlers": [
                    {"_target_": "tpp_monai.handlers.OptimizerScheduleHandler", "optimizer": "@optimizer",
                     "lr": comp("tpp_monai.pretext.lr_schedule", pretext="@pretext", base="@lr", epochs="@epochs",
                                iters_per_epoch="@train#iters_per_epoch", warmup_epochs="@warmup_epochs",
                                dino="@dino"),
                     "weight_decay": comp("wd_schedule", start="@weight_decay", end="@weight_decay_end",
                                          epochs="@epochs", iters_per_epoch="@train#iters_per_epoch")},
                    {"_target_": "tpp_monai.pretext.PretextHandlers", "net": "@pretext_net", "loss": "@loss",
                     "epochs": "@epochs", "iters_per_epoch": "@train#iters_per_epoch", "dino": "@dino",
                     "mim": "@mim"},
                    {"_target_": "tpp_monai.handlers.HistoryWriter", "path": "$@output_dir + '/history.csv'",
                     "optimizer": "@optimizer"},
                    parts.run_tracker("pretrain_tpp"),
                    comp("StageCostWriter", cost="@init_cost"),
                    {"_target_": "tpp_monai.handlers.TargetStateSaver",
                     "model": comp("tpp_monai.pretext.export_backbone", net="@pretext_net"),
                     "path": "$@output_dir + '/tpp_target'",
                     "info": {"pretext": "@pretext", "dataset": "@dataset_name"}},
                    *parts.training_tail({
                        "target_state": comp("tpp_monai.pretext.TargetStateView", model="@network_def"),
                        "pretext": comp("tpp_monai.pretext.resume_state", net="@pretext_net"),
                        "optimizer": "@optimizer",
                        "loss": "@loss",
                    }),
                ],
                "trainer": parts.trainer(comp("tpp_monai.pretext.PretextBatch", pretext="@pretext")),
            },
            "initialize": parts.training_initialize("pretrain_tpp", ["@init_cost"]),
            **parts.run_keys("pretrain_tpp", "train#trainer"),
        })  # fmt: skip
        return cfg

    def _finetune(self, settings: dict, network_def: dict, loss: dict, optimizer: dict, transforms: tuple[str, str],
                  validate: dict, cache_rate: object = 1.0) -> dict:  # fmt: skip
        """``finetune.json``: target parameters (from ``pretrain_tpp``, or random with ``--tpp_ckpt none``) and the
        new head trained with the backbone frozen; the best validation checkpoint is ``models/model.pt``."""
        cfg = self._common("finetune")
        cfg.update({
            "tpp_ckpt": "none" if self.baseline else "$@runs_dir + '/pretrain_tpp/tpp_target'",
            "ckpt_dir": "$@bundle_root + '/models'",
            "model_file": "$@ckpt_dir + '/model.pt'",
            "resume": False,
            "distributed": False,
            "batch_size": self.recipe.finetune.batch_size,
            "iterations": self.recipe.finetune.iterations,
            "epochs": comp("epochs_for", iterations="@iterations", iters_per_epoch="@train#iters_per_epoch"),
            "activation_checkpointing": False,
            "label_fraction": None,
            "val_batch_size": 1,
            **settings,
            "checkpoint_dir": "$@output_dir + '/checkpoints'",
            "network_def": network_def,
            "network_module": "@network_def",
            "network": parts.network(),
            # data-driven LoRA initialisations of peft (EVA, CorDA) on the training images; a no-op otherwise
            "peft_init": comp("peft_initialisation", model="@network_def",
                              dataloader="@train#dataloader", output_dir="@output_dir", device="@device"),
            "trainable_params": comp("trainable_parameters", model="@network_def"),
            "loss": loss,
            "optimizer": optimizer,
            "train": {
                **parts.data_section("train", parts.records("training"), transforms[0], "@batch_size", True,
                                     cache_rate=cache_rate),
                "iters_per_epoch": "$len(@train#dataloader)",
                "inferer": {"_target_": "SimpleInferer"},
                "handlers": [
                    {"_target_": "tpp_monai.handlers.OptimizerScheduleHandler", "optimizer": "@optimizer",
                     "lr": comp("poly_schedule", base="@lr", epochs="@epochs",
                                iters_per_epoch="@train#iters_per_epoch")},
                    {"_target_": "tpp_monai.handlers.GradientClipHandler", "params": "@trainable_params",
                     "max_norm": "@grad_clip"},
                    {"_target_": "tpp_monai.handlers.ValidationHandler", "validator": "@validate#evaluator",
                     "interval": "@val_interval", "epoch_level": True},
                    {"_target_": "tpp_monai.handlers.HistoryWriter", "path": "$@output_dir + '/history.csv'",
                     "optimizer": "@optimizer", "validator": "@validate#evaluator",
                     "metrics": ["@validate#key_metric", "@validate#additional_metrics"]},
                    parts.run_tracker("finetune", validator="@validate#evaluator"),
                    *parts.training_tail({
                        "trainable": comp("trainable_state", model="@network_def"),
                        "optimizer": "@optimizer",
                        "best_model": "@validate#best_model",
                    }),
                ],
                "trainer": parts.trainer({"_target_": "tpp_monai.engines.PlainBatch"}),
            },
            "validate": {
                **parts.data_section("validate", parts.records("validation"), transforms[1], "@val_batch_size",
                                     False, cache_rate=cache_rate),
                **validate,
                "best_model": {
                    "_target_": "tpp_monai.handlers.SafeCheckpointSaver",
                    "save_dir": "@ckpt_dir",
                    "save_dict": {"model": "@network_def"},
                    "save_key_metric": True,
                    "key_metric_filename": "model.pt",
                    "run_info": comp("run_info"),
                },
                # errors only: the history writer logs one line per validation
                "handlers": [{"_target_": "StatsHandler", "iteration_log": False, "epoch_log": False},
                             "@validate#best_model"],
                "evaluator": parts.validator(),
            },
            "initialize": parts.training_initialize("finetune", after_network=["@peft_init"]),
            **parts.run_keys("finetune", "train#trainer"),
        })  # fmt: skip
        return cfg

    def _evaluate(self, test: dict, writers: list) -> dict:
        """``evaluate.json``, an overlay on ``finetune.json`` (model-zoo's shape): the best fine-tuned model on the
        test split, with the validation preprocessing; metrics as JSON and CSV, per image."""
        return {
            "output_dir": "$@runs_dir + '/evaluate'",
            "run_name": comp("run_name", workflow="evaluate"),
            "backbone_ckpt": "none",
            "tpp_ckpt": "none",
            "network_def#backbone_ckpt": FROM_MODEL_FILE,  # the whole network comes from model.pt
            "test": {
                "datalist": parts.records("test"),
                "preprocessing": "@validate#preprocessing",
                "dataset": {"_target_": "Dataset", "data": "@test#datalist", "transform": "@test#preprocessing"},
                "dataloader": parts.loader("test", "@val_batch_size", False),
                **test,
            },
            "checkpoint_loader": parts.CHECKPOINT_LOADER,
            "handlers": [
                "@checkpoint_loader",
                {"_target_": "StatsHandler", "iteration_log": False},
                *writers,
                parts.EVALUATION_WRITER,
                parts.run_tracker("evaluate", loader="@checkpoint_loader"),
            ],
            "evaluator": parts.evaluator(
                "@test#dataloader",
                "@test#inferer",
                "@test#postprocessing",
                "@handlers",
                ("@test#key_metric", "@test#additional_metrics"),
            ),
            "initialize": [comp("prepare", workflow="evaluate")],
            **parts.run_keys("evaluate", "evaluator"),
        }

    def _inference(self, network_def: dict, transforms: dict, inferer: dict, post: dict, writers: list,
                   extra: dict | None = None) -> dict:  # fmt: skip
        """``inference.json`` (standalone, as model-zoo's, so ``ckpt_export`` and MONAI Label run on it alone): a
        folder of images in, one per batch, the fine-tuned ``models/model.pt`` (digest checked), writers out."""
        cfg = self._common("inference")
        cfg.update({
            **(extra or {}),
            "backbone_ckpt": "none",
            "ckpt_dir": "$@bundle_root + '/models'",
            "model_file": "$@ckpt_dir + '/model.pt'",
            "input_dir": "$@bundle_root + '/data/images'",
            "network_def": comp("ExportableNetwork", network={**network_def, "backbone_ckpt": FROM_MODEL_FILE},
                                in_channels=self.info.in_channels, image_size="@image_size"),
            "network": parts.network("@network_def"),
            # every input opened once before the run; --skip_bad_files true leaves the unreadable ones out
            "skip_bad_files": False,
            "datalist": comp("tpp_monai.checks.preflight_inference", files=comp("image_files", folder="@input_dir"),
                             dataset="@dataset_name", skip_bad_files="@skip_bad_files"),
            "preprocessing": {"_target_": "Compose", "transforms": transforms},
            "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
            "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                           "num_workers": "@num_workers"},
            "inferer": inferer,
            "postprocessing": post,
            "checkpoint_loader": parts.CHECKPOINT_LOADER,
            "handlers": ["@checkpoint_loader", {"_target_": "StatsHandler", "iteration_log": False}, *writers],
            "evaluator": parts.evaluator("@dataloader", "@inferer", "@postprocessing", "@handlers", None),
            "initialize": [comp("prepare", workflow="inference")],
            **parts.run_keys("inference", "evaluator"),
        })  # fmt: skip
        return cfg
