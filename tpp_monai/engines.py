"""Engine parts the TPP workflows need beyond MONAI's own."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from ignite.engine import Engine
from monai.engines import SupervisedTrainer
from monai.utils import CommonKeys as Keys
from torch import Tensor


def plain_tensor(x: Tensor, device: torch.device | None = None, non_blocking: bool = False) -> Tensor:
    """A ``torch.Tensor`` on ``device``: MONAI's ``MetaTensor`` dispatches every operation through Python
    (``__torch_function__``), which slows a small model's step many times over on the CPU; no metadata is needed
    inside the network."""
    if isinstance(x, Tensor) and type(x) is not Tensor:
        x = x.as_subclass(Tensor)
    return x.to(device=device, non_blocking=non_blocking)


class PlainBatch:
    """``prepare_batch`` for MONAI trainers: ``(image, label)`` as plain tensors (evaluators keep MONAI's default,
    whose ``MetaTensor`` names each image, and strip the metadata in their inferer instead)."""

    def __call__(self, batch: Mapping, device: torch.device | None = None, non_blocking: bool = False, **_: Any):
        label = batch.get(Keys.LABEL)
        if isinstance(label, Tensor):
            label = plain_tensor(label, device, non_blocking)
        return plain_tensor(batch[Keys.IMAGE], device, non_blocking), label


class LeanTrainer(SupervisedTrainer):
    """MONAI's ``SupervisedTrainer`` keeping only the loss as the iteration's output.

    Nothing downstream of a training step needs its predictions decollated (no training metrics), so the output is
    ``[{"loss": loss}]``: the shape MONAI's default handlers read with ``from_engine(["loss"], first=True)``
    (``StatsHandler``, the ``MLFlowHandler`` that ``--tracking mlflow`` adds), without holding the batch and the
    predictions until the next iteration.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["decollate"] = False
        super().__init__(*args, **kwargs)

    def _iteration(self, engine: Engine, batchdata: dict[str, Any]) -> list[dict[str, Any]]:
        output = super()._iteration(engine, batchdata)
        return [{Keys.LOSS: output[Keys.LOSS].detach()}]
