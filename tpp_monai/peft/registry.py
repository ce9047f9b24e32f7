"""The PEFT method registry: one entry per method, selected by name from a bundle's JSON.

A method is a dataclass of options plus an ``inject`` function that adds its modules to a backbone, and a
``target`` rule that says which parameters are its target parameters. That rule is the only place the question is
answered; ``requires_grad``, the optimizer's parameters, the TPP checkpoint, the DINO teacher's EMA, the finetune
loader and the parameter counts all call :func:`target_parameter_names`.

Methods come from two kinds of source, in one registry: the built-in methods register themselves by name
(``adapter``, ``lora``...), and a *method source* answers for every name under its prefix (``peft.<tuner>``: the
tuners of the installed huggingface peft, :mod:`tpp_monai.peft.hf`), resolved on first use. How a method attaches
and which hook points it needs are declared in its spec (:mod:`tpp_monai.contract`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from tpp_monai.contract import ATTACH_MODES, VIT_HOOKS, is_peft_parameter
from tpp_monai.errors import ConfigError, unknown_choice


@dataclass(frozen=True)
class NoOptions:
    """The options of a method that has none (the baselines, BitFit)."""


@dataclass(frozen=True)
class MethodSpec:
    """A registered PEFT method.

    Args:
        name: registry name.
        config: dataclass type of the method's options (defaults = the paper's configuration).
        inject: ``inject(model, config)`` adds the method's modules to the model.
        target: ``target(model, name) -> bool``: is this parameter a target parameter?
        attach: ``"slot"``, ``"wrap"`` or ``"select"`` (:mod:`tpp_monai.contract`).
        requires: ``requires(config) -> hook points`` the method needs with these options (slot methods).
        identity_at_init: the method leaves the backbone's outputs unchanged until trained.
        pretrainable: TPP applies (the method adds or selects target parameters); False for the baselines.
        summary: one line for ``--help`` and docs.
        applies: ``applies(backbone_name, options) -> reason or None`` for methods whose applicability the hook
            points do not decide (wrapping methods: whether their library can wrap the backbone's layers).
        config_dict: the resolved options as plain values (default: the dataclass fields).
    """

    name: str
    config: type
    inject: Callable[[nn.Module, object], object]
    target: Callable[[nn.Module, str], bool]
    attach: str
    requires: Callable[[object], frozenset[str]]
    identity_at_init: bool
    pretrainable: bool
    summary: str
    applies: Callable[[str, dict], str | None] | None = None
    config_dict: Callable[[object], dict] | None = None

    def __post_init__(self) -> None:
        if self.attach not in ATTACH_MODES:
            raise ValueError(f"method {self.name!r}: attach {self.attach!r} unknown; valid: {', '.join(ATTACH_MODES)}")

    def hooks(self, config: object | None = None) -> frozenset[str]:
        """The hook points the method needs (with ``config``, or its defaults)."""
        return frozenset(self.requires(self.config() if config is None else config))


METHODS: dict[str, MethodSpec] = {}


@dataclass(frozen=True)
class MethodSource:
    """Methods named ``<prefix>.<name>``, resolved on first use.

    Args:
        prefix: the part before the dot (``peft``).
        resolve: ``resolve(name) -> MethodSpec`` for the part after it; raises a :class:`ConfigError` naming the
            valid names when it has no such method.
        names: ``names() -> list`` of the names it resolves (for listings and messages).
        summary: one line on where the methods come from.
    """

    prefix: str
    resolve: Callable[[str], MethodSpec]
    names: Callable[[], list[str]]
    summary: str


SOURCES: dict[str, MethodSource] = {}
_RESOLVED: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in METHODS or "." in spec.name:
        raise ValueError(f"PEFT method {spec.name!r} registered twice, or with a dot (dots name a method source)")
    METHODS[spec.name] = spec
    return spec


def register_source(source: MethodSource) -> MethodSource:
    if source.prefix in SOURCES or source.prefix in METHODS:
        raise ValueError(f"method source {source.prefix!r} registered twice")
    SOURCES[source.prefix] = source
    return source


def register_added(
    name: str,
    config: type,
    inject: Callable[[nn.Module, object], object],
    identity_at_init: bool,
    summary: str,
    requires: Callable[[object], frozenset[str]] = lambda cfg: VIT_HOOKS,
) -> MethodSpec:
    """Register a slot method: its targets are exactly the modules it added; ``requires`` names its hook points."""
    return register(MethodSpec(
        name=name, config=config, inject=inject, target=lambda model, param: is_peft_parameter(param), attach="slot",
        requires=requires, identity_at_init=identity_at_init, pretrainable=True, summary=summary,
    ))  # fmt: skip


def get_method(name: str, where: str = "") -> MethodSpec:
    """The method ``name``: a built-in one, or ``<source>.<name>`` from a method source. Unknown names raise a
    :class:`ConfigError` listing the valid ones (the built-in methods and sources register themselves when
    :mod:`tpp_monai.peft` is imported, which importing this module does)."""
    name = str(name)
    if name in METHODS:
        return METHODS[name]
    prefix, dot, rest = name.partition(".")
    if dot and prefix in SOURCES:
        if name not in _RESOLVED:
            _RESOLVED[name] = SOURCES[prefix].resolve(rest)
        return _RESOLVED[name]
    sources = [f"{p}.<name> ({s.summary})" for p, s in SOURCES.items()]
    raise unknown_choice("PEFT method", name, [*METHODS, *sources], where)


def method_names(with_sources: bool = True) -> list[str]:
    """Every method name: the built-in ones, then each source's (``peft.lora``...), sorted within each."""
    names = sorted(METHODS)
    if with_sources:
        for prefix, source in sorted(SOURCES.items()):
            names += [f"{prefix}.{n}" for n in sorted(source.names())]
    return names


def make_config(method: str, options: dict | None = None, where: str = "") -> object:
    """Validate ``options`` against the method's option dataclass; unknown names list the valid options."""
    spec = get_method(method, where)
    options = dict(options or {})
    fields = {f.name for f in dataclasses.fields(spec.config)}
    unknown = sorted(set(options) - fields)
    if unknown:
        valid = ", ".join(sorted(fields)) or "(none)"
        src = f" (from {where})" if where else ""
        raise ConfigError(f"unknown option(s) {unknown} for PEFT method {method!r}{src}; valid options: {valid}")
    try:
        return spec.config(**options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid options {options} for PEFT method {method!r}: {err}") from None


def config_dict(config: object, spec: MethodSpec | None = None) -> dict:
    """The resolved options of a method config as a plain dict (recorded in checkpoints)."""
    if spec is not None and spec.config_dict is not None:
        return spec.config_dict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
