"""Per-iteration schedules and run lengths of the training workflows."""

from __future__ import annotations

import math

import numpy as np

from tpp_monai.handlers import cosine_schedule


def lr_schedule(base: float, epochs: int, iters_per_epoch: int, warmup_epochs: float, final: float = 0.0):
    """Linear warm-up then cosine decay, per iteration (the paper's TPP schedule)."""
    return cosine_schedule(base, final, int(epochs), int(iters_per_epoch), warmup_epochs)


def wd_schedule(start: float, end: float, epochs: int, iters_per_epoch: int) -> np.ndarray:
    """Cosine weight-decay schedule from ``start`` to ``end`` (DINO: 0.04 -> 0.4; constant when equal)."""
    return cosine_schedule(start, end, int(epochs), int(iters_per_epoch))


def poly_schedule(base: float, epochs: int, iters_per_epoch: int, power: float = 0.9) -> np.ndarray:
    """MedCoSS's per-epoch polynomial decay ``base * (1 - epoch / epochs) ** power``, expanded per iteration."""
    per_epoch = [base * (1 - e / max(1, epochs)) ** power for e in range(max(1, int(epochs)))]
    return np.repeat(np.asarray(per_epoch), max(1, int(iters_per_epoch)))


def epochs_for(iterations: int, iters_per_epoch: int) -> int:
    """Epochs that cover ``iterations`` optimizer steps (the paper gives fine-tuning lengths in iterations)."""
    return max(1, math.ceil(int(iterations) / max(1, int(iters_per_epoch))))


_UNSET = object()


def pretext_setting(pretext: str, mae: object, dino: object, mim: object = _UNSET) -> object:
    """The value of a TPP-stage setting for ``pretext`` (the paper's MAE recipe, DINO's own, MIM's); for an unknown
    pretext an :class:`~tpp_monai.checks.Unresolved`, so the preflight names the pretext with the other problems."""
    from tpp_monai.checks import Unresolved
    from tpp_monai.errors import ConfigError
    from tpp_monai.pretext import check_pretext

    try:
        value = {"mae": mae, "dino": dino, "mim": mim}[check_pretext(pretext)]
    except ConfigError as err:
        return Unresolved(err)
    if value is _UNSET:
        raise ConfigError(f"this config sets no TPP value for pretext {pretext!r}; use --pretext mae or dino")
    return value


def pretext_lr(pretext: str, batch_size: int, mae: float, dino_base: float, mim: float | None = None) -> float:
    """The TPP stage's learning rate: MAE's ``mae`` and MIM's ``mim`` as given (paper §4.2: the rate it tuned for
    target parameters); DINO's linear scaling rule ``dino_base * batch_size / 256``."""
    from tpp_monai.checks import Unresolved

    value = pretext_setting(pretext, mae, dino_base * int(batch_size) / 256, _UNSET if mim is None else mim)
    return value if isinstance(value, Unresolved) else float(value)
