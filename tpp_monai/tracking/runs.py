"""What a bundle run records about itself: TensorBoard event files, MLflow params/tags/artifacts, the run's plots.

:class:`RunTracker` is one handler in every training and evaluation config. It

* writes TensorBoard event files into the run folder (MONAI's ``TensorBoardStatsHandler``: the iteration loss of the
  trainer, the validation metrics per epoch), as model-zoo bundles do, unless ``tensorboard`` is false;
* under ``--tracking mlflow`` (MONAI adds an ``MLFlowHandler`` to the same engine) logs the run's params (dataset,
  method and options, initialisation, pretext, seed, label fraction, backbone, checkpoint digests, lr, batch,
  epochs, iterations, image size), tags (stage, bundle, version, git commit, ``run_tags``, and
  ``mlflow.parentRunId`` when ``parent_run_id`` is set), the mean loss and lr per epoch (step = epoch, like the
  validation metrics), and at the end the artifacts: executed config, settings, history, plots, metrics;
* keeps one executed-config file per run under torchrun (MONAI writes one per rank) and finds it whatever form
  ``--output_dir`` takes (MONAI's artifact path is broken for a literal path);
* draws the run's plots at the end (:func:`~tpp_monai.tracking.plots.run_plots`): training curves, ROC and
  confusion matrix.

Only rank 0 writes or logs anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

from ignite.engine import Engine, Events

from tpp_monai import __version__
from tpp_monai.handlers import HistoryWriter, is_rank0
from tpp_monai.tracking.plots import run_plots

logger = logging.getLogger(__name__)

CONFIG_NAME = re.compile(r"config_\d{8}_\d{6}\.json")
#: files of a run folder logged as MLflow artifacts when they exist (plots: every PNG of the folder)
ARTIFACTS = ("settings.json", "history.csv", "metrics.json", "metrics.csv", "predictions.csv")


@lru_cache(maxsize=16)
def file_sha256(path: str) -> str:
    """SHA-256 of a file's bytes, or of a folder's files (the TPP stage's target folder: each file's relative name
    and digest, in name order); ``"none"`` for neither."""
    p = Path(str(path))
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        if not files:
            return "none"
        lines = "".join(f"{f.relative_to(p).as_posix()} {file_sha256(str(f))}\n" for f in files)
        return hashlib.sha256(lines.encode()).hexdigest()
    if not p.is_file():
        return "none"
    digest = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the ``tpp_monai`` checkout, when it is a git work tree."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10, check=False)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _is_none(value: object) -> bool:
    return value is None or str(value).lower() in ("", "none", "null")


def run_params(settings: Mapping, run_info: Mapping | None = None, trainer: Engine | None = None) -> dict:
    """The params of a run from its settings (``settings.json``; for an evaluation, those of the fine-tuning run
    that made the model, overlaid by the model's ``run_info``); values as MLflow stores them (strings). A training
    run's epochs and iterations are those it runs (``trainer``), whatever the recipe's iteration count."""
    s = {**{k: v for k, v in settings.items() if v is not None}, **dict(run_info or {})}
    tpp_ckpt = s.get("tpp_ckpt")
    backbone_ckpt = s.get("backbone_ckpt")
    epochs, iterations = s.get("epochs"), s.get("iterations")
    if trainer is not None:
        epochs = trainer.state.max_epochs
        iterations = int(epochs) * int(trainer.state.epoch_length or 0) or iterations
    params = {
        "dataset": s.get("dataset_name", s.get("dataset")),
        "method": s.get("method"),
        "method_options": json.dumps(s.get("method_options") or {}, sort_keys=True),
        "init": "random" if _is_none(tpp_ckpt) else "tpp",
        "pretext": s.get("pretext") or s.get("tpp_pretext"),
        "seed": s.get("seed"),
        "label_fraction": 1.0 if s.get("label_fraction") is None else s.get("label_fraction"),
        "backbone": s.get("backbone"),
        "backbone_ckpt_sha256": "none" if _is_none(backbone_ckpt) else file_sha256(str(backbone_ckpt)),
        "tpp_ckpt_sha256": "none" if _is_none(tpp_ckpt) else file_sha256(str(tpp_ckpt)),
        "lr": s.get("lr"),
        "batch_size": s.get("batch_size"),
        "epochs": epochs,
        "iterations": iterations,
        "image_size": s.get("image_size"),
    }
    return {k: str(v)[:6000] for k, v in params.items() if v is not None}


class RunTracker:
    """TensorBoard, MLflow and plots of one run (see the module docstring).

    Args:
        output_dir: the run folder.
        stage: ``pretrain_tpp``, ``finetune`` or ``evaluate`` (an MLflow tag).
        bundle: the bundle's folder (its name is an MLflow tag).
        settings: the run's settings; default: ``<output_dir>/settings.json`` (written when the run starts).
        loader: the evaluation's checkpoint loader, whose ``run_info`` tells how the model was trained.
        validator: the validation engine of a training run (its metrics go to TensorBoard).
        run_tags: extra MLflow tags (a dict, or its JSON text).
        parent_run_id: MLflow run to nest this run under.
        config_path: ``@save_execute_config`` (the executed config MONAI exports under ``--tracking``).
        tensorboard: write TensorBoard event files into ``output_dir``.
    """

    def __init__(
        self, output_dir: str | Path, stage: str, bundle: str | None = None, settings: Mapping | None = None,
        loader: object = None, validator: Engine | None = None, run_tags: Mapping | str | None = None,
        parent_run_id: str | None = None, config_path: object = None, tensorboard: bool = True,
    ) -> None:  # fmt: skip
        self.output_dir, self.stage = Path(output_dir), stage
        self.bundle = Path(str(bundle)).name if bundle else None
        self.settings, self.loader, self.validator = settings, loader, validator
        self.run_tags = json.loads(run_tags) if isinstance(run_tags, str) else dict(run_tags or {})
        self.parent_run_id = None if _is_none(parent_run_id) else str(parent_run_id)
        self.config_path = config_path
        self.tensorboard = bool(tensorboard)
        self.mlflow = None  # MONAI's MLFlowHandler on this engine, under --tracking mlflow

    # -- attaching ------------------------------------------------------------------------------------------------

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self._completed)
        if self.tensorboard and is_rank0():
            self._attach_tensorboard(engine)

    def _attach_tensorboard(self, engine: Engine) -> None:
        from monai.handlers import TensorBoardStatsHandler, from_engine

        self.output_dir.mkdir(parents=True, exist_ok=True)
        trainer_tb = TensorBoardStatsHandler(log_dir=str(self.output_dir), tag_name="train_loss", epoch_log=False,
                                             output_transform=from_engine(["loss"], first=True))  # fmt: skip
        trainer_tb.attach(engine)
        engine.add_event_handler(Events.COMPLETED, lambda _: trainer_tb._writer.flush())
        if self.validator is not None:
            # the trainer's epoch is the validator's epoch (ValidationHandler runs it with the global epoch)
            TensorBoardStatsHandler(summary_writer=trainer_tb._writer, iteration_log=False).attach(self.validator)

    # -- events ---------------------------------------------------------------------------------------------------

    def _started(self, engine: Engine) -> None:
        self._keep_one_config()
        if not is_rank0():
            return
        self.mlflow = _find_mlflow_handler(engine)
        if self.mlflow is None:
            return
        self.mlflow.start(engine)  # idempotent; makes the run now so its params and tags can be set
        from mlflow.entities import Param, RunTag

        run_id = self.mlflow.cur_run.info.run_id
        params = run_params(self._settings(), getattr(self.loader, "run_info", None),
                            None if self.stage == "evaluate" else engine)  # fmt: skip
        logged = self.mlflow.client.get_run(run_id).data.params
        self.mlflow.client.log_batch(run_id, params=[Param(k, v) for k, v in params.items() if k not in logged])
        tags = {"stage": self.stage, "tpp_monai_version": __version__,
                **({"bundle": self.bundle} if self.bundle else {}),
                **({"git_commit": git_commit()} if git_commit() else {}),
                **{str(k): str(v) for k, v in self.run_tags.items()}}  # fmt: skip
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        self.mlflow.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def _epoch_completed(self, engine: Engine) -> None:
        if self.mlflow is None or self.mlflow.cur_run is None or self.stage == "evaluate":
            return
        rows = [r for r in HistoryWriter.read(self.output_dir / "history.csv") if int(r["epoch"]) == engine.state.epoch]
        if rows:  # the epoch's mean loss and lr on the epoch axis of the validation metrics
            values = {f"epoch_{k}": float(v) for k, v in rows[-1].items() if k in ("train_loss", "lr") and v != ""}
            for key, value in values.items():
                self.mlflow.client.log_metric(self.mlflow.cur_run.info.run_id, key, value, step=engine.state.epoch)

    def _completed(self, engine: Engine) -> None:
        if not is_rank0():
            return
        try:
            run_plots(self.output_dir)
        except Exception as exc:  # a plot must never fail the run it describes
            logger.warning("plots of %s not drawn: %s", self.output_dir, exc)
        if self.mlflow is None or self.mlflow.cur_run is None:
            return
        run_id = self.mlflow.cur_run.info.run_id
        files = [self.output_dir / name for name in ARTIFACTS] + sorted(self.output_dir.glob("*.png"))
        config = self._config_file()
        for path in ([config] if config else []) + [p for p in files if p.is_file()]:
            self.mlflow.client.log_artifact(run_id, str(path))

    # -- helpers --------------------------------------------------------------------------------------------------

    def _settings(self) -> dict:
        """The given settings, else this run's ``settings.json``, else (evaluation) the fine-tuning run's."""
        if self.settings is not None:
            return dict(self.settings)
        trained_in = (getattr(self.loader, "run_info", None) or {}).get("finetune_dir")
        for folder in (self.output_dir, Path(str(trained_in)) if trained_in else None):
            if folder is not None and (folder / "settings.json").is_file():
                return json.loads((folder / "settings.json").read_text())
        return {}

    def _config_file(self) -> Path | None:
        """This process's executed-config file: MONAI sets ``save_execute_config`` to ``<output_dir> +
        '/config_<time>.json'``, an expression only when ``output_dir`` is one; the name is taken either way."""
        match = CONFIG_NAME.search(str(self.config_path or ""))
        path = self.output_dir / match.group(0) if match else None
        return path if path is not None and path.is_file() else None

    def _keep_one_config(self) -> None:
        """Under torchrun every rank exports the executed config (to a name with its own time stamp): the ranks
        whose file is not rank 0's remove theirs."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        mine = self._config_file()
        names: list = [None] * dist.get_world_size()
        dist.all_gather_object(names, mine.name if mine else None)
        if mine is not None and dist.get_rank() > 0 and mine.name != names[0]:
            mine.unlink(missing_ok=True)


def _find_mlflow_handler(engine: Engine) -> object | None:
    """The ``MLFlowHandler`` MONAI's ``--tracking mlflow`` attached to ``engine``, if any."""
    from monai.handlers import MLFlowHandler

    for handler, *_ in engine._event_handlers.get(Events.STARTED, []):
        owner = getattr(handler, "__self__", None)
        if isinstance(owner, MLFlowHandler):
            return owner
    return None
