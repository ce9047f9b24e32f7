"""One generator for every bundle: ``python -m tpp_monai bundles [--check | --list]``.

Each bundle is a dataset x PEFT method pair (``bundles/<dataset>_<method>/``) holding configuration only; all code
lives in ``tpp_monai`` and is referenced by dotted ``_target_`` paths. A bundle is built by one of two kinds behind one
interface (:class:`~tpp_monai.bundlegen.base.BundleKind`): :class:`~tpp_monai.bundlegen.vit2d.ViTBundle` (2D) and
:class:`~tpp_monai.bundlegen.stunet3d.STUNetBundle` (3D), from the dataset entries
(:data:`tpp_monai.data.info.DATASETS`: facts and recipe of each dataset) and the method registry
(:mod:`tpp_monai.peft`).
"""

from __future__ import annotations

from pathlib import Path

from tpp_monai.bundlegen.base import WORKFLOW_FILES, BundleKind
from tpp_monai.bundlegen.stunet3d import STUNetBundle
from tpp_monai.bundlegen.swinunetr3d import METHODS as SWINUNETR_METHODS
from tpp_monai.bundlegen.swinunetr3d import SwinUNETRBundle
from tpp_monai.bundlegen.vit2d import ViTBundle
from tpp_monai.data.info import DATASETS
from tpp_monai.data.recipes import BASELINES
from tpp_monai.peft import applicable_methods, get_method

BUNDLES_DIR = Path(__file__).resolve().parents[2] / "bundles"
KINDS: dict[int, type[BundleKind]] = {2: ViTBundle, 3: STUNetBundle}

__all__ = ["BASELINES", "BUNDLES_DIR", "KINDS", "WORKFLOW_FILES", "BundleKind", "all_bundles", "bundle_names",
           "get_bundle", "workflow_config_files"]  # fmt: skip


def _methods_for(dims: int, methods: tuple[str, ...] | None) -> list[str]:
    if methods is not None:
        return list(methods)
    backbone = "medcoss_vit_b16" if dims == 2 else "stunet_b"
    return [m for m in applicable_methods(backbone) if get_method(m).pretrainable or m in BASELINES]


def all_bundles() -> list[BundleKind]:
    """Every bundle: each dataset with each of its methods (and peft bundles), built by the kind of its
    dimensionality."""
    out = []
    for info in DATASETS.values():
        kind = KINDS[info.spatial_dims]
        out += [kind(info, method) for method in _methods_for(info.spatial_dims, info.recipe.methods)]
        out += [kind(info, method) for method in info.recipe.peft_bundles]
        if info.spatial_dims == 3:  # MONAI's SwinUNETR beside STU-Net (peft's LoRA and its baseline)
            out += [SwinUNETRBundle(info, method) for method in SWINUNETR_METHODS]
    return out


def bundle_names(spatial_dims: int | None = None) -> list[str]:
    """Every bundle this generator writes (only the 2D or the 3D ones with ``spatial_dims``)."""
    return [b.name for b in all_bundles() if spatial_dims is None or b.spatial_dims == int(spatial_dims)]


def get_bundle(name: str) -> BundleKind:
    from tpp_monai.errors import unknown_choice

    bundles = {b.name: b for b in all_bundles()}
    if name not in bundles:
        raise unknown_choice("bundle", name, bundles, "")
    return bundles[name]


def workflow_config_files(bundle_dir: str | Path, workflow: str, *overlays: str) -> list[str]:
    """The config files ``workflow`` runs with in ``bundle_dir`` (``evaluate``: ``finetune.json`` then
    ``evaluate.json``), then the named overlays (``demo``, ``multi_gpu``)."""
    configs = Path(bundle_dir) / "configs"
    return [str(configs / f"{name}.json") for name in (*WORKFLOW_FILES.get(workflow, (workflow,)), *overlays)]
