"""The target-parameter rule: which parameters a model's PEFT method trains (TPP paper §3.1), what the optimizer
gets, the counts of ``params`` and the target tensors the TPP stage saves (:mod:`tpp_monai.peft` re-exports them)."""

from __future__ import annotations

from torch import nn

from tpp_monai.errors import ConfigError
from tpp_monai.peft.registry import MethodSpec, get_method

TARGET_FORMAT = "tpp_monai.target_state"
STAGES = ("finetune", "tpp")


def method_of(model: nn.Module) -> MethodSpec:
    method = getattr(model, "peft_method", None)
    if method is None:
        raise ConfigError("the model has no PEFT method applied; call tpp_monai.peft.apply_peft first")
    return get_method(method)


def target_parameter_names(model: nn.Module) -> list[str]:
    """The target parameters of the model's PEFT method (never task-head parameters), in ``named_parameters`` order."""
    spec = method_of(model)
    head = set(model.head_parameter_names())
    return [n for n, _ in model.named_parameters() if n not in head and spec.target(model, n)]


def trainable_parameter_names(model: nn.Module, stage: str = "finetune") -> list[str]:
    """Target parameters, plus the task head in the ``finetune`` stage (the ``tpp`` stage trains targets only)."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; valid stages: {', '.join(STAGES)}")
    names = set(target_parameter_names(model))
    if stage == "finetune":
        names |= set(model.head_parameter_names())
    return [n for n, _ in model.named_parameters() if n in names]


def mark_trainable(model: nn.Module, names: list[str]) -> list[nn.Parameter]:
    """Set ``requires_grad`` on exactly ``names``; returns those parameters (the optimizer's list)."""
    wanted = set(names)
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name in wanted)
        if name in wanted:
            params.append(p)
    return params


def count_parameters(model: nn.Module, stage: str = "finetune") -> dict[str, int]:
    """Trainable, target and total parameter counts."""
    params = dict(model.named_parameters())
    return {
        "trainable": sum(params[n].numel() for n in trainable_parameter_names(model, stage)),
        "target": sum(params[n].numel() for n in target_parameter_names(model)),
        "total": sum(p.numel() for p in params.values()),
    }


def target_state(model: nn.Module) -> dict:
    """The target parameters with what is needed to check them on load (method, options, backbone)."""
    params = dict(model.named_parameters())
    return {
        "format": TARGET_FORMAT,
        "version": 1,
        "method": model.peft_method,
        "options": dict(model.peft_options),
        "backbone": getattr(model, "backbone_name", None),
        "state": {n: params[n].detach().cpu().clone() for n in target_parameter_names(model)},
    }
