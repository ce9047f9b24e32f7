"""MONAI Label's ``BundleTrainTask`` configured for this project's bundles: the training workflow is
``configs/finetune.json`` run as ``finetune`` (not ``train.json`` / ``run``), overlays (``demo.json``) merge into the
configs, classification labels come from the datastore's image info rather than from label files, and a trained
model is published only when it beats the served one (``publish.json``).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import monai.bundle
import numpy as np
from monai.bundle import ConfigParser
from monai.transforms import LoadImage
from monai.utils import convert_to_numpy

from tpp_monai.compat import import_torchvision
from tpp_monai.label.app_conf import (
    CLASS_INFO_KEY,
    DEFAULT_PUBLISH_MARGIN,
    MODEL_FILE,
    BundleSpec,
    class_names,
    load_bundle_config,
    number_conf,
    output_kind,
    spatial_dims,
)
from tpp_monai.label.files import IMAGE_2D, IMAGE_3D
from tpp_monai.label.guard import (
    BOOL,
    CLIENT_ID_PARAM,
    DEVICE_PARAM,
    NAME_PARAM,
    Param,
    RequestRefused,
    check_params,
    check_scores,
    choice,
    confined,
    missing_classes,
    number,
    refuse_expressions,
    stratified_split,
)
from tpp_monai.network import FROM_MODEL_FILE

import_torchvision()  # before monailabel.tasks.infer.bundle imports torchvision.utils (see tpp_monai.compat)

from monailabel.config import settings  # noqa: E402
from monailabel.interfaces.datastore import Datastore  # noqa: E402
from monailabel.tasks.train.bundle import BundleConstants as TrainConstants  # noqa: E402
from monailabel.tasks.train.bundle import BundleTrainTask  # noqa: E402

logger = logging.getLogger(__name__)

Records = list[dict[str, Any]]
GPUS = re.compile(r"all|\d{1,2}(,\d{1,2})*")
RUN_ID = "finetune"  # our training workflow's run id (model-zoo bundles use "run")
PUBLISH_RECORD = "publish.json"  # in a /train run folder: the publishing decision and both validation scores


class FinetuneConstants(TrainConstants):
    """Our training workflow: ``configs/finetune.json``; MONAI Label's ``max_epochs`` sets ``epochs``, from which
    the config derives both ``train#trainer#max_epochs`` and the length of the learning-rate schedule."""

    def configs(self) -> Sequence[str]:
        return ["finetune.json"]

    def multi_gpu_configs(self) -> Sequence[str]:
        return ["multi_gpu.json"]  # the bundles' torchrun overlay; MONAI Label uses it only with several GPUs

    def key_train_trainer_max_epochs(self) -> str:
        return "epochs"


