"""MONAI's ViT and UNETR (Hatamizadeh et al. 2022) as backbones, 3D and 2D, including weights saved from MONAI's
``MaskedAutoEncoderViT``.

:class:`MonaiViT` *is* a ``monai.networks.nets.ViT`` and :class:`MonaiUNETR` a ``monai.networks.nets.UNETR`` (their
forwards, their parameter names), with the model API of :mod:`tpp_monai.contract` added. Layouts (read from MONAI
1.6.1 ``monai/networks/nets/{vit,unetr,masked_autoencoder_vit}.py``, ``networks/blocks/{transformerblock,
selfattention,mlp,patchembedding}.py``):

* **ViT**: ``patch_embedding.{patch_embeddings.*, position_embeddings}`` (``[1, N, D]``: patches only, the class
  token has no position), ``blocks.{i}.{norm1, attn.qkv, attn.out_proj, norm2, mlp.linear1, mlp.linear2,
  norm_cross_attn}.*``, ``norm.*``, and with ``classification`` ``cls_token`` and ``classification_head.*``.
* **UNETR**: the ViT under ``vit.`` (12 layers, patch 16, no class token) and the decoder ``encoder1``-``encoder4``,
  ``decoder5``-``decoder2``, ``out``. A ViT checkpoint loads into UNETR and a UNETR checkpoint into ViT (the prefix
  is added or removed).
* **MaskedAutoEncoderViT** (MONAI >= 1.5): the ViT's encoder keys, except that its final LayerNorm is the last entry
  of ``blocks`` (an ``nn.Sequential``): ``blocks.{L}.{weight,bias}`` -> ``norm.*``; its class token loads into a ViT
  that has one. Its decoder is reported unused, or with ``keep_mae_decoder`` kept verbatim for the MAE pretext
  stage (:data:`MONAI_MAE_DECODER` documents the layout).
* MONAI versions: ``norm_cross_attn`` exists from MONAI 1.4 on and is never used without cross-attention, so older
  checkpoints may lack it; MONAI 1.4-1.5 also saved an unused ``cross_attn`` per block, reported unused here (as
  MONAI's own ``load_old_state_dict`` drops it).

Hook points: the six block sites of every ``TransformerBlock`` (``attn.qkv`` is the fused q/k/v projection: the
built-in LoRA applies), the global feature (DINO: the class token's output where the ViT has one, else the mean of
the patch tokens), kept-token encoding (MAE: :meth:`forward_features` with ``keep_idx``) and the dense patch-token map
(masked-image modelling, stride = the patch size). The position table is fixed to ``img_size``: inputs must have that
size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from monai.networks.nets import UNETR, ViT
from torch import Tensor, nn

from tpp_monai.backbones.foreign import BLOCK_SITE_HOOKS, HEAD_REASON, ForeignBackbone, segmentation_outputs
from tpp_monai.backbones.vit import EncoderOutput, TokenLayout
from tpp_monai.contract import DENSE_FEATURE, DROPS_TOKENS, GLOBAL_FEATURE, BackboneInterface
from tpp_monai.errors import ConfigError

UNETR_DECODER = ("encoder1", "encoder2", "encoder3", "encoder4", "decoder5", "decoder4", "decoder3", "decoder2", "out")
#: Key prefixes of the decoder of a MONAI ``MaskedAutoEncoderViT`` checkpoint, which ``keep_mae_decoder`` returns in
#: ``LoadReport.extras`` verbatim (``D`` encoder width, ``Dd`` decoder width, ``N`` patches, ``K`` decoder blocks):
#: ``decoder_embed.{weight [Dd, D], bias}``, ``mask_tokens [1, 1, Dd]``, ``decoder_pos_embedding [1, N, Dd]`` (no
#: class-token row; MONAI's default is a fixed sin-cos table), ``decoder_blocks.{0..K-1}.*`` (MONAI
#: ``TransformerBlock`` keys as in the encoder), ``decoder_blocks.{K}.{weight, bias}`` (the decoder's final LayerNorm,
#: the last entry of its ``nn.Sequential``) and ``decoder_pred.{weight [prod(patch) * C, Dd], bias}``. A backbone
#: without a class token (``unetr``) adds the checkpoint's ``cls_token [1, 1, D]``, which the decoder sequence starts
#: with. :func:`monai_mae_decoder_geometry` reads the geometry back from these tensors.
MONAI_MAE_DECODER = ("decoder_embed.", "mask_tokens", "decoder_pos_embedding", "decoder_blocks.", "decoder_pred.")
_ENCODER_KEYS = ("patch_embedding.", "blocks.", "norm.")


def monai_mae_decoder_geometry(extras: Mapping[str, Tensor]) -> dict:
    """The decoder geometry of a MONAI ``MaskedAutoEncoderViT`` read from its tensors (:data:`MONAI_MAE_DECODER`):
    ``decoder_hidden_size``, ``decoder_mlp_dim``, ``decoder_num_layers``, ``qkv_bias``, ``num_patches`` and
    ``patch_dim`` (``prod(patch) * in_channels``). The number of heads is not stored in the weights."""
    try:
        hidden = int(extras["decoder_embed.weight"].shape[0])
        layers = len({k.split(".")[1] for k in extras if k.startswith("decoder_blocks.") and ".attn." in k})
        return {
            "decoder_hidden_size": hidden,
            "decoder_mlp_dim": int(extras["decoder_blocks.0.mlp.linear1.weight"].shape[0]),
            "decoder_num_layers": layers,
            "qkv_bias": "decoder_blocks.0.attn.qkv.bias" in extras,
            "num_patches": int(extras["decoder_pos_embedding"].shape[1]),
            "patch_dim": int(extras["decoder_pred.weight"].shape[0]),
        }
    except KeyError as err:
        raise ConfigError(f"the checkpoint holds no complete MONAI MaskedAutoEncoderViT decoder (no {err})") from None


def _mae_to_vit(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``MaskedAutoEncoderViT``'s encoder norm ``blocks.{L}.*`` (last entry of its ``nn.Sequential``) -> ``norm.*``."""
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.") and ".attn." in k}
    last = f"blocks.{len(blocks)}."
    if blocks and f"{last}weight" in state and "norm.weight" not in state:
        return {("norm." + k[len(last) :] if k.startswith(last) else k): v for k, v in state.items()}
    return state


