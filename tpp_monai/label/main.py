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

from monailabel.config import settings
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.utils.others.generic import strtobool

import tpp_monai
from tpp_monai.label.app_conf import bundle_specs
from tpp_monai.label.bundle_tasks import TppInferTask, TppTrainTask

logger = logging.getLogger(__name__)

# 2D formats of the project's datasets that MONAI Label's default list lacks (GlaS is .bmp, Chest X-ray .jpeg).
EXTRA_EXTENSIONS = ["*.bmp", "*.jpeg", "*.tiff"]


class TppApp(MONAILabelApp):
    """One inference and one training task per bundle named in ``--conf models``."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.specs = bundle_specs(conf)
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
        return LocalDatastore(
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
