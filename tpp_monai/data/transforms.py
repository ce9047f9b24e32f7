"""The one preprocessing of every workflow: MONAI dictionary transform chains per dataset.

Keys ``image`` and, where the record has a mask, ``label``. Three families (``datasets.md`` §0.3, ``methods.md``
§1.1, ``stunet.md`` §4.3):

- **classification** (MHIST, OCT-C8, Chest X-ray PA): RGB (grey images repeated to 3 channels), bilinear
  anti-aliased resize to ``image_size`` (224), intensities scaled to [0, 1] with *no* mean/std normalisation
  (MedCoSS ``ToTensor`` only). Training adds MedCoSS's recipe: colour jitter (0.4, 0.4, 0.4, 0.1; p 0.8), random
  greyscale (p 0.2), Gaussian blur (sigma 0.1-2; p 0.5), horizontal flip.
- **2D segmentation** (GlaS 512, QaTa 224): image and mask resized to ``image_size`` (mask nearest, binarised
  to {0, 1}: GlaS instance ids > 0 and QaTa 255 -> 1), then a per-image, per-channel z-score. Metrics are computed
  at this resolution, as MedCoSS does. Training adds a batchgenerators-like set: rotation +-15 deg, scaling
  0.75-1.25 and elastic deformation (each p 0.1), mirroring on both axes, multiplicative brightness 0.7-1.5,
  inverted gamma 0.5-2, Gaussian noise (sd 0-0.05) and blur (sigma 0.5-1.5), each p 0.15.
- **3D CT** (LiTS, KiTS19): orientation RAS, spacing 0.8 x 0.8 x 1.5 mm (MOTS/MedCoSS), per-image z-score over
  the whole volume (STU-Net's 'nonCT' normalisation, which its frozen pretrained weights saw; nnU-Net's CT
  percentile scheme would shift their input statistics; ``stunet.md`` §4.3 option ii), labels kept as 0/1/2.
  Training pads to the patch, samples ``image_size`` patches centred on background, organ and tumour with equal
  odds (tumour oversampling), then rotation/scaling (p 0.2), flips, and the MOTS intensity set (noise, blur,
  brightness, contrast, low resolution). Elastic deformation is left out: 3D elastic resampling costs seconds per
  patch on a CPU.

2D arrays are ``(C, H, W)`` as MedCoSS's ``PIL -> ToTensor`` gives them (MONAI's PIL reader would otherwise
transpose to ``(C, W, H)``), so the pretrained ViTs see upright images; write 2D masks back with
``reverse_indexing=False`` as well. 3D images go through :class:`monai.transforms.LoadImaged`'s default reader
choice: nibabel for NIfTI, ITK for a DICOM series folder.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import PILReader
from monai.transforms import (
    AsDiscreted,
    ClassesToIndicesd,
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    Rand2DElasticd,
    RandAdjustContrastd,
    RandAffined,
    RandCropByLabelClassesd,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandomizableTransform,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandShiftIntensityd,
    RandSimulateLowResolutiond,
    Resized,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)
from monai.utils import convert_to_dst_type, convert_to_tensor
from PIL import Image

from tpp_monai.data.common import mask_mode
from tpp_monai.data.info import DatasetInfo, get_dataset

SPACING_3D = (0.8, 0.8, 1.5)  # mm in RAS (x, y, z): MOTS/MedCoSS resample to 1.5 x 0.8 x 0.8 (z, y, x)
W_AXIS = 1  # spatial axis of the image width in the (C, H, W) 2D arrays: the horizontal flip
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as torchvision's rgb_to_grayscale
_PAIR = ("image", "label")


def _info_and_size(dataset: str, image_size: int | Sequence[int] | None) -> tuple[DatasetInfo, tuple[int, ...]]:
    info = get_dataset(dataset)
    if image_size is None:
        return info, tuple(info.image_size)
    size = (int(image_size),) * info.spatial_dims if isinstance(image_size, int) else tuple(int(s) for s in image_size)
    if len(size) != info.spatial_dims or min(size) < 1:
        raise ValueError(f"image_size for {info.name} must be {info.spatial_dims} positive ints; got {image_size!r}")
    return info, size


# --------------------------------------------------------------------------------------------------------------
# Reading 2D files (module-level converters so that the chains pickle into DataLoader workers).


def to_rgb(im: Any) -> Any:
    """PIL converter: every image to 8-bit RGB (grey X-rays and OCT scans are repeated to 3 channels, as
    MedCoSS's ``cv2.imread`` + ``convert("RGB")`` does). High-bit grey (16-bit PNG) is scaled by its maximum."""
    if im.mode.startswith("I") or im.mode == "F":
        values = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(values * 255.0 / max(values.max(), 1.0), 0, 255).astype(np.uint8))
    return im if im.mode == "RGB" else im.convert("RGB")


