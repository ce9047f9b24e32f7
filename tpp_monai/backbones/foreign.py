"""What the backbone families that adopt a library's network share: MONAI's SwinUNETR, UNETR and ViT, timm's ViTs.

Each such family subclasses the library's own class, so its parameter names are the library's and the library's
checkpoints keep their keys, and mixes in :class:`ForeignBackbone`, which gives the model API of
:mod:`tpp_monai.contract` over blocks the project does not own. A family declares, once:

* ``HOOKS``: the block sites (:data:`BLOCK_SITE_HOOKS`) and the pretext inputs it gives;
* ``SITE_MODULES``: where each block site sits in one of its blocks; a slot method's module runs there through a
  forward hook (:func:`tpp_monai.contract.attach_site`);
* ``WRAP_TARGETS``: the module-name suffixes of its tunable layers per role, for wrapping methods (peft tuners);
* ``TASKS`` and ``HEAD_MODULES``: the tasks it builds and, per task, the top-level modules that form the task head
  (always trained in fine-tuning, never target parameters);
* its checkpoint layouts: :meth:`ForeignBackbone.translate_checkpoint` maps a known foreign key layout onto its own
  keys, :meth:`ForeignBackbone.checkpoint_unused` names the entries a checkpoint may hold that the model ignores (by
  reason), :meth:`ForeignBackbone.optional_parameter_names` the parameters older checkpoints lack, and
  :meth:`ForeignBackbone.checkpoint_extras` the entries kept for a pretext (an MAE decoder).

Methods that need hook points only the project's own ViT blocks provide (residual deltas, tokenizer sites, encoder
hooks: AdaptFormer, SSF, VPT, EVP, DTL) do not apply to these families; the block-site methods (adapter, LoRA), the
selecting ones (BitFit, the baselines) and every wrapping method do.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from tpp_monai.contract import BLOCK_SITES, BackboneInterface, site
from tpp_monai.errors import ConfigError

#: The six block sites, reached through forward hooks on the submodules ``SITE_MODULES`` names.
BLOCK_SITE_HOOKS = frozenset(site(s) for s in BLOCK_SITES)
HEAD_REASON = "task head of the checkpoint (a fresh head is trained)"
BUFFER_REASON = "buffers the model computes itself (e.g. the relative position index of window attention)"


def segmentation_outputs(num_classes: int, out_channels: int) -> int:
    """The output channels of a segmentation head: ``num_classes`` (incl. background, the 3D bundles) when given,
    else ``out_channels`` (1 sigmoid channel in the 2D bundles)."""
    num_classes, out_channels = int(num_classes), int(out_channels)
    if num_classes > 0 and out_channels not in (1, num_classes):
        raise ConfigError(
            f"got num_classes={num_classes} and out_channels={out_channels} for a segmentation head; they mean the "
            "same (output channels), pass one of them"
        )
    outputs = num_classes if num_classes > 0 else out_channels
    if outputs < 1:
        raise ConfigError(f"a segmentation head needs at least 1 output channel, got {outputs}")
    return outputs


class ForeignBackbone:
    """Mixin for a backbone family built on a library's network class (put it first in the bases).

    Subclasses set the class attributes below and implement :meth:`interface`, :meth:`encoder_blocks` and the
    pretext inputs their ``HOOKS`` declare; ``self.task`` is set by their constructor.
    """

    family: ClassVar[str] = ""
    backbone_name: str = ""
    peft_method: str | None = None
    HOOKS: ClassVar[frozenset[str]] = frozenset()
    TASKS: ClassVar[tuple[str, ...]] = ()
    SITE_MODULES: ClassVar[dict[str, str]] = {}
    WRAP_TARGETS: ClassVar[dict[str, tuple[str, ...]]] = {}
    HEAD_MODULES: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: reason -> key prefixes of checkpoint entries the model ignores (see :meth:`checkpoint_unused`)
    CHECKPOINT_UNUSED: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: whether the constructor runs under ``torch.device("meta")`` (``params`` counts without allocating weights)
    BUILDS_ON_META: ClassVar[bool] = True
    task: str

    @classmethod
    def check_task(cls, task: str) -> str:
        if task not in cls.TASKS:
            raise ConfigError(
                f"the {cls.family} backbone builds the tasks {', '.join(cls.TASKS)}, not {task!r}"
                + (" (segmentation: a U-Net-style backbone such as unetr or swinunetr)" if task == "seg" else "")
            )
        return task

    # ----- the backbone contract ------------------------------------------------------------------------------------
    def interface(self) -> BackboneInterface:
        raise NotImplementedError

    def encoder_blocks(self) -> list[nn.Module]:
        """The transformer blocks the methods tune, in order."""
        raise NotImplementedError

    def block_widths(self) -> list[int]:
        return [self.interface().width] * len(self.encoder_blocks())

    def head_parameter_names(self) -> list[str]:
        """Parameters of the task head (``HEAD_MODULES`` of the task)."""
        prefixes = tuple(m + "." for m in self.HEAD_MODULES.get(self.task, ()))
        return [n for n, _ in self.named_parameters() if prefixes and n.startswith(prefixes)]

    def unused_parameter_names(self) -> set[str]:
        """Parameters that ``forward`` never touches (they exist for the library's checkpoint layout)."""
        return set()

    def global_feature(self, x: Tensor) -> Tensor:
        """The first level of :meth:`global_features`."""
        return self.global_features(x)[0]

    # ----- checkpoints ------------------------------------------------------------------------------------------------
    def translate_checkpoint(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Map a known foreign key layout onto this model's keys (the identity where the layout is the model's)."""
        return dict(state)

    def optional_parameter_names(self) -> set[str]:
        """Parameters a checkpoint may lack (they stay at their initial values): parameters that ``forward`` never
        uses and that checkpoints of older library versions do not hold."""
        return set()

    def checkpoint_unused(self) -> dict[str, tuple[str, ...]]:
        """Reason -> key prefixes of checkpoint entries the model ignores: ``CHECKPOINT_UNUSED``, the optional
        parameters, and the model's own buffers (computed by the constructor, e.g. a relative position index)."""
        unused = dict(self.CHECKPOINT_UNUSED)
        optional = tuple(sorted(self.optional_parameter_names()))
        if optional:
            unused["parameters forward never uses (absent from older checkpoints)"] = optional
        buffers = tuple(n for n, _ in self.named_buffers())
        if buffers:
            unused[BUFFER_REASON] = buffers
        return unused

    def checkpoint_extras(self) -> tuple[str, ...]:
        """Key prefixes kept for the pretext stage with ``keep_mae_decoder`` (an MAE decoder the checkpoint holds)."""
        return ()
