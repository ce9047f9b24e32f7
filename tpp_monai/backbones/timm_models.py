"""timm's ViTs as backbones, by name: ``timm:<model_name>`` (e.g. ``timm:vit_small_patch16_224``).

The name pattern is one family of the one backbone registry (:func:`tpp_monai.backbones.get_backbone_spec` resolves
``timm:<model_name>`` to a :class:`~tpp_monai.backbones.BackboneSpec` of family ``timm``). The network is built by
``timm.create_model(model_name, pretrained=False, ...)``, always without pre-trained weights: they come from a local
file (``--backbone_ckpt``, a state dict in timm's own key layout, ``.pth``/``.pt`` or ``.safetensors``), so nothing
is ever downloaded. Any keyword of the model's constructor can be given as a backbone option (``img_size``,
``in_chans``, ``drop_path_rate``, ``global_pool``...).

The built model *is* the timm ``VisionTransformer`` (its parameter names, ``forward_head``, pooling): its class is
swapped for a subclass that puts :class:`TimmViTBackbone` in front, which adds the model API of
:mod:`tpp_monai.contract`. Models of other timm architectures (ResNets, Swin, EVA...) are refused by name, before
anything is built: their blocks have other layouts.

Tasks: ``cls`` (timm's own pooling, ``fc_norm`` and ``head``), ``seg`` (the UNETR-2D decoder of the MedCoSS
segmentation model on layers 4, 7, 10, 12 scaled to the depth, as for the project's own ViTs) and ``features``.
Hook points: the six block sites of every ``Block`` (``attn.qkv`` is fused: the built-in LoRA applies), the global
feature (DINO: timm's pooled feature, ``forward_head(..., pre_logits=True)``; the mean of the patch tokens where the
model has no pooling), kept-token encoding (MAE) and the dense patch-token map.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from tpp_monai.backbones.foreign import BLOCK_SITE_HOOKS, HEAD_REASON, ForeignBackbone, segmentation_outputs
from tpp_monai.backbones.unetr2d import UNETR_MODULES, build_unetr_decoder, unetr_decode
from tpp_monai.backbones.vit import EncoderOutput, TokenLayout, default_taps
from tpp_monai.contract import DENSE_FEATURE, DROPS_TOKENS, GLOBAL_FEATURE, BackboneInterface
from tpp_monai.errors import ConfigError

PREFIX = "timm:"
TIMM_ARCHITECTURE = "timm.models.vision_transformer"  # the module of the model entrypoints this family takes
_BLOCK_PARTS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")


def _timm():
    from tpp_monai.compat import import_timm

    return import_timm()


def check_model_name(model_name: str) -> str:
    """``model_name`` if timm knows it and builds it as a ``VisionTransformer``; else a :class:`ConfigError`.

    Nothing is built or downloaded: only timm's registry of model names is read.
    """
    timm = _timm()
    from timm.models._registry import model_entrypoint

    if not model_name or not timm.is_model(model_name):
        close = timm.list_models(f"*{model_name.split('.')[0][:12]}*")[:8] if model_name else []
        hint = f" (similar names: {', '.join(close)})" if close else ""
        raise ConfigError(
            f"timm has no model {model_name!r}{hint}; name a ViT of timm's vision_transformer module, e.g. "
            "timm:vit_small_patch16_224 (python -c \"import timm; print(timm.list_models('vit_*'))\")"
        )
    module = model_entrypoint(model_name).__module__
    if module != TIMM_ARCHITECTURE:
        raise ConfigError(
            f"timm model {model_name!r} is built by {module}, not by timm's VisionTransformer; the timm: backbones "
            "declare their hook points for VisionTransformer blocks (norm1, attn.qkv, attn.proj, norm2, mlp.fc1/fc2)"
        )
    return model_name


class TimmViTBackbone(ForeignBackbone):
    """The backbone contract for a timm ``VisionTransformer`` (the family class; instances come from :meth:`build`)."""

    family = "timm"
    TASKS = ("cls", "seg", "features")
    HOOKS = BLOCK_SITE_HOOKS | {GLOBAL_FEATURE, DROPS_TOKENS, DENSE_FEATURE}
    SITE_MODULES: ClassVar[dict[str, str]] = {
        "norm1": "norm1", "qkv": "attn.qkv", "attn_out": "attn.proj", "norm2": "norm2", "fc1": "mlp.fc1",
        "fc2": "mlp.fc2",
    }  # fmt: skip
    WRAP_TARGETS: ClassVar[dict[str, tuple[str, ...]]] = {
        "attention": ("attn.qkv",),
        "attention_out": ("attn.proj",),
        "mlp": ("mlp.fc1", "mlp.fc2"),
    }
    HEAD_MODULES: ClassVar[dict[str, tuple[str, ...]]] = {"cls": ("head",), "seg": UNETR_MODULES, "features": ()}
    CHECKPOINT_UNUSED: ClassVar[dict[str, tuple[str, ...]]] = {HEAD_REASON: ("head.",)}
    _ADOPTED: ClassVar[dict[type, type]] = {}
    # set by build (the timm model's own attributes are embed_dim, num_prefix_tokens, patch_embed, blocks, norm...)
    model_name: str
    in_chans: int
    depth: int
    taps: tuple[int, ...]

    @classmethod
    def build(
        cls, model_name: str, task: str = "features", num_classes: int = 0, out_channels: int = 1,
        feature_size: int = 16, **timm_options: object,
    ) -> nn.Module:  # fmt: skip
        """``timm.create_model(model_name, pretrained=False, **timm_options)`` with a head for ``task``.

        Args:
            model_name: a timm ViT name (tag allowed: ``vit_base_patch16_224.mae``).
            task: ``"cls"``, ``"seg"`` or ``"features"``.
            num_classes: classifier outputs (``cls``).
            out_channels: segmentation outputs (``seg``; ``num_classes`` counts too where given).
            feature_size: channels of the UNETR-2D decoder (``seg``).
            timm_options: keywords of the model's constructor.
        """
        task = cls.check_task(task)
        model_name = check_model_name(model_name)
        if timm_options.pop("pretrained", False):
            raise ConfigError(
                "timm backbones are built without downloading weights; pass a local checkpoint with --backbone_ckpt"
            )
        if task == "cls" and int(num_classes) < 2:
            raise ConfigError(f"classification needs num_classes >= 2, got {num_classes}")
        outputs = segmentation_outputs(num_classes, out_channels) if task == "seg" else 0
        timm_options["num_classes"] = int(num_classes) if task == "cls" else 0
        try:
            model = _timm().create_model(model_name, pretrained=False, **timm_options)
        except (TypeError, ValueError, AssertionError) as err:
            raise ConfigError(f"timm could not build {model_name!r} with {timm_options}: {err}") from None
        for i, block in enumerate(model.blocks):
            missing = [p for p in _BLOCK_PARTS if not isinstance(_get(block, p), (nn.Linear, nn.LayerNorm))]
            if missing:
                raise ConfigError(
                    f"timm model {model_name!r} block {i} has no {missing} (a plain Linear/LayerNorm), where the timm: "
                    "backbones put their block sites; choose a ViT with the standard block layout"
                )
        base = type(model)
        if base not in cls._ADOPTED:
            cls._ADOPTED[base] = type(f"Timm{base.__name__}Backbone", (cls, base), {"__module__": __name__})
        model.__class__ = cls._ADOPTED[base]
        model._adopt(model_name, task, outputs, int(feature_size))
        return model

    def _adopt(self, model_name: str, task: str, outputs: int, feature_size: int) -> None:
        self.model_name, self.task = model_name, task
        self.in_chans = int(self.patch_embed.proj.in_channels)
        self.depth = len(self.blocks)
        if task == "seg":
            self.taps = default_taps(self.depth)
            build_unetr_decoder(self, self.in_chans, outputs, self.embed_dim, feature_size)

    # ----- the backbone contract ------------------------------------------------------------------------------------
    def interface(self) -> BackboneInterface:
        return BackboneInterface(
            family=self.family, layout="tokens", spatial_dims=2, width=int(self.embed_dim), in_channels=self.in_chans,
            patch_size=tuple(int(p) for p in self.patch_embed.patch_size), site_modules=dict(self.SITE_MODULES),
            wrap_targets=dict(self.WRAP_TARGETS),
        )  # fmt: skip

    def encoder_blocks(self) -> nn.Module:
        return self.blocks

    def unused_parameter_names(self) -> set[str]:
        """Segmentation reads the tapped tokens, not timm's pooling: ``fc_norm`` and an attention pool go unused."""
        if self.task != "seg":
            return set()
        return {n for n, _ in self.named_parameters() if n.startswith(("fc_norm.", "attn_pool."))}

    def global_feature_dims(self) -> list[int]:
        return [int(self.embed_dim)]

    def global_features(self, x: Tensor) -> list[Tensor]:
        """timm's pooled feature (``forward_head(tokens, pre_logits=True)``: class token or average as the model
        pools, then ``fc_norm``), or the mean of the patch tokens for a model without pooling: ``[B, D]``."""
        out = self.forward_features(x)
        if not self.global_pool and getattr(self, "attn_pool", None) is None:
            return [out.patches.mean(dim=1)]
        return [self.forward_head(out.tokens, pre_logits=True)]

    def dense_features(self, x: Tensor) -> Tensor:
        """The last layer's patch tokens (after the final norm) as a map ``[B, D, H/p, W/p]``."""
        out = self.forward_features(x)
        return out.layout.patches_to_grid(out.patches)

    def forward_features(
        self, x: Tensor, keep_idx: Tensor | None = None, taps: Sequence[int] = (), with_prefix: bool | None = None
    ) -> EncoderOutput:
        """timm's ``forward_features`` (patch embedding, position embedding with the class and register tokens,
        ``norm_pre``, blocks, ``norm``), on the patches ``keep_idx`` (``[B, n]``) only when given (MAE). ``taps``:
        1-indexed layers whose patch tokens are returned (the last after ``norm``). Prefix tokens come first unless
        ``with_prefix`` is False (then the encoder runs without them)."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ConfigError(f"timm ViT expects [B, {self.in_chans}, H, W] images, got shape {tuple(x.shape)}")
        tokens = self.patch_embed(x)  # [B, N, D], or [B, H', W', D] with timm's dynamic_img_size
        grid = tokens.shape[1:3] if tokens.ndim == 4 else self.patch_embed.dynamic_feat_size(tuple(x.shape[-2:]))
        grid = tuple(int(g) for g in grid)
        tokens = self._pos_embed(tokens)  # [B, P + N, D]
        num_prefix = int(self.num_prefix_tokens)
        prefix, patches = tokens[:, :num_prefix], tokens[:, num_prefix:]
        if keep_idx is not None:
            patches = torch.gather(patches, 1, keep_idx.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        if with_prefix is False:
            num_prefix = 0
        tokens = torch.cat([prefix, patches], dim=1) if num_prefix else patches
        if keep_idx is None and num_prefix == self.num_prefix_tokens:
            tokens = self.patch_drop(tokens)  # timm's PatchDropout (the identity unless patch_drop_rate is set)
        tokens = self.norm_pre(tokens)
        tap_set, tapped = set(taps), []
        for i, block in enumerate(self.blocks):
            tokens = block(tokens)
            if i + 1 in tap_set and i + 1 != len(self.blocks):
                tapped.append(tokens[:, num_prefix:])
        tokens = self.norm(tokens)
        if len(self.blocks) in tap_set:
            tapped.append(tokens[:, num_prefix:])
        layout = TokenLayout(grid=grid, num_prefix=num_prefix, keep_idx=keep_idx, image=x)
        return EncoderOutput(tokens=tokens, num_prefix=num_prefix, taps=tapped, layout=layout)

    def forward(self, x: Tensor) -> Tensor:
        """``cls``: logits ``[B, K]`` (timm's head); ``seg``: logits ``[B, K, H, W]``; ``features``: ``[B, D]``."""
        if self.task == "seg":
            out = self.forward_features(x, taps=self.taps)
            return unetr_decode(self, x, out.taps, out.layout.grid)
        if self.task == "features":
            return self.global_feature(x)
        return self.forward_head(self.forward_features(x).tokens)


def _get(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


__all__ = ["PREFIX", "TimmViTBackbone", "check_model_name"]
