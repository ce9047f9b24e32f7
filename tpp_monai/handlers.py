"""Ignite/MONAI handlers the TPP workflows need beyond MONAI's own.

* :class:`OptimizerScheduleHandler` / :class:`ValueScheduleHandler`: precomputed per-iteration schedules (learning
  rate, weight decay, teacher temperature), indexed by the engine's iteration so a resumed run continues them.
* :class:`TeacherEMAHandler`: the DINO teacher's momentum update after every optimizer step.
* :class:`GradientClipHandler`: global-norm (fine-tuning) or DINO's per-tensor gradient clipping.
* :class:`FreezeLastLayerHandler`: DINO's first-epoch freeze of the head's last layer.
* :class:`TargetStateSaver`: writes the target-parameter file (target tensors only) atomically every epoch.
* :class:`SafeCheckpointSaver`: MONAI's ``CheckpointSaver`` whose files are written atomically (temporary file,
  fsync, rename) with a content digest; MONAI's saver writes in place (``atomic=False``).
* :class:`ProgressBar`: ignite's tqdm bar, one per epoch, showing the loss.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from ignite.handlers import ProgressBar as _IgniteProgressBar
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.engines.utils import IterationEvents
from monai.handlers import CheckpointLoader, CheckpointSaver
from monai.handlers import ValidationHandler as _ValidationHandler
from monai.utils import is_scalar
from torch import nn

from tpp_monai.errors import CheckpointError, TrainingDiverged
from tpp_monai.io import atomic_save, fault_point, load_verified
from tpp_monai.peft import target_state

logger = logging.getLogger(__name__)


def is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


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


class TargetStateSaver:
    """Write ``target_state(model)`` to ``path`` after every epoch (rank 0), atomically: the TPP stage's product.

    ``info`` (e.g. the pretext and dataset) is recorded in the file next to the method, options and backbone.
    """

    def __init__(self, model: nn.Module | Callable[[], nn.Module], path: str | Path, info: Mapping | None = None):
        self.model, self.path, self.info = model, Path(path), dict(info or {})

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if is_rank0():
            model = self.model() if callable(self.model) and not isinstance(self.model, nn.Module) else self.model
            atomic_save({**target_state(model), **self.info, "epoch": engine.state.epoch}, self.path)


class _AtomicDiskSaver(BaseSaveHandler):
    """Ignite save handler that writes with :func:`tpp_monai.io.atomic_save` (rank 0 only).

    Ignite flattens a single-object checkpoint to that object's state dict; it is written back under its key
    (``{"model": state_dict}``, the layout MONAI Label and ``ckpt_export --key_in_ckpt model`` read), so the
    digest and the ``run_info`` never mix with the weights.

    Ignite's ``Checkpoint`` asks to remove the file a save replaces *before* it writes the new one, so a kill or a
    full disk in between would leave no checkpoint; the removal is deferred here until the new file is complete.
    """

    def __init__(
        self, dirname: str | Path, filename: str | None = None, single_key: str | None = None,
        run_info: Mapping | None = None,
    ) -> None:  # fmt: skip
        self.dirname, self.filename = Path(dirname), filename
        self.single_key, self.run_info = single_key, run_info
        self._replaced: list[Path] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if not is_rank0():
            return
        payload = {self.single_key: checkpoint} if self.single_key else dict(checkpoint)
        if self.run_info:
            payload["run_info"] = dict(self.run_info)
        path = self.dirname / (self.filename or filename)
        kept = [p for p in self._replaced if p != path and p.is_file()]
        try:
            atomic_save(payload, path)
        except CheckpointError as err:
            raise CheckpointError(f"{err}{f'; {kept[-1]} is kept' if kept else ''}") from None
        fault_point(path.name, "replaced")
        for old in kept:
            old.unlink(missing_ok=True)
        self._replaced.clear()

    def remove(self, filename: str) -> None:
        if is_rank0():
            self._replaced.append(self.dirname / (self.filename or filename))


class SafeCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` (same arguments and behaviour) writing through :class:`_AtomicDiskSaver`.

    ``engine_key`` also saves the engine it is attached to (epoch, iteration) under that key: the trainer cannot be
    named in ``save_dict`` of a handler in its own handler list without a circular config reference.
    """

    def __init__(
        self, *args: object, engine_key: str | None = None, run_info: Mapping | None = None, resume: bool = False,
        **kwargs: object,
    ) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        self.engine_key = engine_key
        self.resume = bool(resume)
        single = next(iter(self.save_dict)) if len(self.save_dict) == 1 and not engine_key else None
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                filename = getattr(checkpoint.save_handler, "filename", None)
                checkpoint.save_handler = _AtomicDiskSaver(self.save_dir, filename, single, run_info)

    def attach(self, engine: Engine) -> None:
        if self.engine_key:
            self.save_dict[self.engine_key] = engine  # the Checkpoint objects share this dict
        if self.resume:
            engine.add_event_handler(Events.STARTED, self._resume)
        super().attach(engine)

    def latest(self) -> Path | None:
        return latest_checkpoint(self.save_dir)

    def _resume(self, engine: Engine) -> None:
        """Continue from :meth:`latest`: target parameters, optimizer, pretext state, epoch/iteration and RNG."""
        path = self.latest()
        if path is None:
            logger.warning("resume requested but %s holds no checkpoint; starting from the beginning", self.save_dir)
            return
        checkpoint = load_verified(path)
        run_info = checkpoint.pop("run_info", None)
        missing = [k for k in self.save_dict if k not in checkpoint]
        if missing:
            raise CheckpointError(f"{path} cannot resume this run: it lacks {missing}; it was written by another "
                                  "workflow or version")  # fmt: skip
        max_epochs = engine.state.max_epochs
        restore_objects(path, self.save_dict, checkpoint, run_info=run_info)
        engine.state.max_epochs = max_epochs
        if engine.state.epoch > max_epochs:
            raise CheckpointError(f"{path} is at epoch {engine.state.epoch}, past this run's {max_epochs} epochs; "
                                  "raise --epochs (--tpp_epochs for pretrain_tpp) to continue it")  # fmt: skip
        if self._interval_checkpoint is not None:  # rotate the resumed file out like any other (n_saved)
            self._interval_checkpoint.load_state_dict({"_saved": [(engine.state.epoch, path.name)]})
            if self._interval_checkpoint.n_saved == 1 and is_rank0():  # older files a kill left before their removal
                for older in Path(self.save_dir).glob("*.pt"):
                    if older != path and not older.name.startswith("."):
                        older.unlink(missing_ok=True)
        logger.info("resumed from %s at epoch %d, iteration %d", path, engine.state.epoch, engine.state.iteration)

    def state_dict(self) -> dict:
        """Which file is the best so far (key-metric saving), so a resumed run keeps comparing against it."""
        return self._key_metric_checkpoint.state_dict() if self._key_metric_checkpoint is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self._key_metric_checkpoint is not None and state:
            self._key_metric_checkpoint.load_state_dict(state)