def _load_2d(key: str, converter: Any) -> LoadImaged:
    return LoadImaged(keys=key, reader=PILReader(converter=converter, reverse_indexing=False), image_only=True)


def _deterministic_2d(info: DatasetInfo, size: tuple[int, ...], with_label: bool) -> list:
    seg = with_label and info.task == "seg"
    keys = list(_PAIR) if seg else ["image"]
    chain = [_load_2d("image", to_rgb)]
    if seg:
        chain.append(_load_2d("label", mask_mode))
    chain += [
        EnsureChannelFirstd(keys=keys),
        Resized(
            keys=keys,
            spatial_size=size,
            mode=("bilinear", "nearest-exact")[: len(keys)],
            anti_aliasing=(True, False)[: len(keys)],
        ),
    ]
    if seg:
        chain.append(AsDiscreted(keys="label", threshold=0.5))  # GlaS instance ids / QaTa 255 -> 1
    if info.task == "cls":
        chain.append(ScaleIntensityRanged(keys="image", a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0))
    else:
        chain.append(NormalizeIntensityd(keys="image", channel_wise=True))
    return chain


def _deterministic_3d(keys: Sequence[str]) -> list:
    return [
        LoadImaged(keys=keys, image_only=True),
        EnsureChannelFirstd(keys=keys),
        Orientationd(keys=keys, axcodes="RAS", labels=None),
        Spacingd(keys=keys, pixdim=SPACING_3D, mode=("bilinear", "nearest")[: len(keys)]),
        NormalizeIntensityd(keys="image", channel_wise=True),
    ]


# --------------------------------------------------------------------------------------------------------------
# Public chains


def image_transforms(dataset: str, image_size: int | Sequence[int] | None = None) -> list:
    """Deterministic loading of the image alone (no label): what the pretext stages and inference build on.

    2D: read, RGB, resize to ``image_size``, the dataset's intensity handling. 3D: read, RAS, spacing, z-score
    (no resizing: 3D inference is sliding-window).
    """
    info, size = _info_and_size(dataset, image_size)
    return _deterministic_3d(["image"]) if info.spatial_dims == 3 else _deterministic_2d(info, size, False)


def deterministic_train_transforms(dataset: str, image_size: int | Sequence[int] | None = None) -> list:
    """The cacheable first part of :func:`train_transforms` (image + label, no randomness)."""
    info, size = _info_and_size(dataset, image_size)
    if info.spatial_dims == 2:
        return _deterministic_2d(info, size, True)
    return [
        *_deterministic_3d(_PAIR),
        SpatialPadd(keys=_PAIR, spatial_size=size),  # volumes smaller than the patch (z-score 0 = mean, as nnU-Net)
        # Per-class voxel indices once, at most 100k per class, so the crop need not scan the volume every time.
        ClassesToIndicesd(keys="label", num_classes=len(info.classes), max_samples_per_class=100_000),
    ]


