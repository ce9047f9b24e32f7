"""The PEFT method registry: one entry per method, selected by name from a bundle's JSON.

A method is a dataclass of options plus an ``inject`` function that adds its modules to a backbone, and a
``target`` rule that says which parameters are its target parameters. That rule is the only place the question is
answered; ``requires_grad``, the optimizer's parameters, the TPP checkpoint, the DINO teacher's EMA, the finetune
loader and the parameter counts all call :func:`target_parameter_names`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from tpp_monai.errors import ConfigError, unknown_choice


def is_peft_parameter(name: str) -> bool:
    """Parameters added by a method live in containers whose name starts with ``peft`` (see ``backbones/vit.py``)."""
    return any(part.startswith("peft") for part in name.split("."))


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
        families: backbone families the method supports.
        identity_at_init: the method leaves the backbone's outputs unchanged until trained.
        pretrainable: TPP applies (the method adds or selects target parameters); False for the baselines.
        summary: one line for ``--help`` and docs.
    """

    name: str
    config: type
    inject: Callable[[nn.Module, object], None]
    target: Callable[[nn.Module, str], bool]
    families: tuple[str, ...]
    identity_at_init: bool
    pretrainable: bool
    summary: str


METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in METHODS:
        raise ValueError(f"PEFT method {spec.name!r} registered twice")
    METHODS[spec.name] = spec
    return spec


def register_added(
    name: str, config: type, inject: Callable[[nn.Module, object], object], identity_at_init: bool, summary: str
) -> MethodSpec:
    """Register a method that adds new modules to the ViT backbones: its targets are exactly what it added."""
    return register(MethodSpec(
        name=name, config=config, inject=inject, target=lambda model, param: is_peft_parameter(param),
        families=("medcoss", "timm_vit"), identity_at_init=identity_at_init, pretrainable=True, summary=summary,
    ))  # fmt: skip


def get_method(name: str, where: str = "") -> MethodSpec:
    """The registered method ``name``; unknown names raise a :class:`ConfigError` listing the valid ones (the
    built-in methods register themselves when :mod:`tpp_monai.peft` is imported, which importing this module does)."""
    try:
        return METHODS[name]
    except KeyError:
        raise unknown_choice("PEFT method", name, METHODS, where) from None


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


def config_dict(config: object) -> dict:
    """The resolved options of a method config as a plain dict (recorded in checkpoints)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