class _MonaiTokens(ForeignBackbone):
    """What MONAI's ViT and UNETR share: a ``ViT`` (the model itself, or ``model.vit``) and its token forward."""

    HOOKS = BLOCK_SITE_HOOKS | {GLOBAL_FEATURE, DROPS_TOKENS, DENSE_FEATURE}
    SITE_MODULES: ClassVar[dict[str, str]] = {
        "norm1": "norm1", "qkv": "attn.qkv", "attn_out": "attn.out_proj", "norm2": "norm2", "fc1": "mlp.linear1",
        "fc2": "mlp.linear2",
    }  # fmt: skip
    WRAP_TARGETS: ClassVar[dict[str, tuple[str, ...]]] = {
        "attention": ("attn.qkv",),
        "attention_out": ("attn.out_proj",),
        "mlp": ("mlp.linear1", "mlp.linear2"),
    }
    CHECKPOINT_UNUSED: ClassVar[dict[str, tuple[str, ...]]] = {
        HEAD_REASON: ("classification_head.", "vit.classification_head.", *(m + "." for m in UNETR_DECODER)),
        "MAE decoder (MONAI MaskedAutoEncoderViT), not used by this workflow": MONAI_MAE_DECODER,
    }
    VIT_PREFIX: ClassVar[str] = ""  # where the ViT sits in the model ("vit." in UNETR)
    img_size: tuple[int, ...]
    spatial_dims: int

    def _setup(self, task: str, in_channels: int, spatial_dims: int, img_size: Sequence[int] | int,
               patch: Sequence[int] | int) -> None:  # fmt: skip
        self.task, self.in_chans, self.spatial_dims = task, int(in_channels), int(spatial_dims)
        self.img_size = _tuple(img_size, self.spatial_dims)
        self.patch = _tuple(patch, self.spatial_dims)
        self.embed_dim = int(self.vit_module().norm.normalized_shape[0])
        self.depth = len(self.vit_module().blocks)

    def vit_module(self) -> ViT:
        raise NotImplementedError

    # ----- the backbone contract ------------------------------------------------------------------------------------
    def interface(self) -> BackboneInterface:
        return BackboneInterface(
            family=self.family, layout="tokens", spatial_dims=self.spatial_dims, width=self.embed_dim,
            in_channels=self.in_chans, patch_size=self.patch, site_modules=dict(self.SITE_MODULES),
            wrap_targets=dict(self.WRAP_TARGETS),
        )  # fmt: skip

    def encoder_blocks(self) -> nn.ModuleList:
        return self.vit_module().blocks

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(s // p for s, p in zip(self.img_size, self.patch))

    def class_token(self) -> Tensor | None:
        return getattr(self.vit_module(), "cls_token", None)

    def unused_parameter_names(self) -> set[str]:
        """The blocks' ``norm_cross_attn`` (MONAI builds it whether or not a block has cross-attention)."""
        return {n for n, _ in self.named_parameters() if ".norm_cross_attn." in n}

    def optional_parameter_names(self) -> set[str]:
        return self.unused_parameter_names()

    def global_feature_dims(self) -> list[int]:
        return [self.embed_dim]

    def global_features(self, x: Tensor) -> list[Tensor]:
        """The class token's output (the token MONAI's classification head reads) where the ViT has one, else the
        mean of the patch tokens: ``[B, D]``."""
        out = self.forward_features(x)
        return [out.tokens[:, 0] if out.num_prefix else out.patches.mean(dim=1)]

    def dense_features(self, x: Tensor) -> Tensor:
        """The last layer's patch tokens (after the final norm) as a map ``[B, D, *grid]``."""
        out = self.forward_features(x, with_prefix=False)
        return out.layout.patches_to_grid(out.patches)

    def check_input_size(self, x: Tensor) -> None:
        want = (self.in_chans, *self.img_size)
        if tuple(x.shape[1:]) != want:
            raise ConfigError(
                f"the {self.family} backbone was built for inputs [B, {', '.join(map(str, want))}] (its position table "
                f"is fixed to img_size {list(self.img_size)}), got shape {tuple(x.shape)}; resize the inputs or set "
                'backbone_options {"img_size": [...]} (and in_channels) to the data'
            )

    def forward_features(
        self, x: Tensor, keep_idx: Tensor | None = None, taps: Sequence[int] = (), with_prefix: bool | None = None
    ) -> EncoderOutput:
        """Run the ViT encoder (MONAI's ``ViT.forward`` up to its final norm) on all patches or, with ``keep_idx``
        (``[B, n]``), on those patches only (MAE). ``taps``: 1-indexed layers whose patch tokens are returned (the
        last one after the final norm). The class token, where the ViT has one, comes first unless ``with_prefix``
        is False; a ViT without one (UNETR's) returns ``num_prefix == 0``."""
        self.check_input_size(x)
        vit = self.vit_module()
        embed = vit.patch_embedding
        tokens = embed.patch_embeddings(x)
        if embed.proj_type == "conv":
            tokens = tokens.flatten(2).transpose(-1, -2)
        tokens = embed.dropout(tokens + embed.position_embeddings)
        if keep_idx is not None:
            tokens = torch.gather(tokens, 1, keep_idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        cls = self.class_token() if with_prefix is not False else None
        num_prefix = 0 if cls is None else 1
        if cls is not None:
            tokens = torch.cat([cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tap_set, tapped = set(taps), []
        for i, block in enumerate(vit.blocks):
            tokens = block(tokens)
            if i + 1 in tap_set and i + 1 != len(vit.blocks):
                tapped.append(tokens[:, num_prefix:])
        tokens = vit.norm(tokens)
        if len(vit.blocks) in tap_set:
            tapped.append(tokens[:, num_prefix:])
        layout = TokenLayout(grid=self.grid, num_prefix=num_prefix, keep_idx=keep_idx, image=x)
        return EncoderOutput(tokens=tokens, num_prefix=num_prefix, taps=tapped, layout=layout)

    # ----- checkpoints ------------------------------------------------------------------------------------------------
    def translate_checkpoint(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """MAE encoder norm -> ``norm``; ViT keys <-> UNETR's ``vit.`` keys."""
        state = dict(state)
        if any(k.startswith("vit.") for k in state):  # a UNETR checkpoint
            state = {k.removeprefix("vit."): v for k, v in state.items()}
        state = _mae_to_vit(state)
        if self.VIT_PREFIX:
            state = {(self.VIT_PREFIX + k if k.startswith(_ENCODER_KEYS) else k): v for k, v in state.items()}
        return state

    def checkpoint_unused(self) -> dict[str, tuple[str, ...]]:
        unused = super().checkpoint_unused()
        stale = tuple(f"{self.VIT_PREFIX}blocks.{i}.cross_attn." for i in range(self.depth))
        unused["cross-attention MONAI 1.4-1.5 saved in every block (unused without cross-attention)"] = stale
        if self.class_token() is None:
            unused["class token (this model has none)"] = ("cls_token",)
        return unused

    def checkpoint_extras(self) -> tuple[str, ...]:
        return MONAI_MAE_DECODER + (("cls_token",) if self.class_token() is None else ())


def _tuple(value: Sequence[int] | int, dims: int) -> tuple[int, ...]:
    out = (int(value),) * dims if isinstance(value, (int, float)) else tuple(int(v) for v in value)
    if len(out) != dims:
        raise ConfigError(f"expected {dims} sizes (spatial_dims {dims}), got {value!r}")
    return out


class MonaiViT(_MonaiTokens, ViT):
    """MONAI's ViT with the backbone contract.

    Args:
        in_channels, img_size, patch_size, hidden_size, mlp_dim, num_layers, num_heads, spatial_dims: ViT's
            arguments (ViT-B/16 on 96^3 single-channel volumes by default); ``vit_options`` passes any other
            (``proj_type``, ``pos_embed_type``, ``qkv_bias``, ``dropout_rate``...).
        task: ``"cls"`` (MONAI's classification head on the class token; without MONAI's default Tanh on the logits
            unless ``post_activation="Tanh"`` is passed) or ``"features"`` (no head: the TPP stage).
        class_token: give the features model a class token too (default), so that it and the classifier hold the
            same backbone tensors (a ``MaskedAutoEncoderViT`` checkpoint has one).
    """

    family = "monai_vit"
    TASKS = ("cls", "features")
    HEAD_MODULES: ClassVar[dict[str, tuple[str, ...]]] = {"cls": ("classification_head",), "features": ()}

    def __init__(
        self,
        in_channels: int = 1,
        img_size: Sequence[int] | int = 96,
        patch_size: Sequence[int] | int = 16,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_layers: int = 12,
        num_heads: int = 12,
        spatial_dims: int = 3,
        task: str = "features",
        num_classes: int = 0,
        out_channels: int = 1,
        class_token: bool = True,
        post_activation: str = "none",
        **vit_options: object,
    ) -> None:
        task = self.check_task(task)
        if task == "cls" and int(num_classes) < 2:
            raise ConfigError(f"classification needs num_classes >= 2, got {num_classes}")
        try:
            super().__init__(
                in_channels=int(in_channels), img_size=img_size, patch_size=patch_size, hidden_size=int(hidden_size),
                mlp_dim=int(mlp_dim), num_layers=int(num_layers), num_heads=int(num_heads),
                spatial_dims=int(spatial_dims), classification=task == "cls", num_classes=max(2, int(num_classes)),
                post_activation=post_activation, **vit_options,
            )  # fmt: skip
        except (TypeError, ValueError) as err:
            raise ConfigError(f"invalid MONAI ViT options: {err}") from None
        if task == "features" and class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, int(hidden_size)))
        self._setup(task, in_channels, spatial_dims, img_size, patch_size)

    def vit_module(self) -> ViT:
        return self

    def forward(self, x: Tensor) -> Tensor:
        """``cls``: logits ``[B, K]`` (MONAI's ViT forward); ``features``: the global feature ``[B, D]``."""
        if self.task == "features":
            return self.global_feature(x)
        self.check_input_size(x)
        return super().forward(x)[0]


class MonaiUNETR(_MonaiTokens, UNETR):
    """MONAI's UNETR with the backbone contract.

    Args:
        in_channels, img_size, feature_size, hidden_size, mlp_dim, num_heads, spatial_dims: UNETR's arguments (its
            ViT has 12 layers and patch 16, fixed by MONAI); ``unetr_options`` passes any other (``norm_name``,
            ``proj_type``, ``qkv_bias``...).
        out_channels, num_classes: segmentation outputs (``num_classes`` incl. background when given).
        task: ``"seg"`` (the whole UNETR; the decoder is the head) or ``"features"`` (the ViT alone: the TPP stage).
    """

    family = "unetr"
    TASKS = ("seg", "features")
    HEAD_MODULES: ClassVar[dict[str, tuple[str, ...]]] = {"seg": UNETR_DECODER, "features": ()}
    VIT_PREFIX = "vit."

    def __init__(
        self,
        in_channels: int = 1,
        img_size: Sequence[int] | int = 96,
        feature_size: int = 16,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_heads: int = 12,
        spatial_dims: int = 3,
        task: str = "seg",
        num_classes: int = 0,
        out_channels: int = 1,
        **unetr_options: object,
    ) -> None:
        task = self.check_task(task)
        outputs = segmentation_outputs(num_classes, out_channels) if task == "seg" else 1
        size = _tuple(img_size, int(spatial_dims))
        if any(s % 16 for s in size):
            raise ConfigError(f"UNETR img_size {list(size)} must be a multiple of its patch size 16 on every axis")
        try:
            super().__init__(
                in_channels=int(in_channels), out_channels=outputs, img_size=size, feature_size=int(feature_size),
                hidden_size=int(hidden_size), mlp_dim=int(mlp_dim), num_heads=int(num_heads),
                spatial_dims=int(spatial_dims), **unetr_options,
            )  # fmt: skip
        except (TypeError, ValueError) as err:
            raise ConfigError(f"invalid MONAI UNETR options: {err}") from None
        self._setup(task, in_channels, spatial_dims, size, self.patch_size)
        if task == "features":  # the ViT alone; the decoder is the segmentation head
            for name in UNETR_DECODER:
                delattr(self, name)

    def vit_module(self) -> ViT:
        return self.vit

    def forward(self, x: Tensor) -> Tensor:
        """``seg``: logits ``[B, K, *spatial]`` (UNETR's forward); ``features``: the global feature ``[B, D]``."""
        if self.task == "features":
            return self.global_feature(x)
        self.check_input_size(x)
        return super().forward(x)


__all__ = ["MONAI_MAE_DECODER", "MonaiUNETR", "MonaiViT", "monai_mae_decoder_geometry"]
