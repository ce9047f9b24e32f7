"""Handlers that validate and report: the end-of-run validation, ``history.csv``, the evaluation summary and the
progress bar."""

from __future__ import annotations

import csv
import json
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar as _IgniteProgressBar
from monai.handlers import ValidationHandler as _ValidationHandler
from monai.utils import is_scalar

from tpp_monai.handlers.checkpoints import VerifiedCheckpointLoader, is_rank0

logger = logging.getLogger(__name__)


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
