"""Helpers the 3D bundle configs call (``"$import tpp_monai.workflows3d as tpp3d"``): the LiTS / KiTS19 bundles on
STU-Net (paper §5.4, Table 10; ``shared/reference/stunet.md``).

* :func:`check_3d`: fail fast, before any volume is cached, on a 2D dataset, a non-STU-Net backbone, a pretext
  STU-Net does not support, or a patch / ROI / DINO crop that breaks STU-Net's divisibility and bottleneck rules.
* :func:`nifti_saver`: the label-map writer of ``inference.json`` (NIfTI, the input's affine and shape).
* :class:`PerCaseWriter`: the per-case organ / tumour / mean / organ-label-1 Dice table of ``evaluate.json``.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from tpp_monai.backbones import build_backbone, get_backbone_spec
from tpp_monai.data import get_dataset
from tpp_monai.errors import ConfigError
from tpp_monai.handlers import is_rank0


def check_3d(
    dataset: str, backbone: str, image_size: Sequence[int], backbone_options: Mapping | None = None,
    pretext: str | None = None, dino: Mapping | None = None,
) -> None:  # fmt: skip
    """Raise a :class:`ConfigError` naming the value and the fix unless the 3D settings fit together.

    ``image_size`` is the training patch and the sliding-window ROI; with ``pretext`` the DINO crops are checked too.
    """
    from tpp_monai.pretext import DINO_DEFAULTS, check_pretext

    info = get_dataset(dataset, "dataset")
    if info.spatial_dims != 3:
        raise ConfigError(f"dataset {dataset!r} is 2D; the 3D (STU-Net) bundles are for LiTS and KiTS19")
    spec = get_backbone_spec(backbone, "backbone")
    if spec.family != "stunet":
        raise ConfigError(
            f"backbone {backbone!r} ({spec.family}) does not take 3D volumes; the 3D bundles use STU-Net: "
            "--backbone stunet_s, stunet_b (default), stunet_l, stunet_h or stunet_tiny"
        )
    if pretext is not None:
        check_pretext(pretext, backbone)
    options = {k: v for k, v in dict(backbone_options or {}).items() if k != "deep_supervision"}
    with torch.device("meta"):  # shapes only: no memory, even for STU-Net-H
        model = build_backbone(backbone, task="features", **options)
    sizes = {"image_size": image_size}
    if pretext is not None:
        d = {**DINO_DEFAULTS, **dict(dino or {})}
        sizes["dino global_size"] = d["global_size"]
        if d["num_local"]:
            sizes["dino local_size"] = d["local_size"]
    for what, size in sizes.items():
        cube = [int(size)] * 3 if isinstance(size, (int, float)) else [int(s) for s in size]
        try:
            model.check_input_size(cube)
        except ConfigError as err:
            raise ConfigError(f"{what} {list(cube)}: {err}") from None


def nifti_saver(output_dir: str) -> object:
    """``SaveImaged`` writing label maps ``<name>_seg.nii.gz`` (uint8) with the metadata the prediction carries: after
    ``Invertd`` that is the input's own affine and shape, so no resampling happens here; the input's qform and
    sform codes are kept."""
    import numpy
    from monai.transforms import SaveImaged

    from tpp_monai.writers import HeaderKeepingNiftiWriter

    return SaveImaged(keys="pred", output_dir=output_dir, output_postfix="seg", output_ext=".nii.gz",
                      output_dtype=numpy.uint8, resample=False, separate_folder=False, print_log=False,
                      writer=HeaderKeepingNiftiWriter)  # fmt: skip


class PerCaseWriter:
    """After evaluation write ``dice_per_case.csv``: one row per case (its label file) with the organ, tumour, mean
    and organ-label-1 Dice, read from an :class:`~tpp_monai.metrics.OrganTumourHandler` fed with every case."""

    def __init__(self, handler: object, output_dir: str | Path, filename: str = "dice_per_case.csv") -> None:
        self.handler, self.path = handler, Path(output_dir) / filename

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        rows = self.handler.metric_fn.per_item()
        if not is_rank0() or not rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
