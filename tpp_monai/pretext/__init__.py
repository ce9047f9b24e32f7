"""The TPP stage's pretext tasks (paper §3.2), selected by name in every bundle: MAE, masked-image modelling (MIM,
SimMIM-style) and DINO, each fed by one input a backbone declares (:mod:`tpp_monai.contract`).

The factories below are what ``configs/pretrain_tpp.json`` calls, so ``--pretext dino`` switches network, loss,
views and batch preparation together. Which pretexts a backbone can feed is read from its ``HOOKS``
(:data:`PRETEXT_INPUTS`); its default is :func:`default_pretext`, the one place the bundle generator and the checks
read it from:

* MAE where the backbone drops tokens (ViTs): the paper's default, which it found better than DINO for most PEFT
  methods (§3.2, Table 8), and the cheapest (the encoder sees a quarter of the patches);
* DINO on STU-Net: the paper's pairing for the CNN (§5.4, Table 10);
* MIM where tokens cannot be dropped but a dense feature map exists (Swin, other CNNs): masked modelling as the
  paper's default is, in the form that needs no token dropping;
* DINO where only a global feature exists.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from tpp_monai.contract import DENSE_FEATURE, DROPS_TOKENS, GLOBAL_FEATURE, hooks_of
from tpp_monai.engines import plain_tensor
from tpp_monai.errors import ConfigError, unknown_choice
from tpp_monai.peft import load_target_state, target_state
from tpp_monai.pretext.dino import DINOLoss, DINOPretext
from tpp_monai.pretext.mae import MAEPretext, MaskedPatchLoss, as_size
from tpp_monai.pretext.mim import MIM_DEFAULTS, MaskedPixelLoss, MIMPretext, mask_geometry, mim_options
from tpp_monai.schedules import cosine_schedule, dino_cosine_schedule, teacher_temp_schedule

PRETEXTS = ("mae", "mim", "dino")
# DINO's defaults (main_dino.py): head geometry, multi-crop, teacher momentum and temperatures, per-tensor gradient
# clipping, the learning rate's end value.
DINO_DEFAULTS = {
    "out_dim": 65536, "hidden_dim": 2048, "bottleneck_dim": 256, "global_size": 224, "local_size": 96, "num_local": 8,
    "momentum_teacher": 0.996, "teacher_temp": 0.04, "warmup_teacher_temp": 0.04, "warmup_teacher_temp_epochs": 0,
    "student_temp": 0.1, "clip_grad": 3.0, "freeze_last_layer": 1, "min_lr": 1e-6,
    # DeSD-style student heads on the further feature levels (STU-Net's decoder levels; ViTs have none)
    "level_heads": True,
}  # fmt: skip
# The input each pretext needs from a backbone (tpp_monai.contract): MAE drops tokens, MIM reads a dense feature map,
# DINO a global feature.
PRETEXT_INPUTS = {"mae": DROPS_TOKENS, "mim": DENSE_FEATURE, "dino": GLOBAL_FEATURE}
#: The default pretext of a backbone: its family's entry here (the paper's pairing), else the first of
#: :data:`DEFAULT_ORDER` it can feed (module docstring: why).
FAMILY_DEFAULTS = {"stunet": "dino"}
DEFAULT_ORDER = ("mae", "mim", "dino")


def _backbone_class(backbone: str | nn.Module | type) -> nn.Module | type:
    if isinstance(backbone, str):
        from tpp_monai.backbones import family_class

        return family_class(backbone, "backbone")
    return backbone


def default_pretext(backbone: str | nn.Module | type) -> str:
    """The pretext a backbone (registry name, instance or family class) pre-trains its target parameters with by
    default (module docstring): ``mae`` for ViTs, ``dino`` for STU-Net, ``mim`` for Swin and other CNNs."""
    cls = _backbone_class(backbone)
    allowed = supported_pretexts(cls)
    family = getattr(cls, "family", "")
    if FAMILY_DEFAULTS.get(family) in allowed:
        return FAMILY_DEFAULTS[family]
    for pretext in DEFAULT_ORDER:
        if pretext in allowed:
            return pretext
    name = backbone if isinstance(backbone, str) else getattr(backbone, "backbone_name", "") or family
    raise ConfigError(
        f"the {family} backbone {name!r} gives no pretext input ({', '.join(sorted(PRETEXT_INPUTS.values()))}), so "
        "no pretext can pre-train its target parameters; fine-tune it from random target parameters (--tpp_ckpt none)"
    )


def check_pretext(pretext: str, backbone: str | None = None) -> str:
    """``pretext`` if it is known (and, with ``backbone`` given, one that backbone can feed)."""
    if pretext not in PRETEXTS:
        raise unknown_choice("pretext", pretext, PRETEXTS, "--pretext")
    if backbone is not None:
        _check_inputs(pretext, _backbone_class(backbone), backbone)
    return pretext


def supported_pretexts(backbone: nn.Module | type) -> list[str]:
    """The pretexts a backbone (instance or family class) can feed, in the order of :data:`PRETEXTS`."""
    return [p for p in PRETEXTS if PRETEXT_INPUTS[p] in hooks_of(backbone)]


def _check_inputs(pretext: str, backbone: nn.Module | type, name: str) -> None:
    allowed = supported_pretexts(backbone)
    if pretext not in allowed:
        family = getattr(backbone, "family", "")
        choices = sorted(allowed, key=lambda p: p != default_pretext(backbone)) if allowed else []
        hint = f"{choices[0]} (its default)" + "".join(f" or {p}" for p in choices[1:]) if choices else "(none applies)"
        raise ConfigError(
            f"pretext {pretext!r} needs {PRETEXT_INPUTS[pretext]!r} from the backbone, which the {family} backbone "
            f"{name!r} does not give; use --pretext {hint}"
        )


def _dino(options: Mapping | None) -> dict:
    options = dict(options or {})
    unknown = set(options) - set(DINO_DEFAULTS)
    if unknown:
        raise unknown_choice("DINO option", sorted(unknown)[0], DINO_DEFAULTS, "dino")
    return {**DINO_DEFAULTS, **options}


# AdamW betas of each pretext's official recipe: MAE's (MedCoSS pre-training), SimMIM's (config.py
# TRAIN.OPTIMIZER.BETAS) and PyTorch's defaults (main_dino.py builds ``torch.optim.AdamW(params_groups)``).
ADAMW_BETAS = {"mae": (0.9, 0.95), "mim": (0.9, 0.999), "dino": (0.9, 0.999)}


def adamw_betas(pretext: str) -> list[float]:
    """The AdamW betas of ``pretext``'s official recipe (MAE (0.9, 0.95); SimMIM's and DINO's (0.9, 0.999))."""
    return list(ADAMW_BETAS[check_pretext(pretext)])


