"""Reading the datalist and the input folders of the workflows, and the data loaders."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from monai.data import load_decathlon_datalist

from tpp_monai.data import check_datalist, get_dataset, subsample_labels
from tpp_monai.errors import ConfigError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".nii", ".nii.gz", ".dcm")


def image_files(folder: str) -> list[dict]:
    """``[{"image": path}]`` for every image file in ``folder`` (sorted), for the inference workflow."""
    path = Path(folder)
    if not path.is_dir():
        raise ConfigError(f"input folder {folder} not found; pass --input_dir with a folder of images")
    files = sorted(p for p in path.iterdir() if p.name.lower().endswith(IMAGE_SUFFIXES) and not p.name.startswith("."))
    if not files:
        raise ConfigError(f"no images in {folder}; expected files ending in {', '.join(IMAGE_SUFFIXES)}")
    return [{"image": str(p)} for p in files]


def images_of(datalist: str, dataset_dir: str, key: str = "training") -> list[dict]:
    """The image paths of one split (labels dropped: the pretext stages use the training images only)."""
    return [{"image": r["image"]} for r in records_of(datalist, dataset_dir, key)]


def records_of(
    datalist: str, dataset_dir: str, key: str = "training", label_fraction: float | None = None, seed: int = 0,
    dataset: str | None = None,
) -> list[dict]:  # fmt: skip
    """Records of one split with absolute paths, after checking that every file exists.

    ``label_fraction`` keeps a seeded, per-class stratified fraction of the records (paper Figure 4); only the
    training split may be subsampled.
    """
    check_datalist(datalist, dataset_dir, keys=(key,))
    segmentation = dataset is None or get_dataset(dataset).task != "cls"
    records = load_decathlon_datalist(datalist, is_segmentation=segmentation, data_list_key=key, base_dir=dataset_dir)
    if label_fraction is not None and float(label_fraction) < 1.0:
        if key != "training":
            raise ConfigError(f"label_fraction applies to the training split only, not {key!r}")
        before = len(records)
        records = subsample_labels(records, float(label_fraction), seed)
        logger.info("label_fraction %s: %d of %d training records kept", label_fraction, len(records), before)
    if not records:
        raise ConfigError(f"the {key!r} split of {datalist} is empty")
    return records


def cpu_workers(cap: int = 8) -> int:
    """Data-loading workers from the CPU count (leaving one core for the training loop)."""
    return max(0, min(cap, (os.cpu_count() or 1) - 1))


def demo_dataset(dataset: str, folder: str) -> str:
    """The demo dataset of ``dataset`` under ``folder`` with its ``datalist.json``, made on first use; returns the
    dataset root (the ``dataset_dir`` of the demo overlay)."""
    from tpp_monai.data import build_datalist, make_demo_dataset, write_datalist
    from tpp_monai.data.demo import MARKER

    folder_path = Path(folder)

    def existing() -> str | None:
        for marker in folder_path.glob(f"*/{MARKER}"):
            if json.loads(marker.read_text()).get("dataset") == dataset:
                roots = [p.parent for p in marker.parent.rglob("datalist.json")]
                if roots:
                    return str(roots[0])
        return None

    found = existing()
    if found:
        return found
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun rank 0 writes the data; the others wait for it
        deadline = time.time() + 600
        while time.time() < deadline:
            time.sleep(0.5)
            found = existing()
            if found:
                return found
        raise ConfigError(f"rank {os.environ['RANK']}: the demo dataset under {folder} did not appear within 600 s")
    root = make_demo_dataset(dataset, folder_path)
    write_datalist(build_datalist(dataset, root), root / "datalist.json")
    return str(root)


def data_loader(dataset: object, batch_size: int, shuffle: bool, num_workers: int) -> object:
    """MONAI's ``DataLoader`` over ``dataset``, sharded by a ``DistributedSampler`` when a process group exists
    (``multi_gpu.json`` under torchrun), shuffled otherwise when ``shuffle``. Training loaders (``shuffle``) drop
    a last incomplete batch when there is more than one batch, and keep their workers between epochs."""
    import torch
    from monai.data import DataLoader

    from tpp_monai.workflows.distributed import distributed_sampler

    sampler = distributed_sampler(dataset, shuffle=shuffle)
    extra = {"drop_last": len(dataset) > int(batch_size), "persistent_workers": int(num_workers) > 0} if shuffle else {}
    return DataLoader(
        dataset, batch_size=int(batch_size), sampler=sampler, shuffle=sampler is None and bool(shuffle),
        num_workers=int(num_workers), pin_memory=torch.cuda.is_available(), **extra,
    )  # fmt: skip


def image_meta(batch: list) -> list:
    """The image metadata of every item of a decollated batch (the file names in ``metrics.csv`` and
    ``predictions.csv``)."""
    return [item["image"].meta for item in batch]


def progress_bars() -> bool:
    """Whether to draw progress bars: on a terminal, on rank 0 (a log file would collect every carriage return)."""
    import sys

    return sys.stderr.isatty() and int(os.environ.get("RANK", "0")) == 0
