"""Preflight checks the bundle configs run in ``initialize``: unknown names, missing inputs, settings that
do not fit together, and earlier runs that would be overwritten, all before any data is cached."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from tpp_monai.backbones import build_backbone, get_backbone_spec
from tpp_monai.data import check_datalist, get_dataset
from tpp_monai.errors import ConfigError


def check_settings(
    dataset: str, method: str, backbone: str, pretext: str | None = None, datalist: str | None = None,
    dataset_dir: str | None = None, keys: tuple[str, ...] = ("training",), tpp_ckpt: str | None = None,
    image_size: list | None = None, num_classes: int | None = None,
) -> None:  # fmt: skip
    """Fail fast, before any data is cached or a network is built, on unknown names and missing inputs.

    ``pretext`` given means the TPP stage, which needs a method with target parameters to pre-train; ``tpp_ckpt``
    (fine-tuning) must exist unless it is ``none``; ``image_size`` must be a multiple of the ViT patch size;
    ``num_classes`` must match the dataset's classes and the datalist's labels.
    """
    from tpp_monai.network import is_none
    from tpp_monai.peft import get_method
    from tpp_monai.pretext import check_pretext

    get_dataset(dataset, "dataset_name")
    spec = get_method(method, "method")
    get_backbone_spec(backbone, "backbone")
    if pretext is not None:
        check_pretext(pretext, backbone)
        if not spec.pretrainable:
            raise ConfigError(
                f"pretrain_tpp does not apply to {method!r}: {spec.summary}; it adds no target parameters to "
                "pre-train, so fine-tune it directly (finetune)"
            )
    info = get_dataset(dataset)
    spec_backbone = get_backbone_spec(backbone)
    if image_size is not None and spec_backbone.family != "stunet":
        patch = int(spec_backbone.kwargs.get("patch_size", 16))
        if any(int(s) % patch for s in image_size):
            raise ConfigError(
                f"image_size {list(image_size)} (from image_size) is not a multiple of the {backbone} patch size "
                f"{patch}; use e.g. {[max(patch, round(int(s) / patch) * patch) for s in image_size]}"
            )
    if datalist is not None:
        listed = check_datalist(datalist, dataset_dir, keys=keys)
        if num_classes is not None and info.task == "cls":
            if int(num_classes) != len(info.classes):
                raise ConfigError(
                    f"num_classes {num_classes} (from num_classes) does not match {info.title}'s "
                    f"{len(info.classes)} classes {list(info.classes)}"
                )
            labels = {r.get("label") for k in keys for r in listed.get(k, [])}
            bad = sorted(str(v) for v in labels if not (isinstance(v, int) and 0 <= v < int(num_classes)))
            if bad:
                raise ConfigError(
                    f"{datalist} has labels {bad[:5]} outside 0..{int(num_classes) - 1} for {num_classes} classes; "
                    "rebuild it with `python -m tpp_monai datalist`"
                )
    if not is_none(tpp_ckpt) and not Path(str(tpp_ckpt)).is_file():
        raise ConfigError(
            f"tpp_ckpt {tpp_ckpt} not found: run pretrain_tpp first (it writes runs/pretrain_tpp/tpp_target.pt), "
            "pass the target-parameter file of another run with --tpp_ckpt, or fine-tune from randomly initialised "
            "target parameters (the paper's PEFT baseline) with --tpp_ckpt none"
        )


def check_output(output_dir: str, resume: bool, ckpt_dir: str | None = None) -> None:
    """Refuse to overwrite an earlier run silently: its checkpoints (and, for fine-tuning, its best model) stay
    unless the run is resumed; a resume without checkpoints starts from the beginning. The folders are locked for
    this run first (:func:`tpp_monai.run_folder.claim_folders`)."""
    from tpp_monai.run_folder import claim_folders

    claim_folders(output_dir, ckpt_dir)
    if resume:
        return
    earlier = sorted((Path(output_dir) / "checkpoints").glob("*.pt"))
    if ckpt_dir is not None and (Path(ckpt_dir) / "model.pt").is_file():
        earlier.append(Path(ckpt_dir) / "model.pt")
    if earlier:
        raise ConfigError(
            f"{earlier[0]} is from an earlier run; pass --resume true to continue that run, or choose another "
            "--output_dir / --ckpt_dir (or delete them) to start a new one"
        )


def check_3d(
    dataset: str, backbone: str, image_size: Sequence[int], backbone_options: Mapping | None = None,
    pretext: str | None = None, dino: Mapping | None = None, pretext_size: Sequence[int] | None = None,
    mim: Mapping | None = None,
) -> None:  # fmt: skip
    """Raise a :class:`ConfigError` naming the value and the fix unless the 3D settings fit together.

    ``image_size`` is the training patch and the sliding-window ROI; with ``pretext`` the inputs it makes are checked
    too (DINO's crops; MAE's and MIM's views, of ``pretext_size``, by default the training patch, and MIM's mask
    cells).
    """
    from tpp_monai.pretext import check_pretext, check_pretext_inputs

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
    cube = [int(image_size)] * 3 if isinstance(image_size, (int, float)) else [int(s) for s in image_size]
    try:
        model.check_input_size(cube)
    except ConfigError as err:
        raise ConfigError(f"image_size {list(cube)}: {err}") from None
    if pretext is not None:
        size, setting = (cube, "image_size") if pretext_size is None else (pretext_size, "pretext_size")
        check_pretext_inputs(pretext, model, size, dino, mim, setting)
