"""MONAI Label app serving this project's bundles: inference through ``configs/inference.json``, training through
``configs/finetune.json`` (run id ``finetune``).

Start it from the MONAI Label environment (``python -m tpp_monai.label.environment`` creates ``.venv-monailabel``;
the ``monailabel`` launcher runs the ``python`` found on ``PATH``, hence the activation)::

    source .venv-monailabel/bin/activate
    monailabel start_server --app tpp_monai/label --studies <images folder> \\
        --conf models glas_adapter,mhist_adapter,lits_conv_adapter [--conf ckpt_dir DIR] [--conf overlays demo]

(or, without activating: ``.venv-monailabel/bin/python -m monailabel.main start_server ...``).

The ``--conf`` keys are described in :mod:`tpp_monai.label.app_conf`. Each bundle serves ``<ckpt_dir>/<bundle>/
model.pt`` (default: the bundle's ``models/model.pt``, where ``finetune`` saves by default): a bundle without one
has no ``/infer`` model until the server restarts after a ``/train``. The server starts offline: bundles are local
folders, and MONAI Label's model-zoo lookup (``get_bundle_models``, which lists the zoo over the network even for
local bundles) is not used.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.utils.others.generic import strtobool

import tpp_monai
from tpp_monai.label.app_conf import bundle_specs
from tpp_monai.label.bundle_tasks import TppInferTask, TppTrainTask
from tpp_monai.label.guard import (
    DEFAULT_MAX_UPLOAD_MB,
    RequestRefused,
    check_name,
    confined,
    refuse_expressions,
)
from tpp_monai.label.server import ConfinedDatastore, install

logger = logging.getLogger(__name__)

# 2D formats of the project's datasets that MONAI Label's default list lacks (GlaS is .bmp, Chest X-ray .jpeg).
EXTRA_EXTENSIONS = ["*.bmp", "*.jpeg", "*.tiff"]


class TppApp(MONAILabelApp):
    """One inference and one training task per bundle named in ``--conf models``.

    Requests are checked before MONAI Label runs them (see :mod:`tpp_monai.label.guard`): ``/infer`` and
    ``/train`` take only their listed parameters, no value is a config expression, an image is one of the studies
    folder's (or the request's own upload) and fits the model's dimension, uploads are at most ``--conf
    max_upload_mb`` (default ``guard.DEFAULT_MAX_UPLOAD_MB``), and the datastore keeps every write inside the studies
    folder.
    """

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.specs = bundle_specs(conf)
        try:
            self.max_upload_mb = float(conf.get("max_upload_mb", DEFAULT_MAX_UPLOAD_MB))
        except ValueError:
            raise ValueError(f"--conf max_upload_mb {conf['max_upload_mb']!r} is not a number of megabytes") from None
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="tpp-monai bundles",
            description="Target Parameter Pre-training (TPP) PEFT bundles: " + ", ".join(self.specs),
            version=tpp_monai.__version__,
        )

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        extensions = list(settings.MONAI_LABEL_DATASTORE_FILE_EXT)
        extensions += [e for e in EXTRA_EXTENSIONS if e not in extensions]
        return ConfinedDatastore(
            self.studies,
            extensions=extensions,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self) -> dict[str, InferTask]:
        infers: dict[str, InferTask] = {}
        for name, spec in self.specs.items():
            task = TppInferTask(spec, self.conf)
            if task.is_valid():
                infers[name] = task
            else:
                logger.warning("%s: no model at %s; /infer/%s needs a fine-tuned model.pt", name, spec.model_path, name)
        return infers

    def init_trainers(self) -> dict[str, TrainTask]:
        if strtobool(self.conf.get("skip_trainers", "false")):
            return {}
        trainers: dict[str, TrainTask] = {}
        for name, spec in self.specs.items():
            task = TppTrainTask(spec, self.conf)
            if task.is_valid():
                trainers[name] = task
        return trainers

    # ----------------------------------------------------------------------------------------------------------
    # Request checks

    def server_mode(self, mode: bool) -> None:
        """MONAI Label's server calls this once the app exists: the moment to guard its endpoints."""
        super().server_mode(mode)
        if mode:
            from monailabel.app import app as api

            install(api, self._check_endpoint, int(self.max_upload_mb * 1024 * 1024), settings.MONAI_LABEL_API_STR)

    def _check_endpoint(self, kind: str, model: str, query: dict[str, str], params: dict[str, Any]) -> None:
        """``POST /infer/<model>``, ``/train/<model>`` or ``/train/`` (all models) as the client sent it."""
        if kind == "infer":
            task = self._infer_task(model)
            task.check_params(params)
            if query.get("image"):
                self._image_path(task, query["image"])
        elif model:
            self._train_task(model).check_params(params)
        else:  # MONAI Label merges every model's parameters into each request; deprecated upstream
            raise RequestRefused("POST /train/ (all models) is not served; train one model: POST /train/<model>")

    def _infer_task(self, model: Any) -> TppInferTask:
        task = self._infers.get(model) if isinstance(model, str) else None
        if task is None:
            known = ", ".join(sorted(self._infers)) or "none (no bundle has a model.pt yet)"
            raise RequestRefused(f"there is no model {model!r} to infer with; models: {known}", 404)
        return task  # type: ignore[return-value]

    def _train_task(self, model: Any) -> TppTrainTask:
        task = self._trainers.get(model) if isinstance(model, str) else None
        if task is None:
            known = ", ".join(sorted(self._trainers))
            raise RequestRefused(f"there is no model {model!r} to train; models: {known}", 404)
        return task  # type: ignore[return-value]

    def _image_path(self, task: TppInferTask, image: str, session: bool = False) -> str:
        """The file of a studies image id (or of this request's upload or session), checked against the model's
        dimension."""
        if os.path.isabs(image) and os.path.dirname(image) == tempfile.gettempdir() and os.path.isfile(image):
            path = image  # MONAI Label's /infer saved the request's uploaded file here
        elif session and os.path.isabs(image) and self.sessions() is not None:
            path = confined("session image", image, [self.sessions().store_path])
        else:
            path = self.datastore().get_image_uri(check_name("image", image))
            if not path:
                raise RequestRefused(f"image {image!r} is not in the studies folder ({self.studies})", 404)
        task.check_image(path, image)
        return path

    def infer(self, request: dict[str, Any], datastore: Any = None) -> dict[str, Any]:
        refuse_expressions(request, "infer request")
        task = self._infer_task(request.get("model"))
        if isinstance(request.get("image"), str):
            self._image_path(task, request["image"], session=bool(request.get("session")))
        task.check_model_filename(request.get("model_filename"))
        return super().infer(request, datastore)

    def train(self, request: dict[str, Any]) -> dict[str, Any]:
        self._train_task(request.get("model")).check_request(request)
        return super().train(request)
