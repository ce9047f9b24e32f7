"""The one pre-run step of every bundle workflow, and the settings record, reading the config's own top-level
settings (:class:`~tpp_monai.workflows.running_config.RunningConfig`) instead of a block of ``@`` references
restating them. Before the checks have passed, a setting is read only when it builds nothing that depends on the
data (:meth:`RunningConfig.plain`), so nothing is cached or built first.
"""

from __future__ import annotations

from monai.utils import set_determinism

from tpp_monai.checks import INPUT_FILES, REGISTRY_NAMES, SETTINGS, preflight_data, validate_settings
from tpp_monai.data import get_dataset
from tpp_monai.errors import ConfigError
from tpp_monai.run_folder import check_resume_settings
from tpp_monai.workflows.checks import check_3d, check_output, check_settings
from tpp_monai.workflows.distributed import init_distributed
from tpp_monai.workflows.excepthook import install_excepthook
from tpp_monai.workflows.running_config import RunningConfig
from tpp_monai.workflows.runtime import gpu_settings
from tpp_monai.workflows.savers import write_settings

#: The datalist splits each workflow reads, and whether it reads their labels (inference reads a folder of images).
SPLITS = {"pretrain_tpp": (("training",), False), "finetune": (("training", "validation"), True),
          "evaluate": (("test",), True)}  # fmt: skip
TRAINING = ("pretrain_tpp", "finetune")  # the workflows that own a run folder, which a rerun may resume


def prepare(workflow: str) -> None:
    """Every check before ``workflow`` builds anything, each setting read once from the config's top level.

    In order: errors as one line (:func:`install_excepthook`); every setting, input file and registry name at once
    (:func:`tpp_monai.checks.validate_settings`); the process group (``distributed``) and GPU settings; the 3D
    settings of volume datasets; the names, method options and inputs (:func:`check_settings`); every file of the
    splits the workflow reads (:func:`tpp_monai.checks.preflight_data`); for training, the run folder (locked, not
    overwritten, resumed only with its recorded settings); the seed.
    """
    install_excepthook()
    config = RunningConfig.find()
    settings, problems = config.settings(set(SETTINGS) | set(REGISTRY_NAMES) | set(INPUT_FILES))
    validate_settings(
        {k: v for k, v in settings.items() if k in SETTINGS},
        files={k: v for k, v in settings.items() if k in INPUT_FILES},
        names={k: v for k, v in settings.items() if k in REGISTRY_NAMES},
        unresolved=problems,
    )
    training = workflow in TRAINING
    if training:
        init_distributed(bool(config.get("distributed", False)))
    gpu_settings()
    dataset, backbone = config.get("dataset_name"), config.get("backbone")
    info = get_dataset(dataset, "dataset_name")
    pretext = config.get("pretext") if workflow == "pretrain_tpp" else None
    if info.spatial_dims == 3:
        pretext_inputs = {"pretext": pretext, "dino": config.get("dino"), "mim": config.get("mim")} if pretext else {}
        check_3d(dataset, backbone, config.get("image_size"), config.get("backbone_options"), **pretext_inputs)
    if workflow in SPLITS:
        keys, labels = SPLITS[workflow]
        check_settings(
            dataset, config.get("method"), backbone, pretext=pretext, datalist=config.get("datalist"),
            dataset_dir=config.get("dataset_dir"), keys=keys,
            tpp_ckpt=config.get("tpp_ckpt") if workflow == "finetune" else None,
            image_size=config.get("image_size") if info.spatial_dims == 2 and workflow in TRAINING else None,
            num_classes=config.get("num_classes") if workflow == "finetune" else None,
            method_options=config.get("method_options"),
        )  # fmt: skip
        preflight_data(config.get("datalist"), config.get("dataset_dir"), dataset, keys=keys, labels=labels)
    if training:
        output_dir, resume = config.get("output_dir"), config.get("resume")
        check_output(output_dir, resume, config.get("ckpt_dir") if workflow == "finetune" else None)
        check_resume_settings(output_dir, config.settings()[0], resume)
    set_determinism(seed=config.get("seed"))


def record_settings(output_dir: str) -> None:
    """Write every top-level setting of the config being run (seed, lr, epochs, paths...), resolved, to
    ``<output_dir>/settings.json`` (:func:`tpp_monai.workflows.savers.write_settings`)."""
    settings, problems = RunningConfig.find().settings(only_plain=False)
    if problems:
        raise ConfigError("; ".join(problems))
    write_settings(output_dir, settings)
