"""The datasets of the TPP paper (Table 1 and §5.4), one entry each in :data:`DATASETS`.

An entry (:class:`DatasetInfo`) holds everything the project knows of a dataset: task, classes and input sizes
(following the paper and the MedCoSS framework it builds on, ``datasets.md`` §0.3), its training recipe, how to read
its official download (the ``builder``), how to write its demo miniature (``demo``) and whether evaluation averages
over flips. The datalist builders, the transform chains, the bundle generator, the demo and the metrics all read it.

Adding a dataset is one entry here plus its builder function (in :mod:`~tpp_monai.data.classification`,
:mod:`~tpp_monai.data.segmentation2d` or :mod:`~tpp_monai.data.volumes`, or a new module) and its demo writer (in
:mod:`~tpp_monai.data.synthetic`); then ``python -m tpp_monai bundles`` writes its bundles and
``python -m tpp_monai datalist <name> --root ...`` its datalist.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tpp_monai.data import classification, segmentation2d, synthetic, volumes
from tpp_monai.data.common import Builder
from tpp_monai.data.recipes import CLS_TPP, FT_3D, MHIST_LR, SEG_TPP, TPP_3D, DatasetRecipe, FinetuneRecipe
from tpp_monai.errors import ConfigError, unknown_choice

TASKS = ("cls", "seg", "seg3d")
#: ``write(root, n, rng, classes)``: ``n`` demo images or cases under the layout root (see :mod:`.synthetic`).
DemoWriter = Callable[[Path, int, np.random.Generator, tuple[str, ...]], None]


@dataclass(frozen=True)
class DemoData:
    """The demo miniature of a dataset (:func:`tpp_monai.data.demo.make_demo_dataset`).

    Args:
        top: the dataset's top folder, created under the demo's ``--out`` (as the download unpacks).
        inner: the layout root inside ``top`` (``"."``: ``top`` itself); the datalist's paths are relative to it.
        write: the writer (:data:`DemoWriter`).
        default_n: images (2D) or cases (3D) written by default.
        min_n: the smallest ``n`` that still leaves every split non-empty after the builder's rule.
        appearances: other looks of the dataset (``make_demo_dataset(..., appearance=...)``), each a writer of the
            same official layout.
    """

    top: str
    inner: str
    write: DemoWriter
    default_n: int
    min_n: int
    appearances: Mapping[str, DemoWriter] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset: its facts, recipe, builder and demo.

    Args:
        name: short id used on the command line and in bundle names.
        title: the name the paper uses.
        task: ``"cls"`` (image classification), ``"seg"`` (2D binary segmentation) or ``"seg3d"`` (3D organ+tumour).
        modality: imaging modality as in the paper's Table 1.
        classes: class names in label-index order (segmentation: channel/label names, background first).
        image_size: network input size: the resized 2D image, or the 3D training patch (z, y, x order as MONAI
            sees it after ``Orientationd("RAS")``: x, y, z).
        in_channels: image channels fed to the network.
        split_counts: the paper's train/val/test counts (Table 1); LiTS/KiTS19: the fixed MedCoSS/MOTS lists (104/27,
            168/42) with ``int(0.8 n)`` of the training cases kept and the rest carved out as validation.
        recipe: the training recipes and the methods its bundles are made for.
        builder: how to find and read the official download (:class:`~tpp_monai.data.common.Builder`).
        demo: how to write the demo miniature.
        flip_tta: 2D segmentation only: evaluation and inference average the prediction over the identity, vertical,
            horizontal and both flips (MedCoSS evaluates GlaS so, :mod:`tpp_monai.inferers`).
        mask_values: 2D segmentation: the only values its masks may hold (``None``: any non-negative integer, as
            GlaS's gland instance ids); the data preflight refuses a mask with others.
    """

    name: str
    title: str
    task: str
    modality: str
    classes: tuple[str, ...]
    image_size: tuple[int, ...]
    in_channels: int
    split_counts: tuple[int, int, int]
    recipe: DatasetRecipe
    builder: Builder
    demo: DemoData
    flip_tta: bool = False
    mask_values: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        where = f"dataset entry {self.name!r} (tpp_monai/data/info.py)"
        if self.task not in TASKS:
            raise ConfigError(f"{where}: task {self.task!r} is not one of {', '.join(TASKS)}")
        if len(self.image_size) != self.spatial_dims:
            raise ConfigError(f"{where}: image_size {self.image_size} needs {self.spatial_dims} sizes for {self.task}")
        if self.flip_tta and self.task != "seg":
            raise ConfigError(f"{where}: flip_tta applies to 2D segmentation only; the task is {self.task!r}")
        if not 1 <= self.demo.min_n <= self.demo.default_n:
            raise ConfigError(f"{where}: demo sizes need 1 <= min_n <= default_n; got {self.demo}")

    @property
    def spatial_dims(self) -> int:
        return 3 if self.task == "seg3d" else 2

    @property
    def num_classes(self) -> int:
        """Classifier outputs (cls), sigmoid channels (seg: 1) or softmax channels incl. background (seg3d)."""
        return 1 if self.task == "seg" else len(self.classes)