def lr_schedule(
    pretext: str, base: float, epochs: int, iters_per_epoch: int, warmup_epochs: float, dino: Mapping | None = None
) -> np.ndarray:
    """Per-iteration learning rates by the pretext's rule.

    MAE (MedCoSS ``util/lr_sched.py``), and MIM with it (the paper's TPP schedule, which it tuned for target
    parameters): ``lr = base * t / warmup`` for the fractional epoch ``t`` in the warm-up (so its last warm-up step
    is one step short of ``base``), then half-cosine to 0. DINO (``utils.cosine_scheduler``): a linear warm-up that
    reaches ``base`` on its last step, then half-cosine to ``min_lr`` (1e-6).
    """
    if check_pretext(pretext) in ("mae", "mim"):
        return cosine_schedule(base, 0.0, int(epochs), int(iters_per_epoch), warmup_epochs)
    return dino_cosine_schedule(base, _dino(dino)["min_lr"], int(epochs), int(iters_per_epoch), int(warmup_epochs))


def pretext_input_sizes(
    pretext: str, spatial_dims: int, pretext_size: int | Sequence[int] | None = 224, dino: Mapping | None = None,
    size_setting: str = "pretext_size",
) -> dict[str, tuple[int, ...]]:  # fmt: skip
    """The input sizes the pretext feeds the backbone, by the setting that gives them: DINO's crops, else the
    pretext size (named ``size_setting``)."""
    if check_pretext(pretext) == "dino":
        d = _dino(dino)
        keys = ("global_size", "local_size") if d["num_local"] else ("global_size",)
        return {f"dino {k}": as_size(d[k], spatial_dims, f"dino {k}") for k in keys}
    return {size_setting: as_size(224 if pretext_size is None else pretext_size, spatial_dims, size_setting)}


