"""The tuners of the installed huggingface peft as :mod:`tpp_monai.peft.hf` offers them: the catalogue (which tuners
wrap layers, and why the others are left out), each tuner's options (its config fields) and its default targets on a
backbone. Module docstring of :mod:`tpp_monai.peft.hf`: the rules."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from tpp_monai.compat import import_peft
from tpp_monai.errors import ConfigError, unknown_choice

PREFIX = "peft"
ADAPTER = "default"
PEFT_MODEL_ATTR = "hf_peft_model"
#: name -> (peft tuner, config values it fixes)
ALIASES = {"dora": ("lora", {"use_dora": True})}
#: config fields that are not method options: peft's bookkeeping, and ``modules_to_save`` (the workflows train the
#: task head themselves and save what they train)
RESERVED = ("task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
            "inference_mode", "modules_to_save")  # fmt: skip
#: tuners of peft that do not wrap a vision backbone's layers, and why
NOT_WRAPPING = {
    "adaption_prompt": "it adds learned prompts to the attention modules of a transformers LLaMA-style language model",
    "xlora": "it mixes LoRA adapters by a transformers language model's hidden states",
    "trainable_tokens": "it trains selected rows of a language model's token embedding",
    "poly": "it routes between adapters by task ids that every forward call must be given (multi-task training)",
    "shadow": "it runs a shadow network along the decoder loop of a transformers decoder-only language model",
    "adalora": "it reallocates its ranks through update_and_allocate(step), which the training loop must call after "
    "every optimizer step and the workflows' trainers do not",
}
#: roles of ``interface().wrap_targets`` the default targets take, in this order
ROLES = ("attention", "attention_out", "mlp", "conv")
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
#: LoRA initialisations that need the downstream data after the network is built (:func:`initialize_from_data`)
DATA_INITS = ("eva", "corda")
#: LoRA initialisations computed from the frozen weights when peft injects
WEIGHT_INITS = ("pissa", "olora")


class _Unset:
    """A method option left at peft's default."""

    def __repr__(self) -> str:
        return "<peft default>"

    def __deepcopy__(self, memo: dict) -> _Unset:
        return self

    def __reduce__(self) -> str:
        return "UNSET"


UNSET = _Unset()


@contextlib.contextmanager
def quiet() -> Iterable[None]:
    """peft warns about language-model conventions (no ``config`` attribute, tied weights) that do not apply here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def first_line(err: BaseException) -> str:
    """An error as one short line: its type and the first line of its message."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300].rstrip('.')}" if text else type(err).__name__


# ----- the tuners of the installed peft ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Tuner:
    """One tuner: its method name (without ``peft.``), peft type, config class, parameter prefix, fixed values."""

    name: str
    peft_type: str
    config_cls: type
    prefix: str
    fixed: Mapping[str, Any]

    @property
    def method(self) -> str:
        return f"{PREFIX}.{self.name}"


@functools.cache
def _catalogue() -> tuple[dict[str, Tuner], dict[str, str]]:
    """(wrapping tuners by name, excluded tuners -> reason), read from the installed peft."""
    peft = import_peft()
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING

    tuners, excluded = {}, {}
    for peft_type, config_cls in PEFT_TYPE_TO_CONFIG_MAPPING.items():
        name = str(peft_type.value).lower()
        fields = {f.name for f in dataclasses.fields(config_cls)}
        if issubclass(config_cls, peft.PromptLearningConfig):
            excluded[name] = "a prompt-learning tuner: it learns virtual tokens of a language model's input embedding"
        elif name in NOT_WRAPPING:
            excluded[name] = NOT_WRAPPING[name]
        elif "target_modules" not in fields:
            excluded[name] = "its config has no target_modules: it does not wrap layers by name"
        else:
            prefix = PEFT_TYPE_TO_PREFIX_MAPPING.get(peft_type)
            if not prefix:
                excluded[name] = "peft names no parameter prefix for it, so its parameters cannot be told apart"
                continue
            tuners[name] = Tuner(name, str(peft_type.value), config_cls, prefix, {})
    for alias, (base, fixed) in ALIASES.items():
        if base in tuners:
            tuners[alias] = dataclasses.replace(tuners[base], name=alias, fixed=dict(fixed))
    return dict(sorted(tuners.items())), dict(sorted(excluded.items()))


def tuner_names() -> list[str]:
    """The tuners this source offers (without ``peft.``), sorted."""
    return list(_catalogue()[0])


def excluded() -> dict[str, str]:
    """The installed peft's tuners this source leaves out, with the reason."""
    return dict(_catalogue()[1])


def get_tuner(name: str) -> Tuner:
    tuners, left_out = _catalogue()
    if name in tuners:
        return tuners[name]
    if name in left_out:
        raise ConfigError(f"PEFT method 'peft.{name}' is not offered: {left_out[name]}; peft tuners that wrap "
                          f"layers: {', '.join('peft.' + n for n in tuners)}")  # fmt: skip
    raise unknown_choice("peft tuner", f"peft.{name}", [f"peft.{n}" for n in tuners], "method")


