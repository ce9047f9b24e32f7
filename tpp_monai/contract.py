"""The contract between backbones and the PEFT methods that tune them (and the pretexts that pre-train them).

Both ``tpp_monai.backbones`` and ``tpp_monai.peft`` import this module, and neither imports the other for it.

**What a backbone exposes.** A backbone family (a class, or an adapter around a MONAI or timm network) states once:

* ``HOOKS``: a class attribute, the set of hook points and pretext inputs it provides (the strings below). Which
  slot methods and which pretexts apply to a backbone is read from it alone, before anything is built.
* ``interface()``: a :class:`BackboneInterface` with its geometry: layout (tokens or feature maps), spatial dims,
  width, input channels, patch size, where each block site sits in blocks it does not own, and the module names a
  wrapping method targets by default.
* the model API every workflow uses: ``family``, ``backbone_name``, ``head_parameter_names()``,
  ``unused_parameter_names()``, ``encoder_blocks()`` and ``block_widths()`` (the blocks methods tune, in order, and
  their token or channel widths), and for the pretexts, by the inputs it declares:

  * ``feature:global``: ``global_features(x)`` (pooled ``[B, C_l]`` levels, the global feature first),
    ``global_feature(x)`` (level 0 alone, may be cheaper) and ``global_feature_dims()``: DINO;
  * ``tokens:drop``: ``forward_features(x, keep_idx=..., with_prefix=True)`` runs the encoder on the kept patches
    only (``.tokens``: ``[B, P + n, D]``, prefix tokens first): MAE;
  * ``feature:dense``: ``dense_features(x)``, a ``[B, C, *grid]`` map at the stride ``interface().patch_size``:
    masked-image modelling.

**How a method attaches** (``MethodSpec.attach``):

* ``"slot"``: the method puts its modules into hook slots. Block sites (``site:<name>``) transform an intermediate
  tensor, ``module(out, inp) -> out``; a backbone's own blocks run them in their forward (``block.peft_sites``), and a
  block it does not own gets them through a forward hook on the submodule that ``interface().site_modules`` names
  (:func:`attach_site`). Residual deltas (``delta:attn|mlp``), tokenizer sites (``embed:patch|embed``), encoder hooks
  (``encoder``: prompts, side networks) and STU-Net's block sites (``conv:<name>``) exist on the project's own
  backbones only.
* ``"wrap"``: the method replaces modules by wrapped ones (every huggingface peft tuner); it needs no hook point,
  only layers its library can wrap.
* ``"select"``: the method adds nothing and selects existing tensors (BitFit's biases, the baselines).

Every module a method adds through a slot lives in a container whose name starts with ``peft``
(:func:`is_peft_parameter`); wrapping methods name their own parameters (peft: its tuner's prefix, e.g. ``lora_``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor, nn

from tpp_monai.errors import ConfigError

ATTACH_MODES = ("slot", "wrap", "select")
LAYOUTS = ("tokens", "feature_maps")
BLOCK_SITES = ("norm1", "qkv", "attn_out", "norm2", "fc1", "fc2")
PEFT_CONTAINER = "peft"


def site(name: str) -> str:
    """The hook point of block site ``name`` (``site:qkv``)."""
    if name not in BLOCK_SITES:
        raise ConfigError(f"unknown block site {name!r}; valid: {', '.join(BLOCK_SITES)}")
    return f"site:{name}"


#: Pretext inputs (see the module docstring).
GLOBAL_FEATURE, DROPS_TOKENS, DENSE_FEATURE = "feature:global", "tokens:drop", "feature:dense"
#: Hook points of a pre-LN transformer block the backbone owns (``tpp_monai.backbones.vit.ViTBlockBase``).
VIT_BLOCK_HOOKS = frozenset({*(site(s) for s in BLOCK_SITES), "delta:attn", "delta:mlp"})
#: Hook points of the project's own ViT encoders: block sites and deltas, tokenizer sites, encoder hooks.
VIT_HOOKS = VIT_BLOCK_HOOKS | {"embed:patch", "embed:embed", "encoder"}


def is_peft_parameter(name: str) -> bool:
    """A parameter a slot method added: it lives in a container whose name starts with ``peft``."""
    return any(part.startswith(PEFT_CONTAINER) for part in name.split("."))


@dataclass(frozen=True)
class BackboneInterface:
    """What a backbone exposes to the methods and pretexts.

    Args:
        family: the backbone family (``medcoss``, ``timm_vit``, ``stunet``...).
        layout: ``"tokens"`` (``[B, N, D]`` sequences) or ``"feature_maps"`` (``[B, C, *spatial]``).
        spatial_dims: 2 or 3.
        width: token width, or channels of the global feature.
        in_channels: image channels.
        patch_size: the patch (tokens) or the stride of ``dense_features`` (feature maps), per spatial axis.
        site_modules: for blocks the backbone does not own, the submodule (path inside a block) whose input and
            output are a block site's ``inp`` and ``out``; empty where the blocks run their sites themselves.
        wrap_targets: the module names (suffixes) of the tunable layers per role, for wrapping methods, e.g.
            ``{"attention": ("qkv",), "attention_out": ("proj",), "mlp": ("fc1", "fc2")}``.
    """

    family: str
    layout: str
    spatial_dims: int
    width: int
    in_channels: int
    patch_size: tuple[int, ...]
    site_modules: Mapping[str, str] = field(default_factory=dict)
    wrap_targets: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout {self.layout!r} unknown; valid: {', '.join(LAYOUTS)}")
        if self.spatial_dims not in (2, 3) or len(self.patch_size) != self.spatial_dims:
            raise ValueError(f"spatial_dims {self.spatial_dims} with patch_size {self.patch_size}")
        bad = set(self.site_modules) - set(BLOCK_SITES)
        if bad:
            raise ValueError(f"site_modules names unknown sites {sorted(bad)}; valid: {', '.join(BLOCK_SITES)}")


def hooks_of(backbone: nn.Module | type) -> frozenset[str]:
    """The hook points a backbone (instance or family class) provides."""
    return frozenset(getattr(backbone, "HOOKS", frozenset()))


def missing_hooks(required: frozenset[str] | set[str], backbone: nn.Module | type) -> list[str]:
    """The hook points of ``required`` that ``backbone`` lacks, sorted (empty: the method applies)."""
    return sorted(set(required) - hooks_of(backbone))


def require_hooks(required: frozenset[str] | set[str], model: nn.Module, method: str) -> None:
    """Raise a :class:`ConfigError` naming the hook points ``method`` needs and ``model`` lacks."""
    missing = missing_hooks(required, model)
    if missing:
        name = getattr(model, "backbone_name", "") or type(model).__name__
        raise ConfigError(
            f"PEFT method {method!r} needs the hook point(s) {missing}, which the {model.family} backbone {name!r} "
            f"does not provide (it provides: {', '.join(sorted(hooks_of(model))) or 'none'}); choose a method that "
            "applies to it (python -m tpp_monai params --backbone NAME lists them)"
        )


class _SiteHook:
    """Forward hook running a block site's module on a submodule's output: ``sites[name](out, inp)``.

    A class, not a closure, so that ``copy.deepcopy`` of a model (the DINO teacher) gives the copy's hook the copy's
    site modules: deepcopy copies this object's attributes through its memo, a closure's cells it would share.
    """

    def __init__(self, sites: nn.ModuleDict, name: str) -> None:
        self.sites, self.name = sites, name

    def __call__(self, module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        return self.sites[self.name](out, args[0])


def attach_site(model: nn.Module, block: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at block site ``name`` of ``block``: ``out <- module(out, inp)``.

    Blocks the backbone owns run ``block.peft_sites`` themselves; for other blocks the interface names the submodule
    whose output the site transforms, and a forward hook on it runs the module. Either way the module is registered
    under ``<block>.peft_sites.<name>``, so its parameters are target parameters and its checkpoint keys are stable.
    """
    require_hooks({site(name)}, model, f"(block site {name})")
    path = model.interface().site_modules.get(name)
    if not hasattr(block, "peft_sites"):
        block.peft_sites = nn.ModuleDict()
    if name in block.peft_sites:
        raise ConfigError(f"block site {name!r} already holds a module; one method per model")
    block.peft_sites[name] = module
    if path is not None:
        block.get_submodule(path).register_forward_hook(_SiteHook(block.peft_sites, name))