def check_pretext_inputs(
    pretext: str, model: nn.Module, pretext_size: int | Sequence[int] | None = 224, dino: Mapping | None = None,
    mim: Mapping | None = None, size_setting: str = "pretext_size",
) -> None:  # fmt: skip
    """Raise a :class:`ConfigError` naming the setting and the fix unless every input the pretext makes passes the
    backbone's size rules (its ``check_input_size`` where it has one, else multiples of its patch / stride) and, for
    MIM, the mask cells fit. ``model`` may live on the meta device (shapes only); ``size_setting`` names the setting
    that gives ``pretext_size`` in messages."""
    iface = model.interface()
    for what, size in pretext_input_sizes(pretext, iface.spatial_dims, pretext_size, dino, size_setting).items():
        try:
            if hasattr(model, "check_input_size"):
                model.check_input_size(size)
            elif any(s % p for s, p in zip(size, iface.patch_size)):
                patch = list(iface.patch_size)
                raise ConfigError(f"not a multiple of the {iface.family} backbone's patch size {patch}")
            if pretext == "mim":
                m = mim_options(mim)
                mask_geometry(size, iface.patch_size, m["mask_patch"], m["mask_ratio"])
        except ConfigError as err:
            raise ConfigError(f"{what} {list(size)}: {err}") from None


def build_pretext(
    pretext: str, encoder: nn.Module, image_size: int | Sequence[int] = 224, mae_decoder: str = "freeze",
    mask_ratio: float = 0.75, decoder: Mapping | None = None, dino: Mapping | None = None, mim: Mapping | None = None,
) -> nn.Module:  # fmt: skip
    """The pretext network around ``encoder`` (built with ``task="features"``, ``stage="tpp"``); ``image_size`` is
    the MAE / MIM input (DINO's crops are its own options)."""
    _check_inputs(check_pretext(pretext), encoder, getattr(encoder, "backbone_name", ""))
    check_pretext_inputs(pretext, encoder, image_size, dino, mim)
    if pretext == "mae":
        return MAEPretext(encoder, mae_decoder, image_size, mask_ratio, decoder)
    if pretext == "mim":
        m = mim_options(mim)
        return MIMPretext(encoder, image_size, m["mask_patch"], m["mask_ratio"])
    d = _dino(dino)
    return DINOPretext(encoder, d["out_dim"], d["hidden_dim"], d["bottleneck_dim"], level_heads=d["level_heads"])


def pretext_loss(pretext: str, net: nn.Module, dino: Mapping | None = None) -> nn.Module:
    """The pretext's loss: MAE's normalised-pixel MSE on masked patches, MIM's L1 on masked pixels, DINO's."""
    if check_pretext(pretext) == "mae":
        return MaskedPatchLoss(net.patch)
    if pretext == "mim":
        return MaskedPixelLoss()
    d = _dino(dino)
    return DINOLoss(d["out_dim"], student_temp=d["student_temp"], teacher_temp=d["teacher_temp"])