# ----- options ---------------------------------------------------------------------------------------------------
def _settable_fields(tuner: Tuner) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(tuner.config_cls) if f.name not in RESERVED and f.name not in tuner.fixed]


def options_dict(options: object) -> dict:
    """The options set on an options object (peft's defaults left out), as plain values."""
    out = {}
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if value is not UNSET:
            out[f.name] = list(value) if isinstance(value, (tuple, set)) else value
    return out


def _nested(tuner: Tuner, values: Mapping) -> dict:
    """Options with dict values for config-typed fields (``eva_config``...) turned into peft's config objects."""
    peft = import_peft()
    types = {f.name: str(f.type) for f in dataclasses.fields(tuner.config_cls)}
    out = dict(values)
    for key, value in values.items():
        match = re.search(r"(\w+Config)\b", types.get(key, ""))
        cls = getattr(peft, match.group(1), None) if match else None
        if isinstance(value, Mapping) and dataclasses.is_dataclass(cls):
            out[key] = cls(**value)
    return out


def peft_config(tuner: Tuner, options: Mapping) -> object:
    """peft's config object of ``tuner`` with ``options`` (and the values the tuner fixes, e.g. DoRA's)."""
    with quiet():
        return tuner.config_cls(**_nested(tuner, {**options, **tuner.fixed}))


def options_class(tuner: Tuner) -> type:
    """A frozen dataclass of the tuner's options (every settable config field, default: peft's); constructing it
    checks the values by building peft's config (with placeholder targets when none are given)."""

    def check(self: object) -> None:
        values = options_dict(self)
        values.setdefault("target_modules", ["-"])
        if "feedforward_modules" in {f.name for f in dataclasses.fields(self)}:
            values.setdefault("feedforward_modules", [])
        try:
            peft_config(tuner, values)
        except (TypeError, ValueError, KeyError) as err:
            raise ValueError(str(err).splitlines()[0] if str(err) else type(err).__name__) from None

    fields = [(f.name, Any, dataclasses.field(default=UNSET)) for f in _settable_fields(tuner)]
    doc = (f"Options of peft.{tuner.name}: the fields of peft's {tuner.config_cls.__name__} "
           f"({', '.join(f[0] for f in fields)}); unset ones keep peft's defaults.")  # fmt: skip
    cls_name = "Peft" + "".join(p.capitalize() for p in tuner.name.split("_")) + "Options"
    return dataclasses.make_dataclass(cls_name, fields, frozen=True, namespace={"__post_init__": check, "__doc__": doc})


# ----- targets -----------------------------------------------------------------------------------------------------
def _block_names(model: nn.Module) -> list[str]:
    """Qualified names of the backbone's encoder blocks, in order."""
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(b)] for b in model.encoder_blocks() if id(b) in names]


def default_targets(tuner: Tuner, model: nn.Module) -> dict[str, list[str]]:
    """The documented default ``target_modules`` (and IA3's ``feedforward_modules``) of ``tuner`` on ``model``."""
    blocks = [(name, model.get_submodule(name)) for name in _block_names(model)]
    if tuner.name == "ln_tuning":
        suffixes = list(dict.fromkeys(n for _, b in blocks for n, m in b.named_modules() if isinstance(m, NORMS)))
        ff: list[str] = []
    else:
        wrap = model.interface().wrap_targets
        suffixes = [s for role in ROLES for s in wrap.get(role, ())]
        ff = list(wrap.get("mlp", ()))

    def full(names: list[str]) -> list[str]:
        return [f"{b}.{s}" for b, block in blocks for s in names if _has_submodule(block, s)]

    out = {"target_modules": full(suffixes)}
    if "feedforward_modules" in {f.name for f in dataclasses.fields(tuner.config_cls)}:
        out["feedforward_modules"] = full(ff)
    return out


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def is_target(prefix: str, name: str) -> bool:
    """A tensor of the tuner: a component of its name starts with the tuner's prefix (``lora_A``, ``ia3_l``...)."""
    return any(part.startswith(prefix) for part in name.split("."))


def wrapped_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers peft replaced, by name (outermost wrapper only)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and not any(name.startswith(f"{n}.") for n in found):
            found[name] = module
    return found


def lora_init(options: Mapping) -> str | None:
    """``eva``, ``corda``, ``pissa`` or ``olora`` when the options ask for that LoRA initialisation, else ``None``."""
    init = options.get("init_lora_weights")
    if not isinstance(init, str):
        return None
    base = "pissa" if init.startswith("pissa") else init
    return base if base in (*DATA_INITS, *WEIGHT_INITS) else None


def peft_model(model: nn.Module) -> object:
    pm = model.__dict__.get(PEFT_MODEL_ATTR)
    if pm is None:
        raise ConfigError(f"the model has no huggingface peft tuner (method {getattr(model, 'peft_method', None)!r})")
    return pm
