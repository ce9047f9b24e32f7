"""Per-iteration schedules (learning rate, weight decay, momentum, temperature) and run lengths: every schedule
rule of the project, as plain arrays indexed by the engine's iteration."""

from __future__ import annotations

import math

import numpy as np


def cosine_schedule(
    base: float, final: float, epochs: int, iters_per_epoch: int, warmup_epochs: float = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """Linear warm-up from ``warmup_start`` to ``base`` over ``warmup_epochs``, then half-cosine to ``final``
    (per iteration, as MAE's ``lr_sched`` and DINO's ``cosine_scheduler``)."""
    total = max(1, epochs * iters_per_epoch)
    warm = min(total, round(warmup_epochs * iters_per_epoch))
    ramp = np.linspace(warmup_start, base, warm, endpoint=False) if warm else np.zeros(0)
    steps = np.arange(total - warm)
    tail = final + 0.5 * (base - final) * (1 + np.cos(math.pi * steps / max(1, len(steps))))
    return np.concatenate([ramp, tail])


def dino_cosine_schedule(
    base: float, final: float, epochs: int, iters_per_epoch: int, warmup_epochs: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """DINO's ``cosine_scheduler`` rule, per iteration: a linear warm-up from ``warmup_start`` that reaches ``base``
    on its last step (``warmup_epochs`` whole epochs), then a half-cosine from ``base`` to ``final``."""
    total = max(1, epochs * iters_per_epoch)
    warm = min(total, warmup_epochs * iters_per_epoch)
    ramp = np.linspace(warmup_start, base, warm)  # endpoint included, unlike MAE's warm-up
    return np.concatenate([ramp, cosine_schedule(base, final, 1, total - warm)]) if total > warm else ramp


def teacher_temp_schedule(
    start: float, end: float, warmup_epochs: int, epochs: int, iters_per_epoch: int
) -> np.ndarray:
    """DINO's teacher temperature, per epoch (``DINOLoss.teacher_temp_schedule``): linear from ``start`` to ``end``
    over ``warmup_epochs`` epochs (``end`` reached in the last warm-up epoch), then constant; expanded to one value per
    iteration, constant within each epoch."""
    warm = min(int(epochs), int(warmup_epochs))
    per_epoch = np.concatenate([np.linspace(start, end, warm), np.full(max(0, int(epochs) - warm), float(end))])
    return np.repeat(per_epoch, max(1, int(iters_per_epoch)))


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
