"""What an initialisation of the target parameters cost: ``init_cost.json`` in the run folder that paid it.

The format is fixed (the experiment report reads it)::

    {"kind": "tpp" | "peft-eva" | "peft-corda" | "peft-pissa" | "peft-olora", "seconds": float,
     "peak_memory_mib": float or null, "memory_kind": "cuda_max_allocated" | "process_max_rss",
     "device": "cpu" | "cuda"}

* the TPP stage (:class:`StageCost`): the whole ``pretrain_tpp`` workflow, from its first ``initialize`` step to the
  end of training (a resumed stage adds its earlier attempts' seconds and keeps the larger peak);
* a data-driven LoRA initialisation of huggingface peft (:func:`peft_initialisation`, the finetune workflow's
  ``peft_init`` component): EVA or CorDA on the downstream training loader, PiSSA or OLoRA when peft injected.

Peak memory on CUDA is ``torch.cuda.max_memory_allocated`` since the measurement began; on the CPU it is the
process's peak resident set (``ru_maxrss``), a high-water mark of the whole process up to that point (it includes
the data the workflow cached), so it bounds the initialisation's memory from above.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from torch import nn

from tpp_monai.handlers import is_rank0

logger = logging.getLogger(__name__)
COST_FILE = "init_cost.json"
KINDS = ("tpp", "peft-eva", "peft-corda", "peft-pissa", "peft-olora")


def _device_type(device: object) -> str:
    return "cuda" if str(torch.device(device) if device is not None else "cpu").startswith("cuda") else "cpu"


def _start_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> tuple[float | None, str]:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return (rss / 2**20 if sys.platform == "darwin" else rss / 2**10), "process_max_rss"


def write_init_cost(output_dir: str | Path, kind: str, seconds: float, device: str,
                    peak: tuple[float | None, str] | None = None) -> Path:  # fmt: skip
    """Write ``<output_dir>/init_cost.json`` (rank 0; atomically) and return its path."""
    if kind not in KINDS:
        raise ValueError(f"init cost kind {kind!r} unknown; valid: {', '.join(KINDS)}")
    memory, memory_kind = peak if peak is not None else _peak(device)
    record = {"kind": kind, "seconds": float(seconds), "peak_memory_mib": None if memory is None else float(memory),
              "memory_kind": memory_kind, "device": device}  # fmt: skip
    path = Path(output_dir) / COST_FILE
    if is_rank0():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{COST_FILE}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, path)
        logger.info("%s initialisation: %.1f s, peak memory %s MiB (%s)", kind, seconds,
                    "?" if memory is None else f"{memory:.0f}", memory_kind)  # fmt: skip
    return path


class StageCost:
    """The TPP stage's cost: the clock starts when the config instantiates this object (early in ``initialize``);
    :class:`StageCostWriter` (a trainer handler) calls it when training completes, and it writes ``init_cost.json``."""

    def __init__(self, output_dir: str, device: object = None, resume: bool = False) -> None:
        self.output_dir, self.device, self.resume = Path(output_dir), _device_type(device), bool(resume)
        _start_peak(self.device)
        self.started = time.perf_counter()

    def __call__(self, engine: Engine) -> None:
        seconds = time.perf_counter() - self.started
        peak = _peak(self.device)
        earlier = _read(self.output_dir / COST_FILE) if self.resume else None
        if earlier and earlier.get("kind") == "tpp" and earlier.get("memory_kind") == peak[1]:
            seconds += float(earlier["seconds"])
            if earlier.get("peak_memory_mib") is not None and peak[0] is not None:
                peak = (max(peak[0], float(earlier["peak_memory_mib"])), peak[1])
        write_init_cost(self.output_dir, "tpp", seconds, self.device, peak)


class StageCostWriter:
    """Trainer handler: ``cost(engine)`` when training completes (a separate handler entry, since MONAI's bundle
    checks read every ``train#handlers`` entry as a component)."""

    def __init__(self, cost: StageCost) -> None:
        self.cost = cost

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self.cost)


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def peft_initialisation(model: nn.Module, dataloader: object, output_dir: str, device: object = None,
                        image_key: str = "image") -> nn.Module:  # fmt: skip
    """The finetune workflow's ``peft_init`` component, run after the network is built and before the optimizer: a
    no-op unless the method options ask for a data-driven LoRA initialisation of huggingface peft. EVA and CorDA run
    here on ``dataloader`` (the downstream training images, on ``device``); PiSSA and OLoRA ran when peft injected
    and only their cost is written. Returns the model."""
    from tpp_monai.peft import hf

    kind = hf.init_kind(model)
    if kind is None:
        return model
    if kind in hf.WEIGHT_INITS:
        cost = getattr(model, "peft_init_cost", None) or {}
        write_init_cost(output_dir, f"peft-{kind}", float(cost.get("seconds", 0.0)), "cpu")
        return model
    where = _device_type(device)
    model.to(device if device is not None else "cpu")
    _start_peak(where)
    started = time.perf_counter()

    def batches() -> Iterator[torch.Tensor]:
        from tpp_monai.engines import plain_tensor

        for batch in dataloader:
            yield plain_tensor(batch[image_key] if isinstance(batch, dict) else batch[0], device)

    hf.initialize_from_data(model, batches)
    from tpp_monai.peft import mark_trainable, trainable_parameter_names

    mark_trainable(model, trainable_parameter_names(model, "finetune"))  # EVA and CorDA may replace the factors
    if where == "cuda":
        torch.cuda.synchronize()
    write_init_cost(output_dir, f"peft-{kind}", time.perf_counter() - started, where)
    return model
