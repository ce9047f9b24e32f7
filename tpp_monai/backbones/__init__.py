"""Backbones by name: ``build_backbone("medcoss_vit_b16", task="cls", num_classes=2, checkpoint=path)``.

* ``medcoss_vit_b16``: MedCoSS ViT-B/16, the paper's main backbone (MedCoSS pre-training or fine-tuning checkpoints).
* ``path_dino_vit_s16``: timm/DINO ViT-S/16, Path_DINO of Kang et al. 2023 (Table 9; flat timm/DINO state dict).
* ``vit_b16``: timm/DINO ViT-B/16 (flat state dict).
* ``medcoss_vit_tiny``, ``vit_tiny``: small configurations of both, for tests and CPU demos.
* ``stunet_s``, ``stunet_b``, ``stunet_l``, ``stunet_h``: STU-Net (3D, Table 10; nnU-Net v1/v2 checkpoints), and
  ``stunet_tiny`` for tests.
* ``swinunetr`` (3D), ``swinunetr_2d``: MONAI's SwinUNETR (the model zoo's ``swin_unetr_btcv_segmentation`` and the
  self-supervised ``model_swinvit.pt`` weights); ``swinunetr_tiny``, ``swinunetr_2d_tiny`` for tests.
* ``unetr``, ``vit``: MONAI's UNETR and ViT (3D by default; their checkpoints and ``MaskedAutoEncoderViT``'s);
  ``unetr_tiny``, ``monai_vit_tiny`` for tests.
* ``timm:<model_name>``: any ViT of timm's ``vision_transformer`` module, built by timm without weights, loaded from
  a local file (a family with a name pattern: :data:`NAME_PATTERNS`).

Families that adopt a library's network (:mod:`tpp_monai.backbones.foreign`) declare their hook points, tasks,
heads and checkpoint layouts on their class; ``family_class(name)`` reads them before anything is built.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from tpp_monai.backbones.checkpoint import LoadReport, extract_state_dict, load_into
from tpp_monai.backbones.foreign import ForeignBackbone
from tpp_monai.backbones.medcoss import MedCoSSViT
from tpp_monai.backbones.monai_vit import MonaiUNETR, MonaiViT
from tpp_monai.backbones.stunet import CHECKPOINT_UNUSED as _STUNET_UNUSED
from tpp_monai.backbones.stunet import VARIANTS as _STUNET_VARIANTS
from tpp_monai.backbones.stunet import STUNet
from tpp_monai.backbones.swinunetr import SwinUNETRBackbone
from tpp_monai.backbones.timm_models import PREFIX as TIMM_PREFIX
from tpp_monai.backbones.timm_models import TimmViTBackbone, check_model_name
from tpp_monai.backbones.timm_vit import TimmViT
from tpp_monai.backbones.unetr2d import UNETR_MODULES
from tpp_monai.backbones.vit import ViTBase
from tpp_monai.contract import is_peft_parameter
from tpp_monai.errors import ConfigError, unknown_choice
from tpp_monai.io import read_file

# Checkpoint entries a MedCoSS model may meet and ignore, by reason (``keys/medcoss_*.json``).
_MEDCOSS_UNUSED = {
    "unused MedCoSS pre-training tables": ("video_embed.embeddings_pos.", "video_embed.embeddings_type."),
    "MedCoSS text branch": ("token_embed.", "mlm_head.", "decoder_pos_embed_1D."),
    "MAE decoder, not used by this workflow": ("decoder_", "mask_token"),
    "task head of the checkpoint (a fresh head is trained)": ("fc_norm.", "head.", *(m + "." for m in UNETR_MODULES)),
    "class token (the segmentation model has none)": ("cls_token",),
}
_TIMM_UNUSED = {  # the first matching reason names a key: the DINO head before the wider task-head prefix
    "DINO projection head": ("head.mlp.", "head.last_layer."),
    "task head of the checkpoint (a fresh head is trained)": ("head.", "fc_norm."),
}
MAE_DECODER_PREFIXES = (
    "decoder_embed.",
    "mask_token",
    "decoder_pos_embed_2D",
    "decoder_blocks.",
    "decoder_norm.",
    "decoder_pred_2D.",
)


@dataclass(frozen=True)
class BackboneSpec:
    """One named backbone.

    Args:
        name: registry name.
        family: ``"medcoss"``, ``"timm_vit"``, ``"stunet"``, ``"swinunetr"``, ``"unetr"``, ``"monai_vit"`` or
            ``"timm"`` (:data:`FAMILIES`).
        kwargs: constructor arguments of the family class.
        mae_decoder: geometry of the MAE decoder used by TPP-MAE (``dim, depth, heads``).
        weights: where users get pre-trained weights (shown when a checkpoint is required but missing).
    """

    name: str
    family: str
    kwargs: dict = field(default_factory=dict)
    mae_decoder: dict = field(default_factory=dict)
    weights: str = ""


_MEDCOSS_B = {"embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_dim": 3072}
_MEDCOSS_WEIGHTS = (
    "download the MedCoSS pre-trained checkpoint (checkpoint-299.pth, linked from the README of "
    "github.com/yeerwen/MedCoSS) and pass it with --backbone_ckpt /path/to/checkpoint-299.pth"
)
_TINY = "small configuration for tests and CPU demos; no public weights"
_SWIN_TINY = {"feature_size": 12, "window_size": 4}
_VIT_TINY = {"img_size": 32, "hidden_size": 48, "mlp_dim": 96, "num_heads": 3}
_SWIN_WEIGHTS = (
    "download the model zoo's swin_unetr_btcv_segmentation (python -m monai.bundle download "
    "swin_unetr_btcv_segmentation: models/model.pt) or the self-supervised encoder model_swinvit.pt (linked from "
    "github.com/Project-MONAI/research-contributions, SwinUNETR/Pretrain) and pass it with --backbone_ckpt"
)
_MONAI_VIT_WEIGHTS = (
    "a MONAI ViT or UNETR state dict, or the weights of a MONAI MaskedAutoEncoderViT (torch.save(net.state_dict(), "
    "path)), of the same geometry (set it with backbone_options); pass it with --backbone_ckpt"
)
BACKBONES: dict[str, BackboneSpec] = {
    s.name: s
    for s in (
        BackboneSpec("medcoss_vit_b16", "medcoss", _MEDCOSS_B, {"dim": 512, "depth": 8, "heads": 16}, _MEDCOSS_WEIGHTS),
        BackboneSpec(
            "medcoss_vit_tiny",
            "medcoss",
            {"embed_dim": 96, "depth": 4, "num_heads": 3, "mlp_dim": 384},
            {"dim": 64, "depth": 2, "heads": 4},
            "small configuration for tests and CPU demos; no public weights",
        ),
        BackboneSpec(
            "path_dino_vit_s16",
            "timm_vit",
            {"embed_dim": 384, "depth": 12, "num_heads": 6},
            {"dim": 512, "depth": 8, "heads": 16},
            "download dino_vit_small_patch16_ep200.torch from the 'pretrained-weights' release of "
            "github.com/lunit-io/benchmark-ssl-pathology and pass it with --backbone_ckpt",
        ),
        BackboneSpec(
            "vit_b16",
            "timm_vit",
            {"embed_dim": 768, "depth": 12, "num_heads": 12},
            {"dim": 512, "depth": 8, "heads": 16},
            "any timm/DINO ViT-B/16 state dict (e.g. dino_vitbase16_pretrain.pth); pass it with --backbone_ckpt",
        ),
        BackboneSpec(
            "vit_tiny",
            "timm_vit",
            {"embed_dim": 96, "depth": 4, "num_heads": 3},
            {"dim": 64, "depth": 2, "heads": 4},
            "small configuration for tests and CPU demos; no public weights",
        ),
        *(BackboneSpec(name, "stunet", kw, weights=weights) for name, (kw, weights) in _STUNET_VARIANTS.items()),
        BackboneSpec("swinunetr", "swinunetr", {"feature_size": 48}, weights=_SWIN_WEIGHTS),
        BackboneSpec(
            "swinunetr_2d", "swinunetr", {"feature_size": 48, "in_channels": 3, "spatial_dims": 2},
            weights="no public 2D SwinUNETR weights; pass a SwinUNETR(spatial_dims=2) state dict with --backbone_ckpt",
        ),
        BackboneSpec("swinunetr_tiny", "swinunetr", _SWIN_TINY, weights=_TINY),
        BackboneSpec("swinunetr_2d_tiny", "swinunetr", {**_SWIN_TINY, "in_channels": 3, "spatial_dims": 2},
                     weights=_TINY),
        BackboneSpec("unetr", "unetr", {}, {"dim": 384, "depth": 4, "heads": 12}, _MONAI_VIT_WEIGHTS),
        BackboneSpec("unetr_tiny", "unetr", {**_VIT_TINY, "feature_size": 8}, {"dim": 48, "depth": 2, "heads": 3},
                     _TINY),
        BackboneSpec("vit", "monai_vit", {}, {"dim": 384, "depth": 4, "heads": 12}, _MONAI_VIT_WEIGHTS),
        BackboneSpec("monai_vit_tiny", "monai_vit", {**_VIT_TINY, "num_layers": 4, "patch_size": 8},
                     {"dim": 48, "depth": 2, "heads": 3}, _TINY),
    )
}  # fmt: skip
FAMILIES: dict[str, type] = {
    "medcoss": MedCoSSViT, "timm_vit": TimmViT, "stunet": STUNet, "swinunetr": SwinUNETRBackbone, "unetr": MonaiUNETR,
    "monai_vit": MonaiViT, "timm": TimmViTBackbone,
}  # fmt: skip


@functools.cache
def _timm_spec(name: str) -> BackboneSpec:
    model_name = check_model_name(name[len(TIMM_PREFIX) :])
    return BackboneSpec(
        name, "timm", {"model_name": model_name}, {"dim": 512, "depth": 8, "heads": 16},
        f"a local file holding the state dict of timm's {model_name} (torch.save(model.state_dict(), path), or a "
        "model.safetensors); pass it with --backbone_ckpt (timm never downloads weights here)",
    )  # fmt: skip


#: Backbone names resolved by pattern (a family whose members are named by a library): prefix -> spec resolver.
NAME_PATTERNS: dict[str, Callable[[str], BackboneSpec]] = {TIMM_PREFIX: _timm_spec}


def get_backbone_spec(name: str, where: str = "") -> BackboneSpec:
    """The spec of a registered backbone, or of one named by a pattern (``timm:<model_name>``); unknown names list
    the valid ones."""
    name = str(name)
    if name in BACKBONES:
        return BACKBONES[name]
    for prefix, resolve in NAME_PATTERNS.items():
        if name.startswith(prefix):
            return resolve(name)
    raise unknown_choice("backbone", name, [*BACKBONES, *(f"{p}<model_name>" for p in NAME_PATTERNS)], where)


def family_class(name: str, where: str = "") -> type:
    """The class of backbone ``name``'s family: its ``HOOKS`` say which slot methods apply, before anything is built."""
    return FAMILIES[get_backbone_spec(name, where).family]


