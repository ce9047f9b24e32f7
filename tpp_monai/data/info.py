"""The seven datasets of the TPP paper (Table 1 and §5.4): task, classes and input sizes.

This table is the single source of dataset facts for the datalist builders, the transform chains, the bundle
generator and the metrics. Sizes follow the paper and the MedCoSS framework it builds on (``datasets.md`` §0.3).
"""

from __future__ import annotations

from dataclasses import dataclass

from tpp_monai.errors import unknown_choice


@dataclass(frozen=True)
class DatasetInfo:
    """Facts about one dataset.

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
    """

    name: str
    title: str
    task: str
    modality: str
    classes: tuple[str, ...]
    image_size: tuple[int, ...]
    in_channels: int
    split_counts: tuple[int, int, int]

    @property
    def spatial_dims(self) -> int:
        return 3 if self.task == "seg3d" else 2

    @property
    def num_classes(self) -> int:
        """Classifier outputs (cls), sigmoid channels (seg: 1) or softmax channels incl. background (seg3d)."""
        return 1 if self.task == "seg" else len(self.classes)


DATASETS: dict[str, DatasetInfo] = {
    d.name: d
    for d in (
        DatasetInfo("mhist", "MHIST", "cls", "pathology", ("HP", "SSA"), (224, 224), 3, (1740, 435, 977)),
        DatasetInfo(
            "oct_c8",
            "Retinal OCT-C8",
            "cls",
            "OCT",
            ("AMD", "CNV", "CSR", "DME", "DR", "DRUSEN", "MH", "NORMAL"),
            (224, 224),
            3,
            (18400, 2800, 2800),
        ),
        DatasetInfo(
            "chest_xray_pa",
            "Chest X-ray PA",
            "cls",
            "X-ray",
            ("covid", "normal", "pneumonia"),
            (224, 224),
            3,
            (3201, 459, 915),
        ),
        DatasetInfo("glas", "GlaS", "seg", "pathology", ("background", "gland"), (512, 512), 3, (67, 18, 80)),
        DatasetInfo(
            "qata", "QaTa-COV19", "seg", "X-ray", ("background", "infection"), (224, 224), 3, (5716, 1429, 2113)
        ),
        DatasetInfo("lits", "LiTS", "seg3d", "CT", ("background", "liver", "tumour"), (192, 192, 64), 1, (83, 21, 27)),
        DatasetInfo(
            "kits", "KiTS19", "seg3d", "CT", ("background", "kidney", "tumour"), (192, 192, 64), 1, (134, 34, 42)
        ),
    )
}


def get_dataset(name: str, where: str = "") -> DatasetInfo:
    """Look a dataset up by name; an unknown name raises a :class:`~tpp_monai.errors.ConfigError` listing valid ones."""
    try:
        return DATASETS[name]
    except KeyError:
        raise unknown_choice("dataset", name, DATASETS, where) from None
