"""Where and how a workflow runs: the bundle folder, the device, GPU settings, activation checkpointing."""

from __future__ import annotations

import inspect
import time
from pathlib import Path

import torch

from tpp_monai.backbones import get_backbone_spec
from tpp_monai.errors import ConfigError


def bundle_root() -> str:
    """The folder of the bundle whose config is being read: the folder holding ``configs/`` with the config file.

    MONAI's ``ConfigWorkflow`` knows where the config file is (it puts the bundle folder on ``sys.path`` before
    ``run``) but does not tell the config; so this looks up the call stack for the workflow being initialised
    (``python -m monai.bundle run``) or the ``config_file`` argument of a ``monai.bundle`` command
    (``ckpt_export``, ``verify_net_in_out``). A copied, renamed or unpacked bundle is thereby its own, from any
    working directory. ``--bundle_root`` overrides it; MONAI Label and model-zoo's tools pass it.
    """
    from monai.bundle import ConfigWorkflow

    frame = inspect.currentframe()
    while frame is not None:
        local = frame.f_locals
        owner = local.get("self")
        root = owner.config_root_path if isinstance(owner, ConfigWorkflow) else None
        if root is None and str(frame.f_globals.get("__name__", "")).startswith("monai.bundle"):
            files = local.get("config_file_", local.get("config_file"))
            files = [files] if isinstance(files, (str, Path)) else list(files or [])
            root = Path(str(files[0])).parent if files else None
        if root is not None:
            root = Path(root).resolve()
            return str(root.parent if root.name == "configs" else root)
        frame = frame.f_back
    cwd = Path.cwd()
    if (cwd / "configs" / "metadata.json").is_file():  # model-zoo's convention: run from the bundle folder
        return str(cwd)
    raise ConfigError(
        "cannot tell which bundle this config belongs to (it was not read by `monai.bundle`); pass --bundle_root "
        "with the bundle folder (the one holding configs/)"
    )


def run_name(workflow: str) -> str:
    """MLflow run name of one run: the workflow and the start time (``finetune_20260101_120000``)."""
    return f"{workflow}_{time.strftime('%Y%m%d_%H%M%S')}"


def default_device() -> torch.device:
    """The first GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cuda_available() -> bool:
    """Whether a GPU is used (mixed precision, pinned memory)."""
    return torch.cuda.is_available()


def autocast_kwargs() -> dict:
    """Mixed precision in bf16 (no loss scaling needed) for the trainers and evaluators when ``amp`` is on."""
    return {"dtype": torch.bfloat16}


def to_device(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` moved to ``device`` (the config's ``network`` and pretext loss)."""
    return module.to(device)


def trainable_parameters(model: torch.nn.Module) -> list:
    """The parameters being trained (``requires_grad``): the optimizer's list and the gradient clipping's."""
    return [p for p in model.parameters() if p.requires_grad]


def gpu_settings() -> bool:
    """On a GPU: TF32 for the fp32 matmuls and convolutions that bf16 autocast leaves in fp32 (fp32 accumulation,
    safe for training) and ``cudnn.benchmark`` (images, patches and ROIs have fixed sizes, so autotuned kernels are
    reused every step). Nothing on the CPU. Returns whether a GPU is used."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return cuda


def activation_checkpointing(model: object, enabled: bool) -> int:
    """``--activation_checkpointing true``: recompute each transformer block (encoder, MAE decoder) in the backward
    pass instead of keeping its activations; ``python -m tpp_monai bench`` prints what it saves and costs."""
    from tpp_monai.backbones.vit import set_activation_checkpointing

    count = set_activation_checkpointing(model, enabled)
    if enabled and not count:
        raise ConfigError(
            f"activation checkpointing is available for the ViT backbones, not {type(model).__name__}; "
            "leave --activation_checkpointing False"
        )
    return count


def mae_decoder_geometry(backbone: str) -> dict:
    """Width, depth and heads of the MAE decoder paired with ``backbone`` (MedCoSS: 512, 8, 16)."""
    return dict(get_backbone_spec(backbone, "backbone").mae_decoder)