class TppTrainTask(BundleTrainTask):
    """``BundleTrainTask`` running ``finetune`` on the datastore's labelled images.

    Every request is a new run in its own folder, ``<runs>/monailabel/<time>/`` (the workflow's ``output_dir`` and
    ``ckpt_dir``), so the workflow's refusal to overwrite an earlier run holds. The datastore records go into its
    ``datalist.json``, read through the workflow's own ``datalist``/``dataset_dir`` settings, so the ``initialize``
    checks run as on the command line. Segmentation takes the final labels of MONAI Label's label store (2D
    bundles the 2D images, 3D bundles the volumes); classification takes the class in each image's info
    (``PUT /datastore/image/info`` with ``{"class": "<name or index>"}``). The run continues from the served model
    when ``pretrained`` (the default) and it exists; it validates every epoch, and when it ends its best model
    replaces the served one (atomically; inference reloads it on its next request) only if every validation score
    is finite and the best is no worse than the served model's on the same validation images, by at most ``--conf
    publish_margin`` (the served model is validated by the bundle's own evaluator first). Otherwise the served model
    stays, the job ends in ERROR with the reason as its last log line, and ``publish.json`` in the run folder (shown
    in ``/info/``'s ``train_stats``) records both scores. Its training set must hold every class (classification:
    split per class; segmentation: some training mask shows each class).
    """

    def __init__(self, spec: BundleSpec, conf: Mapping[str, str]) -> None:
        self.spec = spec
        metadata = spec.metadata()
        self.kind, self.dims, self.classes = output_kind(metadata), spatial_dims(metadata), class_names(metadata)
        self.runs_root = os.path.join(spec.runs_root(), "monailabel")
        self.margin = number_conf(conf, "publish_margin", DEFAULT_PUBLISH_MARGIN)
        self.run_dir = ""
        self._request: dict[str, Any] = {}
        self._validation_overrides: dict[str, Any] = {}
        super().__init__(spec.path, dict(conf), const=FinetuneConstants(), load_strict=True)

    def _load_bundle_config(self, path: str, config: str) -> ConfigParser:
        return load_bundle_config(self.spec, config)

    def config(self) -> dict[str, Any]:
        options = super().config()
        options["run_id"] = RUN_ID
        options["model_filename"] = [MODEL_FILE]
        return options

    def accepted_params(self) -> dict[str, Param]:
        """The ``/train`` parameters a client may send, with their types and ranges. Checkpoint paths must be
        ``none`` or files inside this bundle's own folders (bundle, fine-tuned models, runs)."""
        own = Param((str,), "'none' or a file inside this bundle's folders", self._own_checkpoint)
        return {
            "device": DEVICE_PARAM,
            "pretrained": BOOL,
            "max_epochs": number(int, 1, 10000),
            "val_split": number(float, 0, 1, high_open=True),
            "multi_gpu": BOOL,
            "force_multi_gpu": BOOL,
            "gpus": Param((str,), "'all' or comma-separated GPU indices", lambda v: bool(GPUS.fullmatch(v))),
            "tracking": choice(("None", "none", "mlflow", "")),
            "tracking_uri": choice(("", settings.MONAI_LABEL_TRACKING_URI), "this server's MLflow URI (or empty)"),
            "tracking_experiment_name": NAME_PARAM,
            "tracking_run_name": NAME_PARAM,
            "run_id": choice(("", RUN_ID)),
            "model_filename": choice((MODEL_FILE,)),
            "backbone_ckpt": own,
            "tpp_ckpt": own,
            "client_id": CLIENT_ID_PARAM,
        }

    def _own_checkpoint(self, value: str) -> bool:
        if value.lower() == "none":
            return True
        try:
            confined("checkpoint", value, [self.spec.path, self.spec.ckpt_dir, self.spec.runs_root()])
        except RequestRefused:
            return False
        return os.path.isfile(value)

    def check_params(self, params: Mapping[str, Any]) -> None:
        """A client's ``/train`` parameters (as the endpoint receives them)."""
        check_params(params, self.accepted_params(), f"/train/{self.spec.name} params")

    def check_request(self, request: Mapping[str, Any]) -> None:
        """The whole request MONAI Label hands the task: the client's parameters plus what its server adds (the
        model, its bundle folder, the process's ``local_rank``)."""
        if request.get("model") != self.spec.name or request.get("bundle_path", self.spec.path) != self.spec.path:
            raise RequestRefused(f"/train/{self.spec.name}: the request names another model or bundle folder")
        check_params({"local_rank": request.get("local_rank", 0)}, {"local_rank": number(int, 0, 1024)}, "request")
        self.check_params({k: v for k, v in request.items() if k not in ("model", "bundle_path", "local_rank")})

    def stats(self) -> dict[str, Any]:
        """The last epoch of the latest ``/train`` run (``history.csv``) and the served model's time stamp."""
        out: dict[str, Any] = {}
        runs = sorted(Path(self.runs_root).glob("*/history.csv")) if os.path.isdir(self.runs_root) else []
        if runs:
            history = runs[-1]
            out["run"] = history.parent.name
            with history.open(newline="") as f:
                rows = list(csv.DictReader(f))
            if rows:
                out["last_epoch"] = rows[-1]
            decision = history.parent / PUBLISH_RECORD
            if decision.is_file():
                out["publish"] = json.loads(decision.read_text())
        if os.path.isfile(self.spec.model_path):
            out["model_mtime"] = os.path.getmtime(self.spec.model_path)
        return out

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        self.check_request(request)
        request = dict(request)
        request["run_id"] = request.get("run_id") or RUN_ID
        name = request.get("model_filename") or MODEL_FILE
        name = name if isinstance(name, str) else name[0]
        # BundleTrainTask looks for the model to continue from at <bundle>/models/<name>; absolute -> ours.
        request["model_filename"] = os.path.join(self.spec.ckpt_dir, os.path.basename(name))
        self._request = request
        self.run_dir = self._new_run_dir()
        try:
            result = super().__call__(request, datastore)
        except Exception:
            with contextlib.suppress(OSError):
                os.rmdir(self.run_dir)  # only when nothing was written (e.g. no labelled images)
            raise
        self._publish(os.path.join(self.run_dir, "models", MODEL_FILE))
        return result

    def _load_checkpoint(self, model_pytorch, pretrained, train_handlers) -> None:
        """MONAI Label's loader of the served model, given a logger of its own: unnamed, it logs through the engine's
        ``ignite`` logger, which the bundles' logging.conf keeps at WARNING, and "Restored all variables" is lost."""
        super()._load_checkpoint(model_pytorch, pretrained, train_handlers)
        for handler in train_handlers:
            if isinstance(handler, dict) and handler.get("_target_") == "CheckpointLoader":
                handler.setdefault("name", "CheckpointLoader")

    def _new_run_dir(self) -> str:
        stamp, n = time.strftime("%Y%m%d_%H%M%S"), 0
        while os.path.exists(path := os.path.join(self.runs_root, stamp + (f"_{n}" if n else ""))):
            n += 1
        os.makedirs(path)
        return path

    def _publish(self, model: str) -> None:
        """Replace the served model by the run's best one (copy + rename: inference never reads a partial file),
        provided every validation score of the run is finite and the best is at least the served model's (on the
        same validation images) minus the margin; the decision goes to ``publish.json`` and the log."""
        if not os.path.isfile(model):
            raise RuntimeError(f"{self.spec.name}: the run in {self.run_dir} finished without a best model ({model})")
        key = next(iter(self.bundle_config.get("validate#key_metric")))
        decision: dict[str, Any] = {"key": key, "margin": self.margin, "published": False}
        try:
            decision["score"] = score = check_scores(os.path.join(self.run_dir, "history.csv"), key)
            served = self._served_score(key) if os.path.isfile(self.spec.model_path) else None
            decision["served_score"] = served
            logger.info("%s: best %s %.4f; served model %s", self.spec.name, key, score,
                        "none" if served is None else f"{served:.4f}")  # fmt: skip
            if served is not None and math.isfinite(served) and score < served - self.margin:
                raise RequestRefused(
                    f"{self.spec.name}: the new model is not published, the served model stays: its best {key} "
                    f"{score:.4f} is below the served model's {served:.4f} on the same validation images minus the "
                    f"margin {self.margin:g} (--conf publish_margin)",
                    422,
                )
        except RequestRefused as err:
            decision["reason"] = str(err)
            self._record(decision)
            logger.error("%s", err)
            raise
        os.makedirs(self.spec.ckpt_dir, exist_ok=True)
        partial = self.spec.model_path + ".partial"
        shutil.copyfile(model, partial)
        os.replace(partial, self.spec.model_path)
        decision["published"] = True
        self._record(decision)
        logger.info("%s: served model updated from %s", self.spec.name, model)

    def _record(self, decision: dict[str, Any]) -> None:
        with open(os.path.join(self.run_dir, PUBLISH_RECORD), "w", encoding="utf-8") as f:
            json.dump(decision, f, indent=1)

    def _served_score(self, key: str) -> float:
        """The served model's ``key`` on this run's validation images, by the bundle's own validation evaluator
        (without its best-model saver: nothing is written)."""
        from monai.handlers import CheckpointLoader

        parser = load_bundle_config(self.spec, self.bundle_config_path)
        parser.update(self._validation_overrides)
        parser["validate#handlers"] = []
        evaluator = parser.get_parsed_content("validate#evaluator")
        network = parser.get_parsed_content("network_def")
        CheckpointLoader(self.spec.model_path, {"model": network}, name="ServedModelLoader", strict=True,
                         map_location=parser.get_parsed_content("device")).attach(evaluator)  # fmt: skip
        evaluator.run()
        return float(evaluator.state.metrics[key])

    def _fetch_datalist(self, request: Mapping[str, Any], datastore: Datastore) -> list[dict[str, Any]]:
        if self.kind == "classification":
            return self._class_records(datastore)
        suffixes = IMAGE_2D if self.dims == 2 else IMAGE_3D
        records = [
            {"image": d["image"], "label": d["label"]}
            for d in datastore.datalist()
            if d and d.get("label") and str(d["image"]).lower().endswith(suffixes)
        ]
        if not records:
            raise ValueError(f"{self.spec.name}: no {self.dims}D image in the datastore has a final label to train on")
        return records

    def _class_records(self, datastore: Datastore) -> list[dict[str, Any]]:
        lookup = {c.lower(): i for i, c in enumerate(self.classes)} | {str(i): i for i in range(len(self.classes))}
        records = []
        for image_id in datastore.list_images():
            value = datastore.get_image_info(image_id).get(CLASS_INFO_KEY)
            if value is None:
                continue
            index = lookup.get(str(value).strip().lower())
            if index is None:
                raise ValueError(f"image {image_id}: class {value!r} is not one of {self.classes} ({self.spec.name})")
            records.append({"image": datastore.get_image_uri(image_id), "label": index})
        if not records:
            raise ValueError(
                f"{self.spec.name}: no image has a class; set one with PUT /datastore/image/info?image=<id> and "
                f'info {{"{CLASS_INFO_KEY}": "<one of {self.classes}>"}}'
            )
        return records

    def _partition_datalist(self, datalist: Records, request: Mapping[str, Any],
                            shuffle: bool = False) -> tuple[Records, Records | None]:  # fmt: skip
        """Classification: a split per class (:func:`~tpp_monai.label.guard.stratified_split`). Segmentation:
        MONAI Label's split, refused unless the training masks hold every foreground class."""
        val_split = float(request.get("val_split", 0.2))
        if self.kind == "classification":
            return stratified_split(datalist, self.classes, val_split)
        train, val = super()._partition_datalist(datalist, request, shuffle)
        foreground = self.classes if len(self.classes) == 1 else self.classes[1:]
        values = set()
        for rec in train:
            values |= {int(v) for v in np.unique(convert_to_numpy(LoadImage(image_only=True)(rec["label"])))}
        missing = missing_classes({v - 1 for v in values if v > 0}, foreground)
        if missing:
            raise RequestRefused(
                f"{self.spec.name}: no training mask holds class {', '.join(missing)} (values found: "
                f"{sorted(values)}); label images showing every class before training"
            )
        return train, val

    def _update_overrides(self, overrides: dict[str, Any]) -> dict[str, Any]:
        train = overrides.pop(self.const.key_train_dataset_data())
        val = overrides.pop(self.const.key_validate_dataset_data(), None)
        if not val:  # no held-out split (val_split <= 0 or too few images): validate on the training images
            logger.warning("%s: no validation images; selecting the best model on the training images", self.spec.name)
            val = train
        datalist = os.path.join(self.run_dir, "datalist.json")
        with open(datalist, "w", encoding="utf-8") as f:
            json.dump({"training": train, "validation": val}, f, indent=1)
        overrides.update(self.spec.path_overrides())
        overrides.update(
            datalist=datalist,
            dataset_dir=self.run_dir,
            output_dir=self.run_dir,
            ckpt_dir=os.path.join(self.run_dir, "models"),
            val_interval=1,  # every epoch's score in history.csv: _publish checks them before the model is served
        )
        continues = bool(self._request.get("pretrained", True)) and os.path.isfile(self._request["model_filename"])
        if continues:  # the served model holds every weight: no backbone or TPP file is needed to build it
            overrides.update(backbone_ckpt=FROM_MODEL_FILE, tpp_ckpt="none")
        for key in ("backbone_ckpt", "tpp_ckpt"):  # or as the request says
            if self._request.get(key):
                overrides[key] = self._request[key]
        served = os.path.join(self.run_dir, "served_model_validation")
        self._validation_overrides = {
            **{k: overrides[k] for k in (self.const.key_device(), "datalist", "dataset_dir") if k in overrides},
            "output_dir": served,
            "ckpt_dir": served,
            "backbone_ckpt": FROM_MODEL_FILE,
            "tpp_ckpt": "none",
        }
        return overrides

    def run_single_gpu(self, request: Mapping[str, Any], overrides: dict[str, Any]) -> None:
        # The last gate before the config parser: only MONAI Label's own handler list may hold expressions.
        refuse_expressions({k: v for k, v in overrides.items() if k != self.const.key_train_handlers()}, "overrides")
        monai.bundle.run(
            run_id=request.get("run_id") or RUN_ID,
            init_id=None,
            final_id=None,
            meta_file=self.bundle_metadata_path,
            config_file=[self.bundle_config_path, *self.spec.overlays],
            **overrides,
        )
