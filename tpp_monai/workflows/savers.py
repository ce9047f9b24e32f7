"""What the workflows write besides checkpoints: the settings record, the fine-tuned model's provenance,
masks and label maps, and the per-case Dice table."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from ignite.engine import Engine, Events

from tpp_monai.handlers import is_rank0
from tpp_monai.run_folder import check_resume_settings
from tpp_monai.workflows.running_config import RunningConfig


def write_settings(output_dir: str, settings: dict) -> None:
    """Write the run's resolved settings (seed included) to ``<output_dir>/settings.json`` (rank 0); a resumed run
    must match the recorded ones first (:func:`tpp_monai.run_folder.check_resume_settings`)."""

    if not is_rank0():
        return
    check_resume_settings(output_dir, settings, settings.get("resume"))
    path = Path(output_dir)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f".settings.json.tmp{os.getpid()}"  # renamed into place: a kill never leaves half a record
    tmp.write_text(json.dumps(settings, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path / "settings.json")


#: What a fine-tuned model records about how it was made: record key -> the config's top-level setting.
RUN_INFO = {"dataset": "dataset_name", "method": "method", "method_options": "method_options", "backbone": "backbone",
            "backbone_options": "backbone_options", "backbone_ckpt": "backbone_ckpt", "tpp_ckpt": "tpp_ckpt",
            "seed": "seed", "lr": "lr", "label_fraction": "label_fraction", "finetune_dir": "output_dir"}  # fmt: skip


def run_info() -> dict:
    """The :data:`RUN_INFO` settings of the config being run, with the TPP stage's own record (its pretext and
    epochs) when fine-tuning starts from one."""
    from tpp_monai.network import is_none
    from tpp_monai.peft.files import record_info

    config = RunningConfig.find()
    info = {key: config.get(setting) for key, setting in RUN_INFO.items() if setting in config.raw}
    tpp_ckpt = info.get("tpp_ckpt")
    info["tpp"] = not is_none(tpp_ckpt)
    if info["tpp"]:
        record = record_info(str(tpp_ckpt))
        info["tpp_ckpt"] = str(tpp_ckpt)
        info["tpp_pretext"] = record.get("pretext")
        info["tpp_epochs"] = record.get("epoch")
    else:
        info["tpp_ckpt"] = None
    return info


def trainable_state(model: object) -> object:
    """A checkpointable view of the parameters being trained (target parameters + head): what a resume needs."""
    from tpp_monai.pretext import PartialState

    return PartialState(model, [n for n, p in model.named_parameters() if p.requires_grad])


def mask_saver(output_dir: str, key: str = "pred", folder: str = "") -> object:
    """``SaveImaged`` writing binary masks as 8-bit PNGs ``<name>_mask.png`` in the input's own orientation.

    The 2D chains read images as ``(C, H, W)`` arrays without MONAI's default axis swap (``reverse_indexing=False``,
    see :mod:`tpp_monai.data.transforms`), so the PNG writer must not swap them back either.
    """
    import numpy
    from monai.transforms import SaveImaged

    saver = SaveImaged(keys=key, output_dir=str(Path(output_dir) / folder), output_postfix="mask",
                       output_ext=".png", separate_folder=False, resample=False, scale=255, output_dtype=numpy.uint8,
                       writer="PILWriter", print_log=False)  # fmt: skip
    return saver.set_options(write_kwargs={"reverse_indexing": False})


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


def random_states(preprocessing: object) -> object:
    """The checkpointable random state of a run and of its data pipeline (:class:`~tpp_monai.handlers.RandomStates`)."""
    from tpp_monai.handlers import RandomStates

    return RandomStates(preprocessing)
