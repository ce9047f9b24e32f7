"""Engines the TPP workflows need beyond MONAI's own."""

from __future__ import annotations

from typing import Any

from ignite.engine import Engine
from monai.engines import SupervisedTrainer
from monai.utils import CommonKeys as Keys


class PretextTrainer(SupervisedTrainer):
    """MONAI's ``SupervisedTrainer`` for the pretext stages, keeping only the loss as the iteration's output.

    The pretext step produces no prediction worth decollating (masked patches, DINO logits of ten crops), so the
    output is ``[{"loss": loss}]``: the shape MONAI's default handlers read with ``from_engine(["loss"],
    first=True)`` (``StatsHandler``, the ``MLFlowHandler`` that ``--tracking mlflow`` adds), without holding the
    batch and the predictions until the next iteration.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["decollate"] = False
        super().__init__(*args, **kwargs)

    def _iteration(self, engine: Engine, batchdata: dict[str, Any]) -> list[dict[str, Any]]:
        output = super()._iteration(engine, batchdata)
        return [{Keys.LOSS: output[Keys.LOSS].detach()}]
