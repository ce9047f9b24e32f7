"""Build the network of a workflow: backbone + task head + PEFT method, weights loaded, trainable set marked.

This is the ``network_def`` of every bundle::

    {"_target_": "tpp_monai.network.build_network", "backbone": "@backbone", "task": "cls", "num_classes": 2,
     "method": "adapter", "method_options": {}, "backbone_ckpt": "@backbone_ckpt", "tpp_ckpt": "@tpp_ckpt"}
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from torch import nn

from tpp_monai.backbones import build_backbone, get_backbone_spec, load_backbone_checkpoint
from tpp_monai.errors import ConfigError
from tpp_monai.peft import apply_peft, load_target_state, mark_trainable, trainable_parameter_names

logger = logging.getLogger(__name__)
NONE_VALUES = ("none", "None", "")


def is_none(value: object) -> bool:
    """``None`` or the string ``none`` (how a user says "no file" on the command line)."""
    return value is None or (isinstance(value, str) and value in NONE_VALUES)


#: ``backbone_ckpt`` of a network whose every weight is then loaded from a fine-tuned model file (evaluate, inference,
#: MONAI Label continuing from the served model): built with random weights, and nothing to warn about.
FROM_MODEL_FILE = "from_model_file"


def build_network(
    backbone: str,
    task: str,
    method: str,
    num_classes: int = 0,
    out_channels: int = 1,
    method_options: Mapping | None = None,
    backbone_ckpt: str | Path | None = None,
    tpp_ckpt: str | Path | None = None,
    stage: str = "finetune",
    keep_mae_decoder: bool = False,
    backbone_options: Mapping | None = None,
) -> nn.Module:
    """Build and prepare a network.

    Args:
        backbone: registry name (``tpp_monai.backbones.BACKBONES``).
        task: ``"cls"``, ``"seg"`` or ``"features"`` (the pretext stages).
        method: PEFT method name (``tpp_monai.peft.METHODS``).
        num_classes: classifier outputs (``cls``).
        out_channels: segmentation output channels (``seg``).
        method_options: overrides of the method's defaults.
        backbone_ckpt: pre-trained backbone weights; ``"none"`` starts from random weights on purpose;
            :data:`FROM_MODEL_FILE` when a fine-tuned model file is loaded afterwards. ``None`` (not given) is an
            error that says where to get the weights.
        tpp_ckpt: target parameters from a ``pretrain_tpp`` run to start from; ``None``/``"none"`` = random init
            (the paper's PEFT baseline).
        stage: ``"finetune"`` trains targets + head, ``"tpp"`` trains targets only.
        keep_mae_decoder: keep the MAE decoder tensors of the backbone checkpoint on ``network.mae_checkpoint``.
        backbone_options: constructor overrides of the backbone (e.g. ``{"drop_path": 0.0}``).
    """
    spec = get_backbone_spec(backbone, "backbone")
    if backbone_ckpt is None:
        raise ConfigError(
            f"no backbone checkpoint given for {backbone!r}: {spec.weights}. "
            "To start from random weights on purpose, pass --backbone_ckpt none"
        )
    model = build_backbone(
        backbone, task=task, num_classes=num_classes, out_channels=out_channels, **dict(backbone_options or {})
    )
    model.mae_checkpoint = {}
    if str(backbone_ckpt) == FROM_MODEL_FILE:
        logger.debug("backbone %s built for weights from a model file", backbone)
    elif not is_none(backbone_ckpt):
        report = load_backbone_checkpoint(model, backbone_ckpt, keep_mae_decoder=keep_mae_decoder)
        model.mae_checkpoint = report.extras
        logger.info(report.summary())
    else:
        logger.warning("backbone %s starts from random weights (backbone_ckpt none)", backbone)
    apply_peft(model, method, method_options, where="method_options")
    if not is_none(tpp_ckpt):
        names = load_target_state(model, tpp_ckpt)
        logger.info("loaded %d target tensors from %s", len(names), tpp_ckpt)
    mark_trainable(model, trainable_parameter_names(model, stage))
    return model
