"""Output files that explain themselves: the classification CSV with a header and class names, and NIfTI label maps
that keep the input's header codes."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import NibabelWriter
from monai.data.image_writer import ImageWriter
from monai.data.utils import to_affine_nd
from monai.utils import convert_data_type

from tpp_monai.handlers import is_rank0


class ClassificationWriter:
    """``predictions.csv`` of a classification run: ``image``, ``label`` (the class name, when the data has labels),
    ``prediction`` (the class name of the highest probability) and one ``prob_<class>`` column per class; rewritten
    when the run completes (rank 0)."""

    def __init__(self, output_dir: str | Path, dataset: str, filename: str = "predictions.csv") -> None:
        from tpp_monai.data.info import get_dataset

        self.path = Path(output_dir) / filename
        self.classes = list(get_dataset(dataset, "dataset_name").classes)
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _collect(self, engine: Engine) -> None:
        for item, source in zip(engine.state.output, engine.state.batch):
            probs = torch.as_tensor(item["pred"]).detach().float().reshape(-1).cpu().tolist()
            meta = getattr(source["image"], "meta", {})
            row = {"image": str(meta.get("filename_or_obj", ""))}
            label = item.get("label", source.get("label")) if isinstance(item, dict) else None
            if label is not None:
                row["label"] = self.classes[int(torch.as_tensor(label).reshape(-1)[0])]
            row["prediction"] = self.classes[int(np.argmax(probs))]
            row.update({f"prob_{c}": f"{p:.6f}" for c, p in zip(self.classes, probs)})
            self.rows.append(row)

    def _write(self, engine: Engine) -> None:
        if not is_rank0() or not self.rows:
            return
        columns = ["image", *(["label"] if "label" in self.rows[0] else []), "prediction",
                   *(f"prob_{c}" for c in self.classes)]  # fmt: skip
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)


class HeaderKeepingNiftiWriter(NibabelWriter):
    """MONAI's ``NibabelWriter`` that writes the input's ``qform_code`` and ``sform_code`` (from the image's
    metadata) instead of setting both to 1 (scanner), which relabels the space of an aligned or template image."""

    def set_metadata(self, meta_dict: dict | None, resample: bool = True, **options: object) -> None:
        meta = dict(meta_dict or {})
        self.codes = {k: int(np.asarray(meta[k]).reshape(-1)[0]) for k in ("qform_code", "sform_code") if k in meta}
        super().set_metadata(meta_dict, resample=resample, **options)

    def write(self, filename: str, verbose: bool = False, **obj_kwargs: object) -> None:
        ImageWriter.write(self, filename, verbose=verbose)
        self.data_obj = self.create_backend_obj(
            self.data_obj, affine=self.affine, dtype=self.output_dtype, **obj_kwargs
        )
        affine = to_affine_nd(r=3, affine=convert_data_type(np.eye(4) if self.affine is None else self.affine,
                                                            np.ndarray)[0])  # fmt: skip
        codes = getattr(self, "codes", {})
        self.data_obj.set_sform(affine, code=codes.get("sform_code", 1))
        self.data_obj.set_qform(affine, code=codes.get("qform_code", 1))
        nib.save(self.data_obj, filename)
