"""Handlers around the optimizer step: per-iteration schedules, the DINO teacher's EMA, gradient clipping and
freezing, and the non-finite-loss guard; and the AdamW parameter groups they act on."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from torch import nn

from tpp_monai.errors import TrainingDiverged
from tpp_monai.handlers.checkpoints import latest_checkpoint

logger = logging.getLogger(__name__)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two AdamW groups: decayed (>= 2-D weights) and not decayed (biases, norms, 1-D)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "apply_decay": True}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "apply_decay": False})
    return [g for g in groups if g["params"]]


class _IterationHandler:
    event = Events.ITERATION_STARTED

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(self.event, self)

    @staticmethod
    def _index(engine: Engine, values: Sequence) -> int:
        return min(engine.state.iteration - 1, len(values) - 1)


class OptimizerScheduleHandler(_IterationHandler):
    """Set every param group's ``lr`` (and the decayed groups' ``weight_decay``) from per-iteration arrays."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr: Sequence[float], weight_decay: Sequence | None = None):
        self.optimizer, self.lr, self.weight_decay = optimizer, lr, weight_decay

    def __call__(self, engine: Engine) -> None:
        i = self._index(engine, self.lr)
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.lr[i])
            if self.weight_decay is not None and group.get("apply_decay", True):
                group["weight_decay"] = float(self.weight_decay[i])


class ValueScheduleHandler(_IterationHandler):
    """Set ``setattr(target, attribute, values[iteration])`` before every iteration."""

    def __init__(self, target: object, attribute: str, values: Sequence[float]) -> None:
        self.target, self.attribute, self.values = target, attribute, values

    def __call__(self, engine: Engine) -> None:
        setattr(self.target, self.attribute, float(self.values[self._index(engine, self.values)]))


class TeacherEMAHandler(_IterationHandler):
    """``pretext.update_teacher(momentum[iteration])`` after every optimizer step."""

    event = Events.ITERATION_COMPLETED

    def __init__(self, pretext: nn.Module, momentum: Sequence[float]) -> None:
        self.pretext, self.momentum = pretext, momentum

    def __call__(self, engine: Engine) -> None:
        self.pretext.update_teacher(float(self.momentum[self._index(engine, self.momentum)]))


class GradientClipHandler:
    """Clip gradients of ``params`` between backward and optimizer step (unscaling first under AMP).

    ``per_tensor=False``: one global norm over all tensors (``clip_grad_norm_``, MedCoSS fine-tuning's rule).
    ``per_tensor=True``: DINO's ``utils.clip_gradients``: every tensor whose own gradient norm ``n`` exceeds
    ``max_norm`` is scaled by ``max_norm / (n + 1e-6)``; the others are left as they are.
    """

    def __init__(
        self, params: Callable[[], Sequence[torch.Tensor]] | Sequence[torch.Tensor], max_norm: float,
        per_tensor: bool = False,
    ) -> None:  # fmt: skip
        self.params, self.max_norm, self.per_tensor = params, max_norm, bool(per_tensor)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if getattr(engine, "amp", False) and getattr(engine, "scaler", None) is not None:
            engine.scaler.unscale_(engine.optimizer)
        params = self.params() if callable(self.params) else self.params
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        if self.per_tensor:
            clip_each_gradient_(grads, self.max_norm)
        else:
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], self.max_norm)


@torch.no_grad()
def clip_each_gradient_(grads: Sequence[torch.Tensor], max_norm: float) -> None:
    """DINO's per-tensor clipping, in place: ``g *= min(1, max_norm / (||g|| + 1e-6))`` for every tensor ``g``
    (norms computed in one fused call, no host synchronisation)."""
    norms = torch.stack([n.float() for n in torch._foreach_norm(list(grads))])
    coefs = (max_norm / (norms + 1e-6)).clamp_(max=1.0)
    for grad, coef in zip(grads, coefs.unbind()):
        grad.mul_(coef.to(grad.dtype))


class FreezeLastLayerHandler:
    """Drop the gradients of ``module`` during the first ``epochs`` epochs (DINO freezes its last head layer)."""

    def __init__(self, module: nn.Module, epochs: int = 1) -> None:
        self.module, self.epochs = module, epochs

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.state.epoch <= self.epochs:
            for p in self.module.parameters():
                p.grad = None


class NonFiniteLossGuard:
    """Stop the run when the loss becomes NaN or infinite, naming the iteration, where the last good checkpoint is
    and what usually causes it. Checked after the step, so the step itself never waits for the GPU."""

    def __init__(self, checkpoint_dir: str | Path | None = None, lr: float | None = None, amp: bool = False) -> None:
        self.checkpoint_dir, self.lr, self.amp = checkpoint_dir, lr, amp

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        out = engine.state.output
        out = out[0] if isinstance(out, list) else out
        loss = float(torch.as_tensor(out["loss"]).detach())
        if math.isfinite(loss):
            return
        saved = latest_checkpoint(self.checkpoint_dir) if self.checkpoint_dir else None
        keep = f"the last good checkpoint is {saved} (resume with --resume true)" if saved else "no checkpoint yet"
        hint = f"lower the learning rate (now {self.lr:g})" if self.lr else "lower the learning rate"
        if self.amp:
            hint += " or turn mixed precision off (--amp False)"
        raise TrainingDiverged(
            f"the loss became {loss} at iteration {engine.state.iteration} (epoch {engine.state.epoch}); "
            f"training stopped; {keep}; {hint}"
        )
