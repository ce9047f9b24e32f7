"""The app's ``--conf`` keys: which bundles it serves, where their fine-tuned models and run outputs live.

``--conf models a,b``         bundle names under ``bundles_dir`` (or bundle folders given as paths); required
``--conf bundles_dir DIR``    where bundle names are looked up; default: this repository's ``bundles/``
``--conf ckpt_dir DIR``       fine-tuned models are ``DIR/<bundle>/model.pt`` (inference reads it, training writes
                              it); default: the bundle's own default ``<bundle>/models/model.pt``
``--conf runs_dir DIR``       run outputs of ``/train`` under ``DIR/<bundle>/``; default: ``<bundle>/runs/``
``--conf overlays a,b``       extra config files merged after ``inference.json`` / ``finetune.json``, e.g. ``demo``
                              (``configs/demo.json``: the synthetic-data overlay with its tiny backbone); a name is
                              looked up in the bundle's ``configs/``, a path is used as is
``--conf max_upload_mb N``    largest request body (an uploaded image or label) the server accepts; default 256
``--conf max_image_pixels N`` largest image or label (pixels or voxels, times channels) it decodes; default 2**28
``--conf publish_margin X``   ``/train`` publishes its model only when its best validation score is at least the
                              served model's (on the same validation images) minus X; default 0.02 (scores are
                              fractions: Dice, AUC); a negative X asks for an improvement of at least -X
``--conf open_routes a,b``    MONAI Label routes the app refuses by default, opened (groups in
                              :mod:`tpp_monai.label.routes`: model_download, model_upload, model_delete,
                              datastore_delete, dataset_download, sessions, batch_infer, activelearning, scoring,
                              wsi, logs, ohif, dicom_proxy, reload, docs)

Bundles are local folders only: nothing is looked up in or downloaded from the model zoo.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

REPO_BUNDLES = Path(__file__).resolve().parents[2] / "bundles"
DEFAULT_PUBLISH_MARGIN = 0.02
CLASS_INFO_KEY = "class"  # image info key holding an image's class (name or index) for classification training
MODEL_FILE = "model.pt"  # what finetune's best-model saver writes into ckpt_dir (key_metric_filename)


def _items(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


@dataclass(frozen=True)
class BundleSpec:
    """One served bundle: its folder, where its model is, where its runs go and which overlays apply."""

    name: str
    path: str
    ckpt_dir: str
    runs_dir: str | None = None
    overlays: tuple[str, ...] = ()

    @property
    def model_path(self) -> str:
        return os.path.join(self.ckpt_dir, MODEL_FILE)

    @property
    def metadata_path(self) -> str:
        return os.path.join(self.path, "configs", "metadata.json")

    def metadata(self) -> dict[str, Any]:
        with open(self.metadata_path, encoding="utf-8") as f:
            return json.load(f)

    def config_files(self, config: str) -> list[str]:
        """``configs/<config>`` followed by the overlays, in merge order."""
        return [os.path.join(self.path, "configs", config), *self.overlays]

    def path_overrides(self) -> dict[str, str]:
        """Config values that send the bundle's model and run outputs where this app was told to."""
        out = {"ckpt_dir": self.ckpt_dir}
        if self.runs_dir is not None:
            out["runs_dir"] = self.runs_dir
        return out

    def runs_root(self) -> str:
        return self.runs_dir if self.runs_dir is not None else os.path.join(self.path, "runs")


def output_kind(metadata: Mapping[str, Any]) -> str:
    """``classification`` when the bundle's first output is class scores, else ``segmentation``."""
    out = next(iter(metadata["network_data_format"]["outputs"].values()))
    return "classification" if out.get("format") == "classes" else "segmentation"


def spatial_dims(metadata: Mapping[str, Any]) -> int:
    image = next(iter(metadata["network_data_format"]["inputs"].values()))
    return len(image.get("spatial_shape") or (0, 0, 0))


def class_names(metadata: Mapping[str, Any]) -> list[str]:
    """The output channels' names in index order (the classes of a classification bundle)."""
    out = next(iter(metadata["network_data_format"]["outputs"].values()))
    channels = out.get("channel_def", {})
    return [channels[k] for k in sorted(channels, key=int)]


def label_values(metadata: Mapping[str, Any]) -> list[int]:
    """The values a segmentation bundle's label holds: 0 and 1 for a single (sigmoid) channel, else the channel
    indices (channel 0 is the background)."""
    return list(range(max(2, len(class_names(metadata)))))


def number_conf(conf: Mapping[str, str], key: str, default: float, low: float = -math.inf) -> float:
    """A numeric ``--conf`` value; ``ValueError`` naming the key when it is not a finite number >= ``low``."""
    text = conf.get(key)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < low:
        raise ValueError(f"--conf {key} {text!r} is not a finite number" + (f" >= {low}" if low > -math.inf else ""))
    return value


def _overlay_path(bundle: str, item: str) -> str:
    path = Path(item)
    if not path.is_absolute() and len(path.parts) == 1:
        path = Path(bundle) / "configs" / (item if item.endswith((".json", ".yaml")) else f"{item}.json")
    if not path.is_file():
        raise ValueError(f"overlay {item!r}: {path} not found (--conf overlays takes names in <bundle>/configs/)")
    return str(path.resolve())


def bundle_specs(conf: Mapping[str, str]) -> dict[str, BundleSpec]:
    """The bundles named by ``--conf models``, resolved and checked; raises ``ValueError`` with what is wrong."""
    models = _items(conf.get("models"))
    if not models:
        raise ValueError("no bundles to serve: pass --conf models <name>[,<name>...] (folders under bundles/)")
    bundles_dir = Path(conf.get("bundles_dir") or REPO_BUNDLES).expanduser()
    specs: dict[str, BundleSpec] = {}
    for item in models:
        given = Path(item).expanduser()
        path = (given if given.is_absolute() or len(given.parts) > 1 else bundles_dir / item).resolve()
        if not (path / "configs" / "metadata.json").is_file():
            raise ValueError(f"bundle {item!r}: {path} is not a bundle folder (no configs/metadata.json)")
        name = path.name
        if name in specs:
            raise ValueError(f"bundle {name!r} is named twice in --conf models")
        ckpt_root, runs_root = conf.get("ckpt_dir"), conf.get("runs_dir")
        specs[name] = BundleSpec(
            name=name,
            path=str(path),
            ckpt_dir=str(Path(ckpt_root).expanduser().resolve() / name) if ckpt_root else str(path / "models"),
            runs_dir=str(Path(runs_root).expanduser().resolve() / name) if runs_root else None,
            overlays=tuple(_overlay_path(str(path), o) for o in _items(conf.get("overlays"))),
        )
    return specs


def load_bundle_config(spec: BundleSpec, config_path: str) -> ConfigParser:
    """The workflow config merged with the overlays, its paths sent where the app was told (both tasks read it)."""
    parser = ConfigParser()
    parser.read_config([config_path, *spec.overlays])
    parser.config.update({"bundle_root": spec.path, **spec.path_overrides()})  # type: ignore[union-attr]
    return parser