def random_train_transforms(dataset: str, image_size: int | Sequence[int] | None = None) -> list:
    """The random second part of :func:`train_transforms`: the fine-tuning augmentations."""
    info, size = _info_and_size(dataset, image_size)
    if info.task == "cls":
        return [
            RandColorJitterd(keys="image", prob=0.8, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1),
            RandGrayscaled(keys="image", prob=0.2),
            RandGaussianSmoothd(keys="image", sigma_x=(0.1, 2.0), sigma_y=(0.1, 2.0), prob=0.5),
            RandFlipd(keys="image", spatial_axis=W_AXIS, prob=0.5),
        ]
    if info.task == "seg":
        spacing = max(size) // 4  # elastic control points: 5 per side, displaced up to 1/10 of their spacing
        return [
            RandAffined(keys=_PAIR, prob=0.1, rotate_range=math.pi / 12, mode=("bilinear", "nearest")),
            RandAffined(keys=_PAIR, prob=0.1, scale_range=0.25, mode=("bilinear", "nearest")),
            Rand2DElasticd(
                keys=_PAIR,
                prob=0.1,
                spacing=spacing,
                magnitude_range=(0.0, spacing / 10),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            RandFlipd(keys=_PAIR, spatial_axis=0, prob=0.5),
            RandFlipd(keys=_PAIR, spatial_axis=1, prob=0.5),
            RandScaleIntensityd(keys="image", factors=(-0.3, 0.5), prob=0.15, channel_wise=True),
            RandAdjustContrastd(keys="image", prob=0.15, gamma=(0.5, 2.0), invert_image=True, retain_stats=True),
            RandGaussianNoised(keys="image", prob=0.15, std=0.05),
            RandGaussianSmoothd(keys="image", sigma_x=(0.5, 1.5), sigma_y=(0.5, 1.5), prob=0.15),
        ]
    return [
        RandCropByLabelClassesd(
            keys=_PAIR,
            label_key="label",
            spatial_size=size,
            ratios=[1] * len(info.classes),
            num_classes=len(info.classes),
            num_samples=1,
            indices_key="label_cls_indices",
            warn=False,
        ),
        RandAffined(
            keys=_PAIR,
            prob=0.2,
            rotate_range=(math.pi / 12,) * 3,
            scale_range=((-0.15, 0.25),) * 3,
            mode=("bilinear", "nearest"),
            padding_mode="border",
        ),
        RandFlipd(keys=_PAIR, spatial_axis=0, prob=0.5),
        RandFlipd(keys=_PAIR, spatial_axis=1, prob=0.5),
        RandFlipd(keys=_PAIR, spatial_axis=2, prob=0.5),
        RandGaussianNoised(keys="image", prob=0.1, std=0.1),
        RandGaussianSmoothd(keys="image", sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=0.2),
        RandScaleIntensityd(keys="image", factors=0.25, prob=0.15),
        RandShiftIntensityd(keys="image", offsets=0.1, prob=0.15),
        RandScaleIntensityFixedMeand(keys="image", factors=0.25, preserve_range=True, prob=0.15),
        RandSimulateLowResolutiond(keys="image", prob=0.25, zoom_range=(0.5, 1.0)),
    ]


def train_transforms(dataset: str, image_size: int | Sequence[int] | None = None) -> Compose:
    """Image + label chain for fine-tuning: :func:`deterministic_train_transforms` then
    :func:`random_train_transforms`. A ``CacheDataset`` caches up to the first random transform by itself.

    3D: the patch crop returns a list of one sample per record; use MONAI's ``DataLoader`` (``list_data_collate``).
    """
    return Compose(deterministic_train_transforms(dataset, image_size) + random_train_transforms(dataset, image_size))


def eval_transforms(dataset: str, image_size: int | Sequence[int] | None = None) -> Compose:
    """Image + label chain for validation and test: 2D as in training without augmentation (metrics at
    ``image_size``); 3D full volumes at the training spacing with labels 0/1/2 (sliding-window inference)."""
    info, size = _info_and_size(dataset, image_size)
    return Compose(_deterministic_3d(_PAIR) if info.spatial_dims == 3 else _deterministic_2d(info, size, True))


# --------------------------------------------------------------------------------------------------------------
# Colour augmentations MONAI lacks. MedCoSS's classification recipe uses torchvision's ColorJitter (brightness,
# contrast, saturation, hue, applied together in a random order) and RandomGrayscale; MONAI has no saturation, hue
# or colour-to-grey transform, and torchvision is not installed here, so these two small transforms do the same
# on (3, H, W) tensors in [0, 1].


def _grey(img: torch.Tensor) -> torch.Tensor:
    return (img[0] * _LUMA[0] + img[1] * _LUMA[1] + img[2] * _LUMA[2]).unsqueeze(0)


def _rgb_to_hsv(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r, g, b = img
    maxc, minc = img.amax(0), img.amin(0)
    delta = maxc - minc
    sat = torch.where(maxc > 0, delta / maxc.clamp_min(1e-8), torch.zeros_like(maxc))
    d = delta.clamp_min(1e-8)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(delta > 0, (hue / 6.0) % 1.0, torch.zeros_like(hue))
    return hue, sat, maxc


def _hsv_to_rgb(hue: torch.Tensor, sat: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    sector = torch.floor(hue * 6.0)
    frac = hue * 6.0 - sector
    sector = sector.long() % 6
    p, q, t = val * (1 - sat), val * (1 - sat * frac), val * (1 - sat * (1 - frac))
    table = torch.stack(
        [
            torch.stack([val, q, p, p, t, val]),
            torch.stack([t, val, val, q, p, p]),
            torch.stack([p, p, t, val, val, q]),
        ]
    )  # (3 channels, 6 sectors, H, W)
    return table.gather(1, sector.expand(3, 1, *sector.shape)).squeeze(1)


def _apply_colour(img: torch.Tensor, op: int, factor: float) -> torch.Tensor:
    if op == 0:  # brightness
        return (img * factor).clamp(0, 1)
    if op == 1:  # contrast: blend with the mean grey level
        return (img * factor + (1 - factor) * _grey(img).mean()).clamp(0, 1)
    if op == 2:  # saturation: blend with the grey image
        return (img * factor + (1 - factor) * _grey(img)).clamp(0, 1)
    hue, sat, val = _rgb_to_hsv(img)  # hue: rotate the colour wheel
    return _hsv_to_rgb((hue + factor) % 1.0, sat, val)


class RandColorJitterd(RandomizableTransform, MapTransform):
    """torchvision ``RandomApply([ColorJitter(b, c, s, h)], p)`` for (3, H, W) images in [0, 1].

    With probability ``prob``: brightness, contrast and saturation factors drawn from ``[max(0, 1 - x), 1 + x]``
    and a hue shift from ``[-hue, hue]``, applied in a random order; one draw for all ``keys``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.8,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.4,
        hue: float = 0.1,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if not 0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5]; got {hue}")
        self.ranges = [(max(0.0, 1 - x), 1 + x) for x in (brightness, contrast, saturation)] + [(-hue, hue)]
        self.order: list[int] = []
        self.factors: list[float] = []

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        if self._do_transform:
            self.order = [int(i) for i in self.R.permutation(4)]
            self.factors = [float(self.R.uniform(lo, hi)) for lo, hi in self.ranges]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            img = convert_to_tensor(d[key], track_meta=False, dtype=torch.float32)
            for op in self.order:
                img = _apply_colour(img, op, self.factors[op])
            d[key] = convert_to_dst_type(img, d[key])[0]
        return d


class RandGrayscaled(RandomizableTransform, MapTransform):
    """torchvision ``RandomGrayscale(p)``: with probability ``prob`` replace an RGB image by its luma, kept as
    3 identical channels."""

    def __init__(self, keys: KeysCollection, prob: float = 0.2, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            img = convert_to_tensor(d[key], track_meta=False, dtype=torch.float32)
            d[key] = convert_to_dst_type(_grey(img).expand_as(img).contiguous(), d[key])[0]
        return d
