"""The Python side of the bundle workflows: the named components the configs reference by ``_target_``.

One module per concern: :mod:`~tpp_monai.workflows.runtime` (bundle folder, device, GPU settings),
:mod:`~tpp_monai.workflows.prepare` (the one pre-run step, the settings record), :mod:`~tpp_monai.workflows.checks`
(the checks it runs), :mod:`~tpp_monai.workflows.data` (datalists, input folders,
loaders), :mod:`~tpp_monai.workflows.pretext_settings` (the pretext's TPP settings),
:mod:`~tpp_monai.workflows.distributed` (torchrun),
:mod:`~tpp_monai.workflows.savers` (settings record, provenance, masks, per-case tables),
:mod:`~tpp_monai.workflows.costs` (``init_cost.json``),
:mod:`~tpp_monai.workflows.excepthook` (one-line user errors) and :mod:`~tpp_monai.workflows.export` (model-zoo's
``ckpt_export``). Every name is re-exported here, with the
schedules of :mod:`tpp_monai.schedules`.
"""

from __future__ import annotations

from tpp_monai.handlers import RandomStates, param_groups
from tpp_monai.schedules import epochs_for, poly_schedule, wd_schedule
from tpp_monai.workflows.checks import check_3d, check_output, check_settings
from tpp_monai.workflows.costs import StageCost, StageCostWriter, peft_initialisation, write_init_cost
from tpp_monai.workflows.data import (
    IMAGE_SUFFIXES,
    cpu_workers,
    data_loader,
    demo_dataset,
    image_files,
    image_meta,
    images_of,
    progress_bars,
    records_of,
)
from tpp_monai.workflows.distributed import (
    assert_replicas_agree,
    ddp_device_ids,
    distributed_sampler,
    finish_distributed,
    has_unused_trainable,
    init_distributed,
    local_device,
    quiet_other_ranks,
)
from tpp_monai.workflows.excepthook import install_excepthook, user_error_in
from tpp_monai.workflows.export import ExportableNetwork
from tpp_monai.workflows.prepare import prepare, record_settings
from tpp_monai.workflows.pretext_settings import pretext_lr, pretext_setting
from tpp_monai.workflows.runtime import (
    activation_checkpointing,
    autocast_kwargs,
    bundle_root,
    cuda_available,
    default_device,
    gpu_settings,
    mae_decoder_geometry,
    run_name,
    to_device,
    trainable_parameters,
)
from tpp_monai.workflows.savers import (
    PerCaseWriter,
    mask_saver,
    nifti_saver,
    random_states,
    run_info,
    trainable_state,
    write_settings,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "ExportableNetwork",
    "PerCaseWriter",
    "RandomStates",
    "StageCost",
    "StageCostWriter",
    "activation_checkpointing",
    "assert_replicas_agree",
    "autocast_kwargs",
    "bundle_root",
    "check_3d",
    "check_output",
    "check_settings",
    "cpu_workers",
    "cuda_available",
    "data_loader",
    "ddp_device_ids",
    "default_device",
    "demo_dataset",
    "distributed_sampler",
    "epochs_for",
    "finish_distributed",
    "gpu_settings",
    "has_unused_trainable",
    "image_files",
    "image_meta",
    "images_of",
    "init_distributed",
    "install_excepthook",
    "local_device",
    "mae_decoder_geometry",
    "mask_saver",
    "nifti_saver",
    "param_groups",
    "peft_initialisation",
    "poly_schedule",
    "prepare",
    "pretext_lr",
    "pretext_setting",
    "progress_bars",
    "quiet_other_ranks",
    "random_states",
    "record_settings",
    "records_of",
    "run_info",
    "run_name",
    "to_device",
    "trainable_parameters",
    "trainable_state",
    "user_error_in",
    "wd_schedule",
    "write_init_cost",
    "write_settings",
]
