"""Reading backbone checkpoints in their public formats, with strict key checks and a report of unused keys.

A checkpoint file may be a flat state dict or a container (``{"model": ...}`` for MedCoSS, ``{"state_dict": ...}``
for nnU-Net v1 and PyTorch Lightning, ``{"network_weights": ...}`` for nnU-Net v2, ``{"teacher"|"student": ...}`` for
DINO training runs); keys may carry ``module.`` (DDP), ``model.`` (a Lightning module's attribute) or ``backbone.``
(DINO) prefixes. Every key the model expects must be present with
the right shape; checkpoint keys that a backbone declares as known-unused are reported; anything else is an error
that names the file and lists the missing, unexpected and mismatched keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from tpp_monai.errors import CheckpointError

CONTAINER_KEYS = ("model", "state_dict", "network_weights", "teacher", "student", "module")
STRIP_PREFIXES = ("module.", "model.", "backbone.")  # stripped in this order (DDP, Lightning, DINO)


def extract_state_dict(obj: object, path: str | Path = "<memory>", container_key: str | None = None) -> dict:
    """Find the tensors in a checkpoint container and strip ``module.``/``backbone.`` prefixes."""
    state = obj
    keys = (container_key,) if container_key else CONTAINER_KEYS
    if isinstance(state, Mapping) and not _is_state_dict(state):
        for key in keys:
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not _is_state_dict(state):
        found = sorted(state) if isinstance(state, Mapping) else type(state).__name__
        raise CheckpointError(
            f"{path} holds no state dict: expected tensors at the top level or under one of {list(keys)}, found {found}"
        )
    out = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            continue
        for prefix in STRIP_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def _is_state_dict(obj: Mapping) -> bool:
    tensors = [v for v in obj.values() if isinstance(v, Tensor)]
    return bool(tensors) and len(tensors) >= len(obj) / 2


@dataclass
class LoadReport:
    """What a checkpoint load did.

    ``loaded`` keys went into the model; ``unused`` maps a reason to the known-unused keys it covers; ``extras``
    holds tensors that other parts may consume (e.g. the MAE decoder of a MedCoSS pre-training checkpoint).
    """

    path: str
    loaded: list[str] = field(default_factory=list)
    unused: dict[str, list[str]] = field(default_factory=dict)
    extras: dict[str, Tensor] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors from {self.path}"]
        parts += [f"{len(keys)} not used ({reason})" for reason, keys in self.unused.items() if keys]
        if self.extras:
            parts.append(f"{len(self.extras)} kept for the pretext stage")
        return "; ".join(parts)


def load_into(
    model: nn.Module,
    state: Mapping[str, Tensor],
    expected: list[str],
    known_unused: Mapping[str, tuple[str, ...]],
    extras_prefixes: tuple[str, ...] = (),
    path: str | Path = "<memory>",
) -> LoadReport:
    """Copy ``state`` into ``model`` for exactly the ``expected`` keys.

    Args:
        model: the module to fill.
        state: checkpoint tensors (prefixes already stripped).
        expected: model keys that must be present in the checkpoint.
        known_unused: reason -> key prefixes of checkpoint entries that may be present and are ignored.
        extras_prefixes: checkpoint key prefixes kept in ``LoadReport.extras`` for another consumer.
        path: shown in messages.
    """
    own = model.state_dict()
    report = LoadReport(path=str(path))
    missing = [k for k in expected if k not in state]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in expected
        if k in state and state[k].shape != own[k].shape
    ]
    unexpected = []
    expected_set = set(expected)
    for key in state:
        if key in expected_set:
            continue
        if key.startswith(extras_prefixes) and extras_prefixes:
            report.extras[key] = state[key]
            continue
        reason = next((r for r, prefixes in known_unused.items() if key.startswith(prefixes)), None)
        if reason is None:
            unexpected.append(key)
        else:
            report.unused.setdefault(reason, []).append(key)
    if missing or unexpected or mismatched:
        lines = [f"checkpoint {path} does not match {type(model).__name__}:"]
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        ):
            if items:
                shown = ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")
                lines.append(f"  {title}: {shown}")
        lines.append("  check that --backbone names the architecture the checkpoint was trained with")
        raise CheckpointError("\n".join(lines))
    with torch.no_grad():
        for key in expected:
            own[key].copy_(state[key])
    report.loaded = list(expected)
    return report
