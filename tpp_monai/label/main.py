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
import math
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
from tpp_monai.label.app_conf import (
    DEFAULT_PUBLISH_MARGIN,
    bundle_specs,
    class_names,
    label_values,
    number_conf,
    output_kind,
    spatial_dims,
)
from tpp_monai.label.datastore import SERVED_EXTENSIONS, ConfinedDatastore, StudyRules
from tpp_monai.label.files import DEFAULT_MAX_PIXELS, read_image
from tpp_monai.label.guard import (
    DEFAULT_MAX_UPLOAD_MB,
    RequestRefused,
    check_name,
    confined,
    refuse_expressions,
)
from tpp_monai.label.infer_task import TppInferTask
from tpp_monai.label.routes import RoutePolicy, open_groups
from tpp_monai.label.server import install
from tpp_monai.label.train_task import TppTrainTask

logger = logging.getLogger(__name__)


class TppApp(MONAILabelApp):
    """One inference and one training task per bundle named in ``--conf models``.

    Requests are checked before MONAI Label runs them (see :mod:`tpp_monai.label.server`): routes the app does not
    serve are refused (``--conf open_routes`` opens groups of them), ``/infer`` and ``/train`` take only their
    listed parameters, no value is a config expression, an image is one of the studies folder's (or the request's
    own upload), decodes in full and fits the model's dimension, uploads are at most ``--conf max_upload_mb``
    (default ``guard.DEFAULT_MAX_UPLOAD_MB``) and images at most ``--conf max_image_pixels``, and the datastore
    checks every image and label before storing it and keeps every read and write inside the studies folder.
    """

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.specs = bundle_specs(conf)
        self.max_upload_mb = number_conf(conf, "max_upload_mb", DEFAULT_MAX_UPLOAD_MB, low=0)
        self.max_pixels = int(number_conf(conf, "max_image_pixels", DEFAULT_MAX_PIXELS, low=1))
        number_conf(conf, "publish_margin", DEFAULT_PUBLISH_MARGIN)  # read by each training task; checked here
        self.policy = RoutePolicy(open_groups(conf.get("open_routes")), settings.MONAI_LABEL_API_STR)
        self._checked_images: dict[str, tuple[float, int]] = {}
        from PIL import Image

        # PIL refuses images over 2 * MAX_IMAGE_PIXELS when it opens them: at this server's limit, not below it.
        Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, math.ceil(self.max_pixels / 2))
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="tpp-monai bundles",
            description="Target Parameter Pre-training (TPP) PEFT bundles: " + ", ".join(self.specs),
            version=tpp_monai.__version__,
        )

    def study_rules(self) -> StudyRules:
        """What labels and class values the served bundles accept, for the datastore's checks on arrival."""
        values: dict[int, set[int]] = {}
        described: dict[int, list[str]] = {}
        classes: set[str] = set()
        class_text = []
        for name, spec in self.specs.items():
            metadata = spec.metadata()
            names, dims = class_names(metadata), spatial_dims(metadata)
            if output_kind(metadata) == "classification":
                classes |= {n.lower() for n in names} | {str(i) for i in range(len(names))}
                class_text.append(f"{name}: " + ", ".join(f"{i} {n}" for i, n in enumerate(names)))
                continue
            allowed = label_values(metadata)
            values.setdefault(dims, set()).update(allowed)
            shown = ["background", *names] if len(names) == 1 else names
            described.setdefault(dims, []).append(f"{name}: " + ", ".join(f"{v} {n}" for v, n in zip(allowed, shown)))
        return StudyRules(
            label_values={d: sorted(v) for d, v in values.items()},
            label_classes={d: "; ".join(t) for d, t in described.items()},
            classes=frozenset(classes),
            class_names="; ".join(class_text),
            max_pixels=self.max_pixels,
        )

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        return ConfinedDatastore(
            self.studies,
            rules=self.study_rules(),
            extensions=SERVED_EXTENSIONS,
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

            install(api, self._check_endpoint, int(self.max_upload_mb * 1024 * 1024), self.policy,
                    bool(settings.MONAI_LABEL_AUTH_ENABLE))  # fmt: skip

    def _check_endpoint(self, kind: str, model: str, query: dict[str, str], params: dict[str, Any]) -> None:
        """A request as the client sent it: ``infer`` (``params``: the form's params and upload field names),
        ``train`` (one model), ``train_all`` (``POST /train/``: every model), ``model_upload`` (``params["file"]``)."""
        if kind == "infer":
            task = self._infer_task(model)
            task.check_params(params["params"])
            if "label" in params["uploads"]:
                raise RequestRefused(f"/infer/{model}: the model takes no label input; send the image only")
            if query.get("session_id") and "sessions" not in self.policy.opened:
                raise RequestRefused("sessions are not served here (--conf open_routes sessions opens them)", 403)
            if query.get("output") == "dicom_seg":
                raise RequestRefused("output=dicom_seg needs a DICOMweb datastore; use output=image, json or all")
            if not (query.get("image") or query.get("session_id") or "file" in params["uploads"]):
                raise RequestRefused(f"/infer/{model}: name an image (?image=<id>) or upload one (form field 'file')")
            if query.get("image") and "file" not in params["uploads"]:
                self._image_path(task, query["image"])
        elif kind == "train":
            self._train_task(model).check_params(params)
        elif kind == "train_all":
            self._check_train_all(params)
        elif kind == "model_upload":
            self._infer_task(model).check_model_upload(params["file"])
        else:
            raise RequestRefused(f"unexpected request kind {kind!r}", 500)

    def _check_train_all(self, params: dict[str, Any]) -> None:
        """``POST /train/``: MONAI Label trains every model; a key naming a model holds that model's parameters
        (OHIF sends them so), any other key goes to every model (MONAILabelClient's ``client_id``)."""
        shared = {k: v for k, v in params.items() if k not in self._trainers}
        for name, task in self._trainers.items():
            own = params.get(name, {})
            if not isinstance(own, dict):
                raise RequestRefused(f"/train/ params[{name!r}] must be an object of {name}'s parameters")
            task.check_params({**own, **shared})

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
        dimension and decoded in full (once per file version)."""
        if os.path.isabs(image) and os.path.dirname(image) == tempfile.gettempdir() and os.path.isfile(image):
            path, name = image, "the uploaded image"  # MONAI Label's /infer saved the request's uploaded file here
        elif session and os.path.isabs(image) and self.sessions() is not None:
            path, name = confined("session image", image, [self.sessions().store_path]), "the session's image"
        else:
            path, name = self.datastore().get_image_uri(check_name("image", image)), f"image {image!r}"
            if not path:
                raise RequestRefused(f"image {image!r} is not in the studies folder ({self.studies})", 404)
        task.check_image(path, image)
        stat = os.stat(path)
        if self._checked_images.get(path) != (stat.st_mtime, stat.st_size):
            read_image(path, name, self.max_pixels)
            self._checked_images[path] = (stat.st_mtime, stat.st_size)
        return path

    def infer(self, request: dict[str, Any], datastore: Any = None) -> dict[str, Any]:
        refuse_expressions(request, "infer request")
        task = self._infer_task(request.get("model"))
        if isinstance(request.get("image"), str):
            # MONAI Label reads an existing path as given: hand it the checked file, never the id itself.
            request = {
                **request,
                "image": self._image_path(task, request["image"], session=bool(request.get("session"))),
            }
        task.check_model_filename(request.get("model_filename"))
        return super().infer(request, datastore)

    def train(self, request: dict[str, Any]) -> dict[str, Any]:
        # POST /train/ (every model) leaves each model's parameter object in every model's request: already
        # checked at the endpoint and merged into this model's request by MONAI Label.
        request = {k: v for k, v in request.items() if not (k in self._trainers and isinstance(v, dict))}
        self._train_task(request.get("model")).check_request(request)
        return super().train(request)
