"""MONAI's SwinUNETR (Hatamizadeh et al. 2022) as a backbone: the Swin transformer encoder ``swinViT`` is the frozen
backbone, SwinUNETR's own convolutional decoder is the segmentation head; 3D, and 2D (``spatial_dims=2``).

:class:`SwinUNETRBackbone` *is* a ``monai.networks.nets.SwinUNETR`` (its forward for segmentation, its parameter
names), with the model API of :mod:`tpp_monai.contract` added. Checkpoint layouts it loads (read from MONAI 1.6.1
``monai/networks/nets/swin_unetr.py``, model-zoo ``models/swin_unetr_btcv_segmentation/configs/train.json`` and
research-contributions ``SwinUNETR/BTCV/main.py``, ``SwinUNETR/Pretrain/{main.py,models/ssl_head.py}``):

* **model zoo ``swin_unetr_btcv_segmentation`` ``models/model.pt``**: a SwinUNETR state dict (``swinViT.*``, then the
  decoder ``encoder1``-``encoder4``, ``encoder10``, ``decoder1``-``decoder5``, ``out``), feature size 48, 1 input and
  14 output channels, ``use_v2`` off. The bundle's ``CheckpointSaver`` saves ``{"model": network}``; ignite writes a
  single object's state dict flat (DDP unwrapped), and MONAI's ``CheckpointLoader`` reads flat or ``{"model": ...}``:
  both load here, as do ``{"state_dict": ...}`` files (research-contributions fine-tuning runs) and ``module.`` keys.
  The decoder is reported unused (a fresh task head is trained, as for every backbone).
* **self-supervised encoder ``model_swinvit.pt``** (Tang et al. 2022): ``{"state_dict": {...}}`` with keys as
  ``SwinUNETR.load_from`` reads them: ``module.patch_embed.proj.*``, ``module.layers{1..4}.0.blocks.{i}.{norm1,
  attn.relative_position_bias_table, attn.relative_position_index, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.*``,
  ``module.layers{1..4}.0.downsample.{reduction.weight, norm.*}``, plus a final ``module.norm.*`` that SwinUNETR has no
  place for (research-contributions issue #150). They map onto ``swinViT.*`` with ``mlp.fc1/fc2`` ->
  ``mlp.linear1/linear2``; ``norm.*`` is reported unused. The same holds for keys under ``swin_vit.`` (older
  pre-training runs) and for the pre-training ``SSLHead`` state dict (``swinViT.*`` plus its rotation, contrastive and
  reconstruction heads, reported unused).

Hook points: the six block sites of every ``SwinTransformerBlock`` (``attn.qkv`` is the fused q/k/v projection, so
the built-in LoRA applies; widths double per stage, see :meth:`SwinUNETRBackbone.block_widths`), the global feature
(the pooled deepest stage, for DINO) and the dense feature map (the deepest stage at stride ``patch_size * 16``, for
masked-image modelling). Swin windows cannot run on a subset of tokens, so MAE's token dropping does not apply.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

from monai.networks.nets import SwinUNETR
from torch import Tensor, nn

from tpp_monai.backbones.foreign import BLOCK_SITE_HOOKS, HEAD_REASON, ForeignBackbone, segmentation_outputs
from tpp_monai.contract import DENSE_FEATURE, GLOBAL_FEATURE, BackboneInterface
from tpp_monai.errors import ConfigError

DECODER = (
    "encoder1", "encoder2", "encoder3", "encoder4", "encoder10",
    "decoder5", "decoder4", "decoder3", "decoder2", "decoder1", "out",
)  # fmt: skip
_STAGES = ("layers1", "layers2", "layers3", "layers4")


class SwinUNETRBackbone(ForeignBackbone, SwinUNETR):
    """SwinUNETR with the backbone contract.

    Args:
        in_channels: image channels.
        out_channels, num_classes: segmentation outputs (``num_classes`` incl. background when given).
        task: ``"seg"`` (the whole SwinUNETR; the decoder is the head) or ``"features"`` (the encoder alone: the TPP
            stage; the same parameter names, so target parameters move between the two).
        feature_size, depths, num_heads, window_size, patch_size, spatial_dims, use_v2, dropout_path_rate,
        use_checkpoint: SwinUNETR's arguments (the model zoo's BTCV model: 48, (2, 2, 2, 2), (3, 6, 12, 24), 7, 2,
            3, False); ``swin_options`` passes any other (``norm_name``, ``drop_rate``, ``downsample``...).
    """

    family = "swinunetr"
    TASKS = ("seg", "features")
    HOOKS = BLOCK_SITE_HOOKS | {GLOBAL_FEATURE, DENSE_FEATURE}
    SITE_MODULES: ClassVar[dict[str, str]] = {
        "norm1": "norm1", "qkv": "attn.qkv", "attn_out": "attn.proj", "norm2": "norm2", "fc1": "mlp.linear1",
        "fc2": "mlp.linear2",
    }  # fmt: skip
    WRAP_TARGETS: ClassVar[dict[str, tuple[str, ...]]] = {
        "attention": ("attn.qkv",),
        "attention_out": ("attn.proj",),
        "mlp": ("mlp.linear1", "mlp.linear2"),
    }
    HEAD_MODULES: ClassVar[dict[str, tuple[str, ...]]] = {"seg": DECODER, "features": ()}
    CHECKPOINT_UNUSED: ClassVar[dict[str, tuple[str, ...]]] = {
        f"SwinUNETR decoder: {HEAD_REASON}": tuple(m + "." for m in DECODER),
        "final LayerNorm of the self-supervised encoder (SwinUNETR normalises its stage outputs without parameters)": (
            "norm.",
        ),
        "self-supervised pre-training heads (rotation, contrastive, reconstruction)": (
            "rotation_head.", "contrastive_head.", "conv.",
        ),
    }  # fmt: skip
    BUILDS_ON_META = False  # SwinTransformer reads its drop-path rates with .item()

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        num_classes: int = 0,
        task: str = "seg",
        feature_size: int = 48,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int | Sequence[int] = 7,
        patch_size: int = 2,
        spatial_dims: int = 3,
        use_v2: bool = False,
        dropout_path_rate: float = 0.0,
        use_checkpoint: bool = False,
        **swin_options: object,
    ) -> None:
        task = self.check_task(task)
        if swin_options.get("use_hyena") or swin_options.get("hyena_stages"):
            raise ConfigError("swinunetr declares its hook points for Swin attention blocks; HyenaND stages have none")
        if len(tuple(depths)) != len(_STAGES):
            raise ConfigError(f"SwinUNETR has 4 stages; depths must hold 4 ints, got {list(depths)}")
        outputs = segmentation_outputs(num_classes, out_channels) if task == "seg" else 1
        try:
            super().__init__(
                in_channels=int(in_channels), out_channels=outputs, feature_size=int(feature_size), depths=depths,
                num_heads=num_heads, window_size=window_size, patch_size=int(patch_size),
                spatial_dims=int(spatial_dims), use_v2=bool(use_v2), dropout_path_rate=float(dropout_path_rate),
                use_checkpoint=bool(use_checkpoint), **swin_options,
            )  # fmt: skip
        except (TypeError, ValueError) as err:
            raise ConfigError(f"invalid SwinUNETR options: {err}") from None
        self.task = task
        # embed_dim: the width of the deepest stage, the global feature (768 for feature size 48, as ViT-B/16's
        # tokens): the width methods size their defaults by (an adapter's bottleneck: embed_dim // 10 = 76)
        self.in_chans, self.spatial_dims = int(in_channels), int(spatial_dims)
        self.embed_dim = int(feature_size) * 2 ** len(_STAGES)
        self.feature_size = int(feature_size)
        self.depth = sum(int(d) for d in depths)
        if task == "features":  # the encoder alone; the decoder is the segmentation head
            for name in DECODER:
                delattr(self, name)

    # ----- the backbone contract ------------------------------------------------------------------------------------
    @property
    def stride(self) -> int:
        """The stride of the deepest stage: the patch embedding, then four 2x patch mergings."""
        return self.patch_size * 2**4

    def interface(self) -> BackboneInterface:
        return BackboneInterface(
            family=self.family, layout="feature_maps", spatial_dims=self.spatial_dims,
            width=self.global_feature_dims()[0], in_channels=self.in_chans,
            patch_size=(self.stride,) * self.spatial_dims, site_modules=dict(self.SITE_MODULES),
            wrap_targets=dict(self.WRAP_TARGETS),
        )  # fmt: skip

    def encoder_blocks(self) -> list[nn.Module]:
        """Every ``SwinTransformerBlock``, stage 1 to 4."""
        return [block for stage in _STAGES for block in getattr(self.swinViT, stage)[0].blocks]

    def block_widths(self) -> list[int]:
        """``feature_size * 2**stage`` per block (48, 96, 192, 384 for the BTCV model)."""
        return [int(block.dim) for block in self.encoder_blocks()]

    def global_feature_dims(self) -> list[int]:
        return [self.embed_dim]

    def global_features(self, x: Tensor) -> list[Tensor]:
        """The deepest stage's features, averaged over space: ``[B, 16 * feature_size]``."""
        return [self.dense_features(x).flatten(2).mean(dim=2)]

    def dense_features(self, x: Tensor) -> Tensor:
        """The deepest stage, as SwinUNETR's decoder reads it (layer-normalised): ``[B, 16 * feature_size, *grid]``
        with ``grid = input / (patch_size * 16)``."""
        return self.stage_outputs(x)[-1]

    def stage_outputs(self, x: Tensor) -> list[Tensor]:
        """The five feature maps of ``swinViT`` (patch embedding, then the four stages)."""
        self.check_input_size(x)
        return self.swinViT(x.contiguous(), self.normalize)

    def check_input_size(self, x: Tensor | Sequence[int], task: str | None = None) -> None:
        """Raise a :class:`ConfigError` unless ``x`` is ``[B, in_channels, *spatial]`` (or the spatial size alone)
        with every spatial axis a multiple of ``patch_size ** 5`` (SwinUNETR's rule) and, for segmentation (``task``,
        default the model's), more than one voxel at the deepest stage (the decoder's instance norm)."""
        if isinstance(x, Tensor):
            want = self.spatial_dims + 2
            if x.ndim != want or x.shape[1] != self.in_chans:
                raise ConfigError(
                    f"SwinUNETR expects [B, {self.in_chans}, {', '.join('DHW'[-self.spatial_dims :])}] inputs, "
                    f"got shape {tuple(x.shape)}"
                )
            x = x.shape[2:]
        spatial = tuple(int(s) for s in x)
        if len(spatial) != self.spatial_dims:
            raise ConfigError(f"SwinUNETR ({self.spatial_dims}D) needs {self.spatial_dims} sizes, got {list(spatial)}")
        multiple = self.patch_size**5
        if any(s % multiple for s in spatial):
            fixed = [max(multiple, math.ceil(s / multiple) * multiple) for s in spatial]
            raise ConfigError(
                f"SwinUNETR input of spatial size {spatial}: every axis must be a multiple of {multiple} "
                f"(patch_size ** 5); use a patch/ROI size such as {fixed}"
            )
        if (task or self.task) == "seg" and math.prod(s // multiple for s in spatial) < 2:
            raise ConfigError(
                f"SwinUNETR input of spatial size {spatial} leaves one voxel at the deepest stage, where the decoder's "
                f"instance norm needs more than one: double the patch/ROI along an axis (multiples of {multiple})"
            )

    # ----- checkpoints ------------------------------------------------------------------------------------------------
    def translate_checkpoint(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """The encoder-only layouts (``model_swinvit.pt``, ``swin_vit.`` keys) onto ``swinViT.*``."""
        if any(k.startswith("swinViT.") for k in state):
            return dict(state)  # SwinUNETR itself, or the pre-training SSLHead
        out = {}
        for key, value in state.items():
            key = key.removeprefix("swin_vit.")
            if key.startswith(("patch_embed.", "layers")):
                key = "swinViT." + key.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")
            out[key] = value
        return out

    # ----- forward ----------------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """``seg``: logits ``[B, K, *spatial]`` (SwinUNETR's forward); ``features``: the global feature ``[B, C]``."""
        if self.task == "features":
            return self.global_feature(x)
        self.check_input_size(x)
        return super().forward(x)