_METHODS_3D = ("conv_adapter", "full_finetune")  # the paper's 3D method and its baseline

DATASETS: dict[str, DatasetInfo] = {
    d.name: d
    for d in (
        DatasetInfo(
            "mhist", "MHIST", "cls", "pathology", ("HP", "SSA"), (224, 224), 3, (1740, 435, 977),
            recipe=DatasetRecipe(CLS_TPP, FinetuneRecipe(32, 2700, lr_by_method=MHIST_LR), peft_bundles=("peft.ia3",)),
            builder=classification.MHIST_BUILDER,
            demo=DemoData("mhist", ".", synthetic.write_mhist, default_n=48, min_n=10),
        ),
        DatasetInfo(
            "oct_c8", "Retinal OCT-C8", "cls", "OCT", ("AMD", "CNV", "CSR", "DME", "DR", "DRUSEN", "MH", "NORMAL"),
            (224, 224), 3, (18400, 2800, 2800),
            recipe=DatasetRecipe(CLS_TPP, FinetuneRecipe(32, 57500)),
            builder=classification.OCT_C8_BUILDER,
            demo=DemoData("RetinalOCT_Dataset", "RetinalOCT_Dataset", synthetic.write_oct_c8, default_n=64, min_n=24),
        ),
        DatasetInfo(
            "chest_xray_pa", "Chest X-ray PA", "cls", "X-ray", ("covid", "normal", "pneumonia"), (224, 224), 3,
            (3201, 459, 915),
            recipe=DatasetRecipe(CLS_TPP, FinetuneRecipe(32, 1980)),
            builder=classification.CHEST_XRAY_PA_BUILDER,
            demo=DemoData("COVID19_Pneumonia_Normal_Chest_Xray_PA_Dataset", ".", synthetic.write_chest_xray_pa,
                          default_n=36, min_n=15),
        ),
        DatasetInfo(
            "glas", "GlaS", "seg", "pathology", ("background", "gland"), (512, 512), 3, (67, 18, 80),
            recipe=DatasetRecipe(SEG_TPP, FinetuneRecipe(4, 25000), peft_bundles=("peft.dora",)),
            builder=segmentation2d.GLAS_BUILDER,
            demo=DemoData("Warwick_QU_Dataset", ".", synthetic.write_glas, default_n=30, min_n=8,
                          appearances={"ihc": synthetic.write_glas_ihc}),
            flip_tta=True,
        ),
        DatasetInfo(
            "qata", "QaTa-COV19", "seg", "X-ray", ("background", "infection"), (224, 224), 3, (5716, 1429, 2113),
            recipe=DatasetRecipe(SEG_TPP, FinetuneRecipe(16, 25000)),
            builder=segmentation2d.QATA_BUILDER,
            demo=DemoData("QaTa-COV19", "QaTa-COV19-v2", synthetic.write_qata, default_n=40, min_n=8),
            mask_values=(*segmentation2d.QATA_MASK_VALUES, 1),  # 0/255 as published; 0/1 from MONAI Label
        ),
        DatasetInfo(
            "lits", "LiTS", "seg3d", "CT", ("background", "liver", "tumour"), (192, 192, 64), 1, (83, 21, 27),
            recipe=DatasetRecipe(TPP_3D, FT_3D, methods=_METHODS_3D),
            builder=volumes.LITS_BUILDER,
            demo=DemoData("LiTS", ".", synthetic.write_lits, default_n=10, min_n=3),
        ),
        DatasetInfo(
            "kits", "KiTS19", "seg3d", "CT", ("background", "kidney", "tumour"), (192, 192, 64), 1, (134, 34, 42),
            recipe=DatasetRecipe(TPP_3D, FT_3D, methods=_METHODS_3D),
            builder=volumes.KITS_BUILDER,
            demo=DemoData("kits19", "data", synthetic.write_kits, default_n=10, min_n=3),
        ),
    )
}  # fmt: skip


def get_dataset(name: str, where: str = "") -> DatasetInfo:
    """Look a dataset up by name; an unknown name raises a :class:`~tpp_monai.errors.ConfigError` listing valid ones."""
    try:
        return DATASETS[name]
    except KeyError:
        raise unknown_choice("dataset", name, DATASETS, where) from None
