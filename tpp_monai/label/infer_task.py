"""MONAI Label's ``BundleInferTask`` configured for this project's bundles: the fine-tuned model can live outside
``<bundle>/models``, overlays (``demo.json``) merge into the configs, 2D arrays are ``(C, H, W)``, and every request
value is checked before anything runs (:mod:`tpp_monai.label.guard`).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.bundle import ConfigParser
from monai.transforms import MapTransform
from monai.utils import convert_to_numpy

from tpp_monai.compat import import_torchvision
from tpp_monai.label.app_conf import (
    MODEL_FILE,
    BundleSpec,
    class_names,
    load_bundle_config,
    output_kind,
    spatial_dims,
)
from tpp_monai.label.files import IMAGE_2D, IMAGE_3D
from tpp_monai.label.guard import (
    BOOL,
    CLIENT_ID_PARAM,
    DEVICE_PARAM,
    Param,
    RequestRefused,
    check_params,
    choice,
)

import_torchvision()  # before monailabel.tasks.infer.bundle imports torchvision.utils (see tpp_monai.compat)

from monailabel.tasks.infer.bundle import BundleConstants as InferConstants  # noqa: E402
from monailabel.tasks.infer.bundle import BundleInferTask  # noqa: E402

logger = logging.getLogger(__name__)

MASK_2D = ".png"  # 2D masks are written losslessly whatever the input's format (a JPEG mask would invent labels)
MASKS_3D = (".nii.gz", ".nii", ".nrrd")
DTYPES = ("uint8", "uint16", "int16", "int32", "float32")


class ModelPathConstants(InferConstants):
    """``BundleInferTask`` reads ``os.path.join(<bundle>, "models", model_pytorch())``; an absolute name makes that
    join yield it unchanged, which is how ``--conf ckpt_dir`` points inference at a model outside the bundle."""

    def __init__(self, model_path: str) -> None:
        self._model_path = model_path

    def model_pytorch(self) -> str:
        return self._model_path


class ToWriterLayout2Dd(MapTransform):
    """``(1, H, W)`` mask -> ``(W, H)`` uint8 array, the layout MONAI Label's ITK writer expects.

    Our 2D chains read images as ``(C, H, W)`` (``PILReader(reverse_indexing=False)``); MONAI Label's ``Writer``
    transposes arrays before handing them to ITK (MONAI's default ``(W, H)`` indexing), and its ``Restored`` resizes
    to the reader's ``spatial_shape``, which PIL reports as ``(W, H)``: both would transpose a non-square mask. The
    bundle's own ``Invertd`` already restores the input's size, so this replaces ``Restored`` for 2D bundles.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            mask = convert_to_numpy(d[key])
            mask = mask[0] if mask.ndim == 3 else mask
            d[key] = np.ascontiguousarray(mask.T).astype(np.uint8)
        return d


class TppInferTask(BundleInferTask):
    """``BundleInferTask`` on ``configs/inference.json`` (+ overlays) with the model at ``spec.model_path``.

    Differences from the stock task, each for a reason: the task type comes from ``metadata.json`` (MONAI Label
    guesses it from the folder name); classification skips ``Restored`` (it fails on a ``(C,)`` score vector); 2D
    segmentation replaces it with :class:`ToWriterLayout2Dd`; a single sigmoid channel is reported as label value 1
    (the value it has in the returned mask; the metadata's channel index is 0); loading is strict, so a model that
    does not match the served config (e.g. missing ``--conf overlays demo``) fails loudly.
    """

    def __init__(self, spec: BundleSpec, conf: Mapping[str, str]) -> None:
        self.spec = spec
        metadata = spec.metadata()
        self.kind, self.dims = output_kind(metadata), spatial_dims(metadata)
        super().__init__(
            spec.path,
            dict(conf),
            const=ModelPathConstants(spec.model_path),
            type=self.kind,
            add_post_restore=self.kind == "segmentation" and self.dims == 3,
            load_strict=True,
        )
        if not self.is_valid():
            return
        names = class_names(metadata)
        if self.kind == "segmentation" and len(names) == 1:
            self.labels = {names[0].lower(): 1}
        models = sorted(p.name for p in Path(spec.ckpt_dir).glob("*.pt"))
        self._config["model_filename"] = sorted(models, key=lambda n: (n != MODEL_FILE, n))

    def accepted_params(self) -> dict[str, Param]:
        """The ``/infer`` parameters a client may send, with their types and ranges."""
        masks = () if self.kind == "classification" else (MASK_2D,) if self.dims == 2 else MASKS_3D
        return {
            "device": DEVICE_PARAM,
            "model_filename": choice(self._config["model_filename"], "a model file this server lists in /info/"),
            "result_extension": choice(masks, f"one of {list(masks)} (lossless masks)"),
            "result_dtype": choice(DTYPES),
            "result_compress": BOOL,
            "logging": choice(("DEBUG", "INFO", "WARNING", "ERROR")),
            "client_id": CLIENT_ID_PARAM,
        }

    def check_params(self, params: Mapping[str, Any]) -> None:
        check_params(params, self.accepted_params(), f"/infer/{self.spec.name} params")

    def check_model_filename(self, value: Any) -> None:
        """``model_filename`` (if given) names one of the app's own model files, never a path."""
        if value is not None and not self.accepted_params()["model_filename"].accepts(value):
            raise RequestRefused(
                f"model_filename {value!r} is not one of this model's files {self._config['model_filename']}"
            )

    def check_model_upload(self, path: str) -> None:
        """``PUT /model/<model>`` (when the operator opened it): the file must hold the served model's weights, every
        name and shape the same and every value finite, or the next ``/infer`` would fail."""
        import torch

        where = f"PUT /model/{self.spec.name}"
        try:
            new = _state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as err:  # not a checkpoint of plain tensors
            raise RequestRefused(
                f"{where}: the file is not a PyTorch checkpoint of weights ({type(err).__name__})"
            ) from None
        if not os.path.isfile(self.spec.model_path):
            raise RequestRefused(f"{where}: there is no served model to compare with; /train creates one", 409)
        old = _state_dict(torch.load(self.spec.model_path, map_location="cpu", weights_only=True))
        problems = [f"missing {k}" for k in sorted(set(old) - set(new))] + [
            f"unexpected {k}" for k in sorted(set(new) - set(old))
        ]
        for key in sorted(set(old) & set(new)):
            if not isinstance(new[key], torch.Tensor) or new[key].shape != old[key].shape:
                problems.append(f"{key}: {getattr(new[key], 'shape', type(new[key]).__name__)} for {old[key].shape}")
            elif new[key].is_floating_point() and not torch.isfinite(new[key]).all():
                problems.append(f"{key}: non-finite values")
        if problems:
            shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} in all)" if len(problems) > 5 else "")
            raise RequestRefused(f"{where}: the weights do not fit the served model: {shown}")

    def check_image(self, path: str, image: str) -> None:
        """Refuse an image whose file type does not have this model's spatial dimension."""
        suffixes = IMAGE_2D if self.dims == 2 else IMAGE_3D
        if not path.lower().endswith(suffixes):
            raise RequestRefused(
                f"model {self.spec.name} takes {self.dims}D images ({', '.join(suffixes)}); image {image!r} is "
                f"{os.path.basename(path)!r}: pick a model of that image's dimension"
            )

    def _load_bundle_config(self, path: str, config: str) -> ConfigParser:
        return load_bundle_config(self.spec, config)

    def run_pre_transforms(self, data: dict[str, Any], transforms: Sequence[Any]) -> dict[str, Any]:
        # MONAI 1.6's Spacingd copies a NIfTI image's meta into every ``image_*`` entry of the data, which breaks on
        # MONAI Label's ``image_path`` string; set it aside while the bundle's preprocessing runs.
        path = data.pop("image_path", None)
        data = super().run_pre_transforms(data, transforms)
        if path is not None:
            data["image_path"] = path
        return data

    def post_transforms(self, data: Any = None) -> Sequence[Any]:
        post = list(super().post_transforms(data))
        if self.kind == "segmentation" and self.dims == 2:
            post.append(ToWriterLayout2Dd(keys=self.key_pred))
        return post

    def writer(self, data: dict[str, Any], extension: str | None = None, dtype: str | None = None) -> Any:
        if self.kind == "segmentation" and self.dims == 2:  # MONAI Label would reuse the input's format (JPEG)
            extension, dtype = MASK_2D, "uint8"
        result, result_json = super().writer(data, extension, dtype)
        if isinstance(result, str) and os.path.isfile(result):
            # MONAI Label writes the result to <tmp>/<random>.<ext>, sends that file name, and deletes the file after
            # answering; MONAILabelClient saves the answer to <its tmpdir>/<that name>, by default the same path, so
            # the server would delete the client's copy. The result lives in a folder of the server's own instead.
            private = os.path.join(_results_dir(), os.path.basename(result))
            os.replace(result, private)
            result = private
        return result, result_json


_RESULTS_DIR: list[str] = []


def _results_dir() -> str:
    """The server's own folder for inference results (one per process, private to its user)."""
    if not _RESULTS_DIR:
        _RESULTS_DIR.append(tempfile.mkdtemp(prefix="tpp_monai_label_results_"))
    return _RESULTS_DIR[0]


def _state_dict(checkpoint: Any) -> dict[str, Any]:
    """The weights of a model file as MONAI Label's loader reads them (``checkpoint["model"]`` or the whole)."""
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise TypeError("no state dict")
    return state