def build_backbone(
    name: str, task: str = "features", num_classes: int = 0, out_channels: int = 1, **overrides: object
) -> nn.Module:
    """Build a backbone with a task head (no weights loaded); ``overrides`` change constructor arguments.

    A family class builds through its ``build`` classmethod where it has one (``timm``: the model comes from
    ``timm.create_model``), else through its constructor.
    """
    spec = get_backbone_spec(name)
    cls = FAMILIES.get(spec.family)
    if cls is None:
        raise ConfigError(f"backbone {name!r} ({spec.family}) is built by its own module, not build_backbone")
    factory = getattr(cls, "build", cls)
    model = factory(task=task, num_classes=num_classes, out_channels=out_channels, **{**spec.kwargs, **overrides})
    model.backbone_name = name
    return model


def backbone_parameter_names(model: nn.Module) -> list[str]:
    """Names of the pre-trained backbone tensors (everything but the task head and PEFT additions)."""
    head = set(model.head_parameter_names())
    return [n for n, _ in model.named_parameters() if n not in head and not is_peft_parameter(n)]


def load_backbone_checkpoint(model: nn.Module, path: str | Path, keep_mae_decoder: bool = False) -> LoadReport:
    """Load pre-trained backbone weights into ``model`` strictly; see :mod:`tpp_monai.backbones.checkpoint`.

    With ``keep_mae_decoder`` the MAE decoder tensors of the checkpoint (MedCoSS: and the class token; MONAI's
    ``MaskedAutoEncoderViT``: :data:`~tpp_monai.backbones.monai_vit.MONAI_MAE_DECODER`) are returned in
    ``report.extras`` for the TPP-MAE stage instead of being reported as unused. Families that adopt a library's
    network first map the checkpoint's key layout onto their own (:meth:`ForeignBackbone.translate_checkpoint`).
    """
    spec = get_backbone_spec(getattr(model, "backbone_name", ""), "the model")
    state = extract_state_dict(read_file(path), path)
    expected = backbone_parameter_names(model)
    extras: tuple[str, ...] = ()
    if isinstance(model, ForeignBackbone):
        state = model.translate_checkpoint(state)
        optional = model.optional_parameter_names()
        expected = [n for n in expected if n not in optional]
        unused = model.checkpoint_unused()
        if keep_mae_decoder:
            extras = model.checkpoint_extras()
    else:
        unused = dict({"medcoss": _MEDCOSS_UNUSED, "stunet": _STUNET_UNUSED}.get(spec.family, _TIMM_UNUSED))
        if keep_mae_decoder:
            extras = (*MAE_DECODER_PREFIXES, "cls_token")
    return load_into(model, state, expected, unused, extras, path)


__all__ = [
    "BACKBONES",
    "FAMILIES",
    "NAME_PATTERNS",
    "BackboneSpec",
    "ForeignBackbone",
    "LoadReport",
    "MedCoSSViT",
    "MonaiUNETR",
    "MonaiViT",
    "STUNet",
    "SwinUNETRBackbone",
    "TimmViT",
    "TimmViTBackbone",
    "ViTBase",
    "backbone_parameter_names",
    "build_backbone",
    "family_class",
    "get_backbone_spec",
    "load_backbone_checkpoint",
]