class RandomStates:
    """Checkpointable random state of a run: PyTorch (CPU and CUDA), NumPy, Python, and every randomised transform
    of the data pipeline (MONAI transforms keep their own ``RandomState``), so a resumed run draws the same numbers
    as an uninterrupted one."""

    def __init__(self, *transforms: object) -> None:
        self.randomizables = [t for root in transforms for t in _walk_transforms(root)]

    def state_dict(self) -> dict:
        import random

        state = {
            "torch": torch.get_rng_state(),
            "numpy": _np_state(np.random.get_state()),
            "python": random.getstate(),
            "transforms": [_np_state(t.R.get_state()) for t in self.randomizables],
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: Mapping) -> None:
        import random

        torch.set_rng_state(state["torch"])
        np.random.set_state(_np_state_back(state["numpy"]))
        random.setstate(_as_tuple(state["python"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        if len(state["transforms"]) != len(self.randomizables):
            raise CheckpointError("the checkpoint's data pipeline differs from this run's (random transform count)")
        for transform, rng in zip(self.randomizables, state["transforms"]):
            transform.R.set_state(_np_state_back(rng))


def _np_state(state: tuple) -> list:
    """A NumPy ``RandomState`` state as plain values (weights-only checkpoints refuse NumPy arrays)."""
    name, keys, pos, has_gauss, cached = state
    return [name, torch.as_tensor(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]


def _np_state_back(state: list) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return (name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached)


def _as_tuple(value: object) -> object:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list) else value


def _walk_transforms(obj: object, seen: set | None = None) -> list:
    """Every object with its own ``RandomState`` (MONAI ``Randomizable``) reachable from ``obj``: through transform
    lists and through attributes, since MONAI's dictionary transforms keep randomised array transforms inside
    (``RandAffined.rand_affine.rand_affine_grid``...), as MONAI's own ``set_rnd`` walks them."""
    from monai.transforms import Randomizable

    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (torch.Tensor, np.ndarray, str, bytes, int, float)) or obj is None:
        return []
    seen.add(id(obj))
    found = [obj] if isinstance(obj, Randomizable) else []
    if isinstance(obj, (list, tuple)):
        children = list(obj)
    elif isinstance(obj, dict):
        children = list(obj.values())
    elif type(obj).__module__.startswith(("monai.", "tpp_monai.")):
        children = list(vars(obj).values()) if hasattr(obj, "__dict__") else []
    else:
        children = []
    for child in children:
        found.extend(_walk_transforms(child, seen))
    return found


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint in ``folder`` (temporary files of an interrupted write are ignored)."""
    files = [p for p in Path(folder).glob("*.pt") if not p.name.startswith(".")]
    return max(files, key=lambda p: p.stat().st_mtime) if files else None


def restore_objects(path: str | Path, to_load: Mapping, checkpoint: Mapping, strict: bool = True,
                    run_info: Mapping | None = None) -> None:  # fmt: skip
    """``Checkpoint.load_objects`` with an error naming the file (and the settings that wrote it, from its
    ``run_info``) when its tensors do not fit this run's objects."""
    try:
        Checkpoint.load_objects(to_load=to_load, checkpoint=checkpoint, strict=strict)
    except (KeyError, ValueError, RuntimeError) as exc:
        info = run_info or {}
        written = ", ".join(f"{k} {info[k]}" for k in ("method", "method_options", "backbone") if k in info)
        raise CheckpointError(
            f"{path} does not fit this run{f' (it was written with {written})' if written else ''}: "
            f"{str(exc).splitlines()[0][:300]}; use the same --method, --method_options and --backbone as the run "
            "that wrote it, or point to that run's folder"
        ) from exc


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


class VerifiedCheckpointLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` reading through :func:`tpp_monai.io.load_verified`: a truncated or corrupt file
    is refused with its path instead of being loaded. The file's ``run_info`` is kept on :attr:`run_info`."""

    def __init__(self, load_path: str, load_dict: dict, strict: bool = True, name: str | None = None) -> None:
        super().__init__(load_path=load_path, load_dict=load_dict, name=name, map_location="cpu", strict=strict)
        self.run_info: dict = {}

    def __call__(self, engine: Engine) -> None:
        if not Path(self.load_path).is_file():
            raise CheckpointError(
                f"no checkpoint at {self.load_path}; run finetune first (it writes the best model there) or pass "
                "--ckpt_dir with the folder that holds model.pt"
            )
        checkpoint = load_verified(self.load_path)
        self.run_info = dict(checkpoint.pop("run_info", {}) or {})
        key = next(iter(self.load_dict))
        if len(self.load_dict) == 1 and key not in checkpoint:
            checkpoint = {key: checkpoint}
        restore_objects(self.load_path, self.load_dict, checkpoint, strict=self.strict, run_info=self.run_info)
        logger.info("restored %s from %s", ", ".join(self.load_dict), self.load_path)


class ValidationHandler(_ValidationHandler):
    """MONAI's ``ValidationHandler`` that also validates after the last epoch when the interval skipped it, so a run
    shorter than (or not a multiple of) ``interval`` still selects and saves a best model."""

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        engine.add_event_handler(Events.COMPLETED, self._final)

    def _final(self, engine: Engine) -> None:
        if self.validator is not None and engine.state.epoch % self.interval:
            self.validator.run(engine.state.epoch)


class HistoryWriter:
    """``history.csv``: one row per epoch (epoch, iteration, mean training loss, learning rate, ``elapsed_s``, then
    every validation metric, empty where validation did not run), and one log line per epoch and per validation.

    ``elapsed_s``: wall-clock seconds from the start of training to the end of the epoch, including that epoch's
    validation when it ran before the row was written (validation handlers attached first, as in the bundles); a
    resumed run continues from the restored epoch's value. Convergence in wall time is read from it.

    The header names every column from the first row; the file is rewritten atomically after each change, so it is
    always well-formed, and a validation that runs after its epoch's row (the final one, on ``COMPLETED``) fills that
    row. On a resumed run the rows past the restored epoch are dropped (:meth:`truncate`), so the history matches the
    checkpoint. Only rank 0 writes.
    """

    def __init__(
        self, path: str | Path, optimizer: torch.optim.Optimizer | None = None, validator: Engine | None = None,
        metrics: Sequence[Mapping] | Sequence[str] = (), loss_key: str = "loss",
    ) -> None:  # fmt: skip
        self.path, self.optimizer, self.validator, self.loss_key = Path(path), optimizer, validator, loss_key
        names = [n for m in metrics for n in (m if isinstance(m, Mapping) else [m])]
        self.columns = ["epoch", "iteration", "train_loss", *(["lr"] if optimizer is not None else []), "elapsed_s",
                        *names]  # fmt: skip
        self.rows: list[dict] = []
        self._losses: list[float] = []
        self._started = False
        self._clock = (time.monotonic(), 0.0)  # (monotonic time training started in this process, seconds before)
        self._validation_line: str | None = None  # logged after its epoch's line

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        if self.validator is not None:
            self.validator.add_event_handler(Events.EPOCH_COMPLETED, self._validated)

    def _start(self, engine: Engine) -> None:
        """On the first epoch of this process (after any resume restored the engine): keep the rows up to the
        restored epoch, so rows a killed run wrote after its last checkpoint go (none on a fresh run). Ignite has
        already counted the starting epoch when ``EPOCH_STARTED`` fires, hence ``epoch - 1``."""
        if self._started:
            return
        self._started = True
        restored = engine.state.epoch - 1
        self.rows = self.read(self.path) if restored > 0 else []
        self.truncate(restored)
        before = self.rows[-1].get("elapsed_s") if self.rows else None
        self._clock = (time.monotonic(), float(before) if before not in (None, "") else 0.0)

    @staticmethod
    def read(path: str | Path) -> list[dict]:
        """The rows of an existing history file (none when it does not exist)."""
        path = Path(path)
        if not path.is_file():
            return []
        with open(path, newline="") as f:
            return [dict(row) for row in csv.DictReader(f)]

    def truncate(self, epoch: int) -> None:
        """Drop the rows after ``epoch`` (a resumed run restarts from its checkpoint's epoch) and rewrite the file."""
        self.rows = [r for r in self.rows if int(r["epoch"]) <= int(epoch)]
        self._flush()

    def _collect(self, engine: Engine) -> None:
        out = engine.state.output
        out = out[0] if isinstance(out, list) else out
        self._losses.append(float(torch.as_tensor(out[self.loss_key]).detach()))

    def _epoch_completed(self, engine: Engine) -> None:
        loss = sum(self._losses) / max(1, len(self._losses))
        self._losses.clear()
        row = {"epoch": engine.state.epoch, "iteration": engine.state.iteration, "train_loss": loss}
        if self.optimizer is not None:
            row["lr"] = self.optimizer.param_groups[0]["lr"]
        row["elapsed_s"] = round(self._clock[1] + time.monotonic() - self._clock[0], 3)
        if self.validator is not None and self.validator.state.epoch == engine.state.epoch:
            row.update(self._metrics(self.validator))
        self.rows.append(row)
        self._flush()
        lr = f", lr {row['lr']:.3g}" if "lr" in row else ""
        logger.info("epoch %d/%d: mean loss %.4f%s", engine.state.epoch, engine.state.max_epochs, loss, lr)
        if self._validation_line:
            logger.info(self._validation_line)
            self._validation_line = None

    def _metrics(self, validator: Engine) -> dict:
        return {k: float(v) for k, v in validator.state.metrics.items() if k in self.columns and is_scalar(v)}

    def _validated(self, validator: Engine) -> None:
        """Fill the row of the epoch just validated (written already when the validation ran after it)."""
        metrics = self._metrics(validator)
        epoch = validator.state.epoch
        key = getattr(validator.state, "key_metric_name", None)
        best = (f" (best {key} {validator.state.best_metric:.4f} at epoch {validator.state.best_metric_epoch})"
                if key and getattr(validator.state, "best_metric_epoch", -1) > 0 else "")  # fmt: skip
        line = f"epoch {epoch} validation: {', '.join(f'{k} {v:.4f}' for k, v in metrics.items())}{best}"
        written = [row for row in self.rows if int(row["epoch"]) == epoch]
        for row in written:
            row.update(metrics)
        if written:  # the final validation, after its epoch's row
            self._flush()
            logger.info(line)
        else:
            self._validation_line = line

    def _flush(self) -> None:
        if not is_rank0():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)
        tmp.replace(self.path)


#: metrics that are distances (in pixels for the 2D images), never percentages
DISTANCE_METRICS = {"hd95": "pixels"}


class EvaluationWriter:
    """After evaluation write ``metrics.json`` (``metrics``: fractions, and distances in their units; ``percent``: the
    fractions times 100; ``units`` per metric; with the run's provenance read from
    the model file) next to the CSV files MONAI's ``MetricsSaver`` writes."""

    def __init__(self, output_dir: str | Path, loader: VerifiedCheckpointLoader | None = None,
                 info: Mapping | None = None) -> None:  # fmt: skip
        self.output_dir, self.loader, self.info = Path(output_dir), loader, dict(info or {})

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        from tpp_monai.metrics import as_percent

        metrics = {k: float(v) for k, v in engine.state.metrics.items() if is_scalar(v)}
        result = {
            "metrics": metrics,
            "percent": {k: v for k, v in as_percent(metrics).items() if k not in DISTANCE_METRICS},
            "units": {k: DISTANCE_METRICS.get(k, "fraction") for k in metrics},
            "num_images": len(engine.data_loader.dataset) if hasattr(engine.data_loader, "dataset") else None,
            "run_info": {**(self.loader.run_info if self.loader else {}), **self.info},
        }
        if is_rank0():
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
            logger.info("test metrics: %s", ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


class ProgressBar:
    """Progress within an epoch on rank 0: ignite's tqdm bar on a terminal (it disappears when the epoch ends; the
    epoch's line is :class:`HistoryWriter`'s), and otherwise (a log file, a batch job) a plain line at most every
    ``interval_s`` seconds, so a redirected log holds no carriage-return updates."""

    def __init__(self, loss_key: str = "loss", interval_s: float = 60.0, stream: object = None) -> None:
        self.loss_key, self.interval_s, self.stream = loss_key, float(interval_s), stream

    def _loss(self, output: object) -> dict:
        out = output[0] if isinstance(output, list) else output
        value = out.get(self.loss_key) if isinstance(out, Mapping) else None
        return {} if value is None else {self.loss_key: float(torch.as_tensor(value).detach())}

    def attach(self, engine: Engine) -> None:
        if not is_rank0():
            return
        stream = self.stream or sys.stderr
        if getattr(stream, "isatty", lambda: False)():
            _IgniteProgressBar(persist=False, file=stream).attach(engine, output_transform=self._loss)
            return
        last = [time.monotonic()]

        def plain(engine: Engine) -> None:
            now = time.monotonic()
            if now - last[0] < self.interval_s:
                return
            last[0] = now
            length = engine.state.epoch_length or 0
            step = (engine.state.iteration - 1) % length + 1 if length else engine.state.iteration
            loss = self._loss(engine.state.output).get(self.loss_key)
            logger.info("epoch %d: iteration %d/%d%s", engine.state.epoch, step, length,
                        "" if loss is None else f", loss {loss:.4f}")  # fmt: skip

        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: last.__setitem__(0, time.monotonic()))
        engine.add_event_handler(Events.ITERATION_COMPLETED, plain)