def pretext_transforms(
    pretext: str, dataset: str, pretext_size: int | Sequence[int] | None = 224, image_size: Sequence[int] | None = None,
    dino: Mapping | None = None,
) -> object:  # fmt: skip
    """Cacheable image loading (at the dataset's ``image_size``) + the pretext's random views at ``pretext_size``
    (MAE and MIM crop/flip, DINO multi-crop; DINO's own ``global_size`` then sets the global crops). 3D datasets get
    3D views: random crops of ``pretext_size`` from each volume for MAE and MIM
    (:func:`~tpp_monai.pretext.transforms.masked_transforms_3d`), the 3D multi-crop for DINO
    (:func:`~tpp_monai.pretext.transforms.dino_transforms_3d`)."""
    from tpp_monai.data import get_dataset
    from tpp_monai.pretext import transforms as views

    check_pretext(pretext)
    if get_dataset(dataset, "dataset").spatial_dims == 3:
        if pretext != "dino":
            return views.masked_transforms_3d(dataset, as_size(pretext_size or 0, 3, "pretext_size"))
        sizes = pretext_input_sizes("dino", 3, dino=dino)
        d = _dino(dino)
        return views.dino_transforms_3d(dataset, sizes["dino global_size"], as_size(d["local_size"], 3, "local_size"),
                                        d["num_local"])  # fmt: skip
    size = int(224 if pretext_size is None else pretext_size)
    if pretext == "mae":
        return views.mae_transforms(dataset, size, image_size)
    if pretext == "mim":
        return views.mim_transforms(dataset, size, image_size)
    d = _dino(dino)
    return views.dino_transforms(dataset, d["global_size"], d["local_size"], d["num_local"], image_size=image_size)


class PretextBatch:
    """``prepare_batch`` for MONAI's trainer: MAE, MIM -> ``(image, image)``; DINO -> ``(crops, None)``."""

    def __init__(self, pretext: str) -> None:
        self.pretext = check_pretext(pretext)

    def __call__(self, batch: Mapping, device: torch.device | None = None, non_blocking: bool = False, **_: object):
        if self.pretext != "dino":
            image = plain_tensor(batch["image"], device, non_blocking)
            return image, image
        return [plain_tensor(c, device, non_blocking) for c in batch["crops"]], None


class PretextHandlers:
    """Attach the handlers a pretext needs besides the schedules: for DINO the teacher's momentum update, the
    teacher-temperature warm-up, gradient clipping and the first-epoch freeze of the head's last layer; for MIM
    SimMIM's global gradient-norm clipping; none for MAE.

    One config entry serves every pretext, so ``--pretext dino`` needs no other change to ``train#handlers``.
    """

    def __init__(self, net: nn.Module, loss: nn.Module, epochs: int, iters_per_epoch: int,
                 dino: Mapping | None = None, mim: Mapping | None = None) -> None:  # fmt: skip
        self.net, self.loss, self.epochs, self.iters = net, loss, int(epochs), int(iters_per_epoch)
        self.dino, self.mim = _dino(dino), mim_options(mim)

    def attach(self, engine: object) -> None:
        if isinstance(self.net, MIMPretext) and self.mim["clip_grad"]:
            from tpp_monai.handlers import GradientClipHandler

            trainable = [p for p in self.net.parameters() if p.requires_grad]
            GradientClipHandler(trainable, float(self.mim["clip_grad"])).attach(engine)
        if not isinstance(self.net, DINOPretext):
            return
        from tpp_monai.handlers import (
            FreezeLastLayerHandler,
            GradientClipHandler,
            TeacherEMAHandler,
            ValueScheduleHandler,
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
    "DINO_DEFAULTS",
    "MIM_DEFAULTS",
    "PRETEXTS",
    "PRETEXT_INPUTS",
    "PartialState",
    "PretextBatch",
    "PretextHandlers",
    "TargetStateView",
    "adamw_betas",
    "build_pretext",
    "check_pretext",
    "check_pretext_inputs",
    "default_pretext",
    "export_backbone",
    "lr_schedule",
    "pretext_input_sizes",
    "pretext_loss",
    "pretext_transforms",
    "resume_state",
    "supported_pretexts",
]
