"""The TPP stage's pretext tasks (paper §3.2): MAE (default) and DINO, selected by name in every bundle.

The factories below are what ``configs/pretrain_tpp.json`` calls, so ``--pretext dino`` switches network, loss,
views and batch preparation together. 3D datasets (LiTS, KiTS19 on STU-Net, paper §5.4) take DINO only: the paper
pairs STU-Net with DINO, and an MAE of a convolutional U-Net (masked 3D patches, a pixel decoder) is a different
method that nothing here specifies, so asking for it is a :class:`~tpp_monai.errors.ConfigError`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from tpp_monai.contract import DROPS_TOKENS, GLOBAL_FEATURE, hooks_of
from tpp_monai.engines import plain_tensor
from tpp_monai.errors import ConfigError, unknown_choice
from tpp_monai.peft import load_target_state, target_state
from tpp_monai.pretext.dino import DINOLoss, DINOPretext, dino_cosine_schedule, teacher_temp_schedule
from tpp_monai.pretext.mae import MAEPretext, MaskedPatchLoss

PRETEXTS = ("mae", "dino")
# DINO's defaults (main_dino.py): head geometry, multi-crop, teacher momentum and temperatures, per-tensor gradient
# clipping, the learning rate's end value.
DINO_DEFAULTS = {
    "out_dim": 65536, "hidden_dim": 2048, "bottleneck_dim": 256, "global_size": 224, "local_size": 96, "num_local": 8,
    "momentum_teacher": 0.996, "teacher_temp": 0.04, "warmup_teacher_temp": 0.04, "warmup_teacher_temp_epochs": 0,
    "student_temp": 0.1, "clip_grad": 3.0, "freeze_last_layer": 1, "min_lr": 1e-6,
    # DeSD-style student heads on the further feature levels (STU-Net's decoder levels; ViTs have none)
    "level_heads": True,
}  # fmt: skip
# The input each pretext needs from a backbone (tpp_monai.contract): MAE drops tokens, DINO reads a global feature.
PRETEXT_INPUTS = {"mae": DROPS_TOKENS, "dino": GLOBAL_FEATURE}


def check_pretext(pretext: str, backbone: str | None = None) -> str:
    """``pretext`` if it is known (and, with ``backbone`` given, one that backbone can feed)."""
    if pretext not in PRETEXTS:
        raise unknown_choice("pretext", pretext, PRETEXTS, "--pretext")
    if backbone is not None:
        from tpp_monai.backbones import family_class

        _check_inputs(pretext, family_class(backbone, "backbone"), backbone)
    return pretext


def supported_pretexts(backbone: nn.Module | type) -> list[str]:
    """The pretexts a backbone (instance or family class) can feed, in the order of :data:`PRETEXTS`."""
    return [p for p in PRETEXTS if PRETEXT_INPUTS[p] in hooks_of(backbone)]


def _check_inputs(pretext: str, backbone: nn.Module | type, name: str) -> None:
    allowed = supported_pretexts(backbone)
    if pretext not in allowed:
        family = getattr(backbone, "family", "")
        raise ConfigError(
            f"pretext {pretext!r} needs {PRETEXT_INPUTS[pretext]!r} from the backbone, which the {family} backbone "
            f"{name!r} does not give; use --pretext {' or '.join(allowed) or '(none applies)'}"
        )


def _dino(options: Mapping | None) -> dict:
    options = dict(options or {})
    unknown = set(options) - set(DINO_DEFAULTS)
    if unknown:
        raise unknown_choice("DINO option", sorted(unknown)[0], DINO_DEFAULTS, "dino")
    return {**DINO_DEFAULTS, **options}


# AdamW betas of each pretext's official recipe: MAE's (MedCoSS pre-training) and PyTorch's defaults (main_dino.py
# builds ``torch.optim.AdamW(params_groups)`` without betas).
ADAMW_BETAS = {"mae": (0.9, 0.95), "dino": (0.9, 0.999)}


def adamw_betas(pretext: str) -> list[float]:
    """The AdamW betas of ``pretext``'s official recipe (MAE (0.9, 0.95); DINO PyTorch's (0.9, 0.999))."""
    return list(ADAMW_BETAS[check_pretext(pretext)])


def lr_schedule(
    pretext: str, base: float, epochs: int, iters_per_epoch: int, warmup_epochs: float, dino: Mapping | None = None
) -> np.ndarray:
    """Per-iteration learning rates by the pretext's official rule.

    MAE (MedCoSS ``util/lr_sched.py``): ``lr = base * t / warmup`` for the fractional epoch ``t`` in the warm-up (so
    its last warm-up step is one step short of ``base``), then half-cosine to 0. DINO (``utils.cosine_scheduler``):
    a linear warm-up that reaches ``base`` on its last step, then half-cosine to ``min_lr`` (1e-6).
    """
    from tpp_monai.handlers import cosine_schedule

    if check_pretext(pretext) == "mae":
        return cosine_schedule(base, 0.0, int(epochs), int(iters_per_epoch), warmup_epochs)
    return dino_cosine_schedule(base, _dino(dino)["min_lr"], int(epochs), int(iters_per_epoch), int(warmup_epochs))


def build_pretext(
    pretext: str, encoder: nn.Module, image_size: int = 224, mae_decoder: str = "freeze", mask_ratio: float = 0.75,
    decoder: Mapping | None = None, dino: Mapping | None = None,
) -> nn.Module:  # fmt: skip
    """The pretext network around ``encoder`` (built with ``task="features"``, ``stage="tpp"``)."""
    _check_inputs(check_pretext(pretext), encoder, getattr(encoder, "backbone_name", ""))
    if pretext == "mae":
        return MAEPretext(encoder, mae_decoder, image_size, mask_ratio, decoder)
    d = _dino(dino)
    if hasattr(encoder, "check_input_size"):  # 3D CNN: every crop must pass the network's size rules
        for key in ("global_size", "local_size") if d["num_local"] else ("global_size",):
            try:
                encoder.check_input_size(_size3(d[key], key))
            except ConfigError as err:
                raise ConfigError(f"DINO {key} {d[key]!r}: {err}") from None
    return DINOPretext(encoder, d["out_dim"], d["hidden_dim"], d["bottleneck_dim"], level_heads=d["level_heads"])


def _size3(size: int | Sequence[int], what: str) -> tuple[int, int, int]:
    """A 3D crop size from an int (cube) or three ints."""
    out = (int(size),) * 3 if isinstance(size, (int, float)) else tuple(int(s) for s in size)
    if len(out) != 3 or min(out) < 1:
        raise ConfigError(f"DINO {what} for a 3D dataset must be an int or 3 positive ints, got {size!r}")
    return out  # type: ignore[return-value]


def pretext_loss(pretext: str, net: nn.Module, dino: Mapping | None = None) -> nn.Module:
    if check_pretext(pretext) == "mae":
        return MaskedPatchLoss(net.patch)
    d = _dino(dino)
    return DINOLoss(d["out_dim"], student_temp=d["student_temp"], teacher_temp=d["teacher_temp"])


def pretext_transforms(
    pretext: str, dataset: str, pretext_size: int = 224, image_size: Sequence[int] | None = None,
    dino: Mapping | None = None,
) -> object:  # fmt: skip
    """Cacheable image loading (at the dataset's ``image_size``) + the pretext's random views at ``pretext_size``
    (MAE crop/flip, DINO multi-crop; DINO's own ``global_size`` then sets the global crops). 3D datasets get the
    3D multi-crop (:func:`~tpp_monai.pretext.transforms.dino_transforms_3d`; ``pretext_size`` is unused)."""
    from tpp_monai.data import get_dataset
    from tpp_monai.pretext.transforms import dino_transforms, dino_transforms_3d, mae_transforms

    check_pretext(pretext)
    if get_dataset(dataset, "dataset").spatial_dims == 3:
        if pretext != "dino":
            raise ConfigError(f"pretext {pretext!r} has no 3D views for {dataset!r}; 3D datasets use --pretext dino")
        d = _dino(dino)
        return dino_transforms_3d(
            dataset, _size3(d["global_size"], "global_size"), _size3(d["local_size"], "local_size"), d["num_local"]
        )
    if pretext == "mae":
        return mae_transforms(dataset, pretext_size, image_size)
    d = _dino(dino)
    return dino_transforms(dataset, d["global_size"], d["local_size"], d["num_local"], image_size=image_size)


class PretextBatch:
    """``prepare_batch`` for MONAI's trainer: MAE -> ``(image, image)``; DINO -> ``(crops, None)``."""

    def __init__(self, pretext: str) -> None:
        self.pretext = check_pretext(pretext)

    def __call__(self, batch: Mapping, device: torch.device | None = None, non_blocking: bool = False, **_: object):
        if self.pretext == "mae":
            image = plain_tensor(batch["image"], device, non_blocking)
            return image, image
        return [plain_tensor(c, device, non_blocking) for c in batch["crops"]], None


class PretextHandlers:
    """Attach the handlers a pretext needs besides the schedules: for DINO the teacher's momentum update, the
    teacher-temperature warm-up, gradient clipping and the first-epoch freeze of the head's last layer; none for MAE.

    One config entry serves both pretexts, so ``--pretext dino`` needs no other change to ``train#handlers``.
    """

    def __init__(self, net: nn.Module, loss: nn.Module, epochs: int, iters_per_epoch: int,
                 dino: Mapping | None = None) -> None:  # fmt: skip
        self.net, self.loss, self.epochs, self.iters = net, loss, int(epochs), int(iters_per_epoch)
        self.dino = _dino(dino)

    def attach(self, engine: object) -> None:
        if not isinstance(self.net, DINOPretext):
            return
        from tpp_monai.handlers import (
            FreezeLastLayerHandler,
            GradientClipHandler,
            TeacherEMAHandler,
            ValueScheduleHandler,
            cosine_schedule,
        )

        d = self.dino
        momentum = cosine_schedule(d["momentum_teacher"], 1.0, self.epochs, self.iters)
        temps = teacher_temp_schedule(d["warmup_teacher_temp"], d["teacher_temp"], int(d["warmup_teacher_temp_epochs"]),
                                      self.epochs, self.iters)  # fmt: skip
        trainable = [p for p in self.net.student.parameters() if p.requires_grad]
        handlers = [TeacherEMAHandler(self.net, momentum), ValueScheduleHandler(self.loss, "teacher_temp", temps)]
        if d["clip_grad"]:  # DINO clips each tensor's gradient norm (utils.clip_gradients), not their global norm
            handlers.append(GradientClipHandler(trainable, d["clip_grad"], per_tensor=True))
        if d["freeze_last_layer"]:
            last_layers = nn.ModuleList(head.last_layer for head in self.net.heads())  # every student head's
            handlers.append(FreezeLastLayerHandler(last_layers, d["freeze_last_layer"]))
        for handler in handlers:
            handler.attach(engine)


def export_backbone(net: nn.Module) -> nn.Module:
    """The backbone whose target parameters the stage saves (DINO: the teacher's averages)."""
    return net.export_backbone() if isinstance(net, DINOPretext) else net.encoder


class PartialState:
    """A checkpointable view of selected tensors of a module (``state_dict``/``load_state_dict`` over ``names``)."""

    def __init__(self, module: nn.Module, names: Sequence[str]) -> None:
        self.module, self.names = module, list(names)

    def state_dict(self) -> dict[str, Tensor]:
        tensors = dict(self.module.named_parameters())
        tensors.update(dict(self.module.named_buffers()))
        return {n: tensors[n].detach().clone() for n in self.names}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        tensors = dict(self.module.named_parameters())
        tensors.update(dict(self.module.named_buffers()))
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"checkpoint lacks {missing[:5]}")
        with torch.no_grad():
            for n in self.names:
                tensors[n].copy_(state[n])


class TargetStateView:
    """A checkpointable view of a model's target parameters, in the target-parameter file format."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict:
        return target_state(self.model)

    def load_state_dict(self, state: Mapping) -> None:
        load_target_state(self.model, state)


def resume_state(net: nn.Module) -> PartialState:
    """What a resume needs from the pretext network besides the target parameters and optimizer."""
    return PartialState(net, net.pretext_state_names())


__all__ = [
    "PRETEXTS",
    "PartialState",
    "PretextBatch",
    "PretextHandlers",
    "TargetStateView",
    "adamw_betas",
    "build_pretext",
    "export_backbone",
    "lr_schedule",
    "pretext_loss",
    "pretext_transforms",
    "resume_state",
]
