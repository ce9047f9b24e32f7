"""PEFT methods and the target-parameter rule.

A PEFT method decides which parameters are *target parameters* (TPP paper §3.1): the new parameters it adds, or
for BitFit the biases it selects. :func:`target_parameter_names` applies that rule, and everything else derives from
it: :func:`mark_trainable` (requires_grad and the optimizer's parameters), :func:`target_state` (what the TPP stage
saves: target tensors only, with the method, options and backbone recorded), :func:`load_target_state` (what
fine-tuning loads, refusing another method, options or backbone) and the parameter counts of ``params``. On disk the
target parameters are a folder of safetensors (:mod:`tpp_monai.peft.files`; a peft adapter folder for ``peft.*``).
Frozen backbone in train mode, for every method and both stages: the backbone's DropPath (0.1 in MedCoSS) and
MedCoSS's random temporal position row stay active while the target parameters train, because the framework TPP
follows, MedCoSS fine-tuning, trains its model in train mode with DropPath 0.1, and the official recipes of
AdaptFormer, SSF, EVP and DTL keep their frozen ViT in train mode (DropPath at the rate they configure: SSF 0-0.2,
DTL 0.1). Only official VPT overrides ``train()`` to hold its frozen encoder in eval mode; one rule for all methods
keeps the methods comparable, as the paper's tables compare them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from tpp_monai.backbones import BACKBONES, family_class
from tpp_monai.contract import is_peft_parameter, missing_hooks
from tpp_monai.errors import CheckpointError, ConfigError
from tpp_monai.peft import methods  # noqa: F401  (the built-in methods and sources register themselves)
from tpp_monai.peft.registry import METHODS, MethodSpec, config_dict, get_method, make_config, method_names
from tpp_monai.peft.targets import (
    STAGES,
    TARGET_FORMAT,
    count_parameters,
    mark_trainable,
    method_of,
    target_parameter_names,
    target_state,
    trainable_parameter_names,
)


def why_not_applicable(method: str | MethodSpec, backbone: str, options: Mapping | None = None) -> str | None:
    """Why ``method`` (with ``options``) cannot tune backbone ``backbone``, or ``None`` when it can.

    Slot methods need hook points the backbone family provides (:mod:`tpp_monai.contract`); a method with its own
    check (a wrapping tuner: can its library wrap the backbone's layers?) answers for itself. Nothing is built here
    beyond what that check needs.
    """
    spec = method if isinstance(method, MethodSpec) else get_method(method)
    if spec.attach == "slot":
        config = make_config(spec.name, options) if options else None
        missing = missing_hooks(spec.hooks(config), family_class(backbone))
        if missing:
            return f"it needs the hook point(s) {missing}, which backbone {backbone!r} does not provide"
    if spec.applies is not None:
        return spec.applies(backbone, dict(options or {}))
    return None


def applicable_methods(backbone: str, with_sources: bool = False) -> list[str]:
    """The methods that can tune ``backbone`` with their default options (``with_sources``: peft tuners too)."""
    return [m for m in method_names(with_sources) if why_not_applicable(m, backbone) is None]


def apply_peft(model: nn.Module, method: str, options: Mapping | None = None, where: str = "") -> nn.Module:
    """Inject ``method`` (with ``options`` overriding its defaults) into ``model`` and record what was applied."""
    spec = get_method(method, where)
    if getattr(model, "peft_method", None) is not None:
        raise ConfigError(f"the model already has PEFT method {model.peft_method!r}; build a fresh model")
    config = make_config(method, options, where)
    if spec.attach == "slot":
        missing = missing_hooks(spec.hooks(config), model)
        if missing:
            backbone = getattr(model, "backbone_name", "") or type(model).__name__
            valid = ", ".join(applicable_methods(backbone)) if backbone in BACKBONES else "(see params)"
            raise ConfigError(
                f"PEFT method {method!r} needs the hook point(s) {missing}, which the {model.family} backbone "
                f"{backbone!r} does not provide; methods that apply to it: {valid}"
            )
    resolved = spec.inject(model, config)
    model.peft_method = method
    model.peft_options = config_dict(resolved, spec)
    return model


def load_target_state(model: nn.Module, source: Mapping | str | Path, where: str = "") -> list[str]:
    """Copy target parameters into ``model``: saved by :func:`target_state` (a dict), or a target folder or file
    (:mod:`tpp_monai.peft.files`: the TPP stage's folder, a peft adapter folder it wrote, an older ``.pt`` file).

    Refused with a :class:`CheckpointError` when the file was written for another PEFT method, other options or
    another backbone, or when its tensors do not match the model's target parameters. Returns the loaded names.
    """
    layout = "tpp_monai"
    if not isinstance(source, Mapping):
        from tpp_monai.peft.files import read_record

        where = where or str(source)
        source = read_record(source)
        layout = source["layout"]
    where = where or "<memory>"
    if source.get("format") != TARGET_FORMAT:
        raise CheckpointError(f"{where} is not a target-parameter file (format {source.get('format')!r})")
    expected = {
        "method": model.peft_method,
        "options": dict(model.peft_options),
        "backbone": getattr(model, "backbone_name", None),
    }
    for key, value in expected.items():
        if _normalise(source.get(key)) != _normalise(value):
            raise CheckpointError(
                f"target parameters in {where} were written for {key} {source.get(key)!r}, but this model has "
                f"{value!r}; pre-train the target parameters with the same method, options and backbone, "
                "or fine-tune without them (tpp_ckpt none)"
            )
    state: Mapping[str, Tensor] = source["state"]
    if layout == "peft":
        from tpp_monai.peft.files import load_adapter_tensors

        return load_adapter_tensors(model, state, where)
    names = target_parameter_names(model)
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in state]
    unexpected = [n for n in state if n not in params or n not in set(names)]
    bad = [n for n in names if n in state and state[n].shape != params[n].shape]
    if missing or unexpected or bad:
        raise CheckpointError(
            f"target parameters in {where} do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatches {bad[:5]}"
        )
    with torch.no_grad():
        for n in names:
            params[n].copy_(state[n])
    return names


def _normalise(value: object) -> object:
    if isinstance(value, Mapping):
        return {k: _normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value


__all__ = [
    "METHODS",
    "STAGES",
    "TARGET_FORMAT",
    "applicable_methods",
    "apply_peft",
    "count_parameters",
    "get_method",
    "is_peft_parameter",
    "load_target_state",
    "make_config",
    "mark_trainable",
    "method_of",
    "target_parameter_names",
    "target_state",
    "trainable_parameter_names",
    "why_not_applicable",
]
