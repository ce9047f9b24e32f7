"""Checkpoint handlers: the target-parameter file, atomic digest-checked checkpoints, their verified loading, and the
random states a resumed run restores."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointLoader, CheckpointSaver
from torch import nn

from tpp_monai.errors import CheckpointError
from tpp_monai.io import atomic_save, fault_point, load_verified
from tpp_monai.peft.files import write_target_folder

logger = logging.getLogger(__name__)


def is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class TargetStateSaver:
    """Write the model's target parameters to the folder ``path`` after every epoch (rank 0), atomically: the TPP
    stage's product (:func:`tpp_monai.peft.files.write_target_folder`).

    ``info`` (e.g. the pretext and dataset) is recorded in the file next to the method, options and backbone. At the
    end of the run the folder is written once more unless this process wrote it for the last epoch: a run killed
    after its last checkpoint but before this save resumes with no epoch left to train, and must still leave it.
    """

    def __init__(self, model: nn.Module | Callable[[], nn.Module], path: str | Path, info: Mapping | None = None):
        self.model, self.path, self.info = model, Path(path), dict(info or {})
        self._written_epoch: int | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self._on_completed)

    def _on_completed(self, engine: Engine) -> None:
        if self._written_epoch != engine.state.epoch:
            self(engine)

    def __call__(self, engine: Engine) -> None:
        if is_rank0():
            model = self.model() if callable(self.model) and not isinstance(self.model, nn.Module) else self.model
            write_target_folder(model, self.path, {**self.info, "epoch": engine.state.epoch})
        self._written_epoch = engine.state.epoch


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
