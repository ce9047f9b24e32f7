"""Random views for the pretext stages, on top of each dataset's deterministic loading chain.

* MAE: a random resized crop (area 0.2-1, anti-aliased bicubic) to the pretext size and a horizontal flip, as
  MedCoSS's MAE; MIM the same with SimMIM's area 0.67-1.
* DINO: two global crops (area 0.4-1) and ``num_local`` local crops (0.05-0.4), each flipped, colour-jittered
  (0.4, 0.4, 0.2, 0.1; p 0.8), greyscaled (p 0.2), blurred (one sigma in 0.1-2 for both axes; p 1.0 / 0.1 / 0.5)
  and, for the second global crop, solarised (p 0.2), as DINO's ``DataAugmentationDINO``. Colour operations run on
  [0, 1] intensities; datasets whose fine-tuning input is z-scored (2D segmentation) are z-scored per crop
  afterwards, so every crop has the intensity statistics the fine-tuning stage feeds the backbone.
* DINO on 3D CT (:func:`dino_transforms_3d`; the STU-Net arm, paper §5.4): after the fine-tuning loading chain
  (RAS, 0.8 x 0.8 x 1.5 mm, per-volume z-score: the intensities STU-Net's frozen weights saw) the volume is cropped
  to its body (voxels above the volume mean), and one region of 1.5x the global crop in-plane is drawn; every view
  comes from that region, so global and local views overlap (DeSD draws all crops from one pre-crop). Each view is
  a random box with in-plane scale jitter (the slice axis is never rescaled), resized to the view size (sizes
  respecting STU-Net's divisibility and bottleneck rules, checked by the pretext network), flipped on every axis,
  and given DeSD's intensity set: Gaussian noise, blur (one sigma for all axes as batchgenerators' default; DINO's
  p 1.0 / 0.1 / 0.5 for global 1 / global 2 / local), multiplicative brightness 0.75-1.25, additive shift and gamma
  contrast.
* MAE and MIM on 3D volumes (:func:`masked_transforms_3d`): the same loading and body crop, then one random box of
  the pretext size per volume with the in-plane scale jitter of the DINO views, flipped on every axis; no intensity
  changes (the reconstruction target is the view itself).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    CropForegroundd,
    GaussianSmooth,
    MapTransform,
    NormalizeIntensity,
    RandAdjustContrastd,
    RandFlipd,
    RandGaussianNoised,
    Randomizable,
    RandomizableTransform,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    Resize,
    ScaleIntensityRanged,
    SpatialPadd,
)
from monai.utils import MAX_SEED

from tpp_monai.data import get_dataset, image_transforms
from tpp_monai.data.transforms import W_AXIS, RandColorJitterd, RandGrayscaled
from tpp_monai.errors import ConfigError


class RandResizedCropd(Randomizable, MapTransform):
    """Crop a random area fraction and aspect ratio, then resize to ``size`` (torchvision's RandomResizedCrop).

    The box follows torchvision's ``get_params`` (10 draws; else its fallback, a central crop of the whole image
    clamped to the aspect-ratio range). The resize is bicubic with anti-aliasing (PyTorch's ``antialias=True``, the
    PIL filter that torchvision applies to PIL images), so a downscaled crop is low-pass filtered as in MAE and DINO.
    MONAI's ``RandSpatialCrop`` draws each side independently and has no area/aspect parametrisation, and MONAI's
    ``Resize`` has no PIL-style anti-aliased bicubic, hence this transform.

    Bicubic weights are negative near an edge, so a hard edge overshoots (a 0/1 image gives about [-0.03, 1.03]).
    PIL and torchvision resize 8-bit images and clamp to [0, 255]; ``value_range`` (the range of the intensities
    this transform receives, e.g. ``(0, 1)``) clamps the same way, so later colour operations see valid values.
    ``None``: no clamp (z-scored inputs have no fixed range).
    """

    def __init__(
        self, keys: KeysCollection, size: Sequence[int], scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3), mode: str = "bicubic",
        value_range: tuple[float, float] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(keys)
        self.size, self.scale, self.ratio, self.mode = tuple(int(v) for v in size), scale, ratio, mode
        self.value_range = None if value_range is None else (float(value_range[0]), float(value_range[1]))
        self._box = (0, 0, 1, 1)

    def randomize(self, shape: Sequence[int]) -> None:
        h, w = shape
        area = h * w
        for _ in range(10):
            target = area * self.R.uniform(*self.scale)
            aspect = math.exp(self.R.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
            cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                self._box = (int(self.R.randint(0, h - ch + 1)), int(self.R.randint(0, w - cw + 1)), ch, cw)
                return
        self._box = central_crop_box(h, w, self.ratio)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        first = d[self.first_key(d)]
        self.randomize(first.shape[-2:])
        top, left, ch, cw = self._box
        for key in self.key_iterator(d):
            crop = torch.as_tensor(d[key][..., top : top + ch, left : left + cw]).float()
            out = F.interpolate(crop[None], size=self.size, mode=self.mode, antialias=True, align_corners=False)[0]
            d[key] = out if self.value_range is None else out.clamp_(*self.value_range)
        return d


def central_crop_box(h: int, w: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop fallback ``(top, left, height, width)``: the whole image, clamped to the
    aspect-ratio range (width / height) by cropping the longer side, centred."""
    aspect = w / h
    if aspect < min(ratio):
        cw, ch = w, round(w / min(ratio))
    elif aspect > max(ratio):
        cw, ch = round(h * max(ratio)), h
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


class RandIsotropicGaussianSmoothd(RandomizableTransform, MapTransform):
    """Gaussian blur with one sigma drawn from ``sigma`` for all spatial axes (DINO's ``GaussianBlur``: one PIL
    radius per image). MONAI's ``RandGaussianSmoothd`` draws a sigma per axis independently, hence this transform."""

    def __init__(self, keys: KeysCollection, sigma: tuple[float, float] = (0.1, 2.0), prob: float = 0.5) -> None:
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys)
        self.sigma_range = sigma
        self.sigma = float(sigma[0])

    def randomize(self, data: object = None) -> None:
        super().randomize(None)
        if self._do_transform:
            self.sigma = float(self.R.uniform(*self.sigma_range))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        self.randomize()
        if self._do_transform:
            for key in self.key_iterator(d):
                d[key] = GaussianSmooth(sigma=self.sigma)(d[key])
        return d


class RandSolarized(RandomizableTransform, MapTransform):
    """Invert intensities at or above ``threshold`` (DINO's solarisation on [0, 1] images); MONAI has none."""

    def __init__(self, keys: KeysCollection, prob: float = 0.2, threshold: float = 0.5) -> None:
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys)
        self.threshold = threshold

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        self.randomize(None)
        if self._do_transform:
            for key in self.key_iterator(d):
                d[key] = torch.where(d[key] >= self.threshold, 1.0 - d[key], d[key])
        return d


def _unit_range_chain(dataset: str, image_size: Sequence[int] | None) -> tuple[list, bool]:
    """The dataset's image loading chain with intensities in [0, 1]; whether the dataset z-scores afterwards."""
    info = get_dataset(dataset)
    if info.spatial_dims != 2:
        raise ConfigError(f"the 2D pretext transforms do not apply to the 3D dataset {dataset!r}")
    chain = image_transforms(dataset, image_size)
    if info.task == "cls":
        return chain, False
    # 2D segmentation: the chain ends with the per-image z-score; keep [0, 255] -> [0, 1] instead.
    return [*chain[:-1], ScaleIntensityRanged(keys="image", a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0)], True


def mae_transforms(
    dataset: str, pretext_size: int, image_size: Sequence[int] | None = None, scale: tuple[float, float] = (0.2, 1.0)
) -> Compose:
    """Image loading (cacheable) + MAE's random resized crop (area ``scale``: 0.2-1) and horizontal flip; the crop is
    clamped to [0, 1] where the loading chain gives [0, 1] intensities (classification; segmentation is z-scored)."""
    chain = list(image_transforms(dataset, image_size))
    unit = (0.0, 1.0) if get_dataset(dataset).task == "cls" else None
    chain += [
        RandResizedCropd(keys="image", size=(pretext_size, pretext_size), scale=scale, value_range=unit),
        RandFlipd(keys="image", spatial_axis=W_AXIS, prob=0.5),
    ]
    return Compose(chain)


def mim_transforms(dataset: str, pretext_size: int, image_size: Sequence[int] | None = None) -> Compose:
    """Image loading (cacheable) + SimMIM's views (``SimMIMTransform``): a random resized crop of area 0.67-1 and a
    horizontal flip (the mask is drawn by the pretext network)."""
    return mae_transforms(dataset, pretext_size, image_size, scale=(0.67, 1.0))


class MultiCropd(Randomizable, MapTransform):
    """Turn ``image`` into ``crops``: a list of augmented views (global crops first)."""

    def __init__(self, views: Sequence[Compose], zscore: bool) -> None:
        super().__init__(keys="image")
        self.views = list(views)
        self.normalize = NormalizeIntensity(channel_wise=True) if zscore else None

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> MultiCropd:
        super().set_random_state(seed, state)
        for view in self.views:
            view.set_random_state(seed=int(self.R.randint(MAX_SEED)))
        return self

    def randomize(self, data: object = None) -> None:
        pass

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        image = d.pop("image")
        crops = [view({"image": image})["image"] for view in self.views]
        if self.normalize is not None:
            crops = [self.normalize(c) for c in crops]
        d["crops"] = crops
        return d


def dino_transforms(
    dataset: str, global_size: int = 224, local_size: int = 96, num_local: int = 8,
    global_scale: tuple[float, float] = (0.4, 1.0), local_scale: tuple[float, float] = (0.05, 0.4),
    image_size: Sequence[int] | None = None,
) -> Compose:  # fmt: skip
    """Image loading (cacheable) + DINO's multi-crop augmentation; the sample's ``crops`` key holds the views."""
    chain, zscore = _unit_range_chain(dataset, image_size)

    def view(size: int, scale: tuple[float, float], blur: float, solarize: float) -> Compose:
        steps = [
            RandResizedCropd(keys="image", size=(size, size), scale=scale, value_range=(0.0, 1.0)),  # [0, 1] in
            RandFlipd(keys="image", spatial_axis=W_AXIS, prob=0.5),
            RandColorJitterd(keys="image", prob=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1),
            RandGrayscaled(keys="image", prob=0.2),
            RandIsotropicGaussianSmoothd(keys="image", sigma=(0.1, 2.0), prob=blur),
        ]
        if solarize:
            steps.append(RandSolarized(keys="image", prob=solarize))
        return Compose(steps)

    views = [view(global_size, global_scale, 1.0, 0.0), view(global_size, global_scale, 0.1, 0.2)]
    views += [view(local_size, local_scale, 0.5, 0.0) for _ in range(num_local)]
    return Compose([*chain, MultiCropd(views, zscore)])


# --------------------------------------------------------------------------------------------------------------
# 3D (STU-Net): DINO multi-crop of CT volumes


class RandInPlaneScaledCropd(Randomizable, MapTransform):
    """A random box of ``size`` with its in-plane sides (``axes``) scaled by one factor from ``scale``, resized back
    to ``size`` (trilinear): DeSD's in-plane scale jitter, with the slice axis never rescaled. Boxes are clipped to
    the image (then resized up)."""

    def __init__(
        self, keys: KeysCollection, size: Sequence[int], scale: tuple[float, float] = (0.8, 1.2),
        axes: Sequence[int] = (0, 1),
    ) -> None:  # fmt: skip
        super().__init__(keys)
        self.size, self.scale, self.axes = tuple(int(v) for v in size), scale, set(axes)
        self.resize = Resize(spatial_size=self.size, mode="trilinear")
        self._box: list[slice] = []

    def randomize(self, shape: Sequence[int]) -> None:
        factor = self.R.uniform(*self.scale)
        sides = [min(n, max(1, round(s * factor) if a in self.axes else s)) for a, (n, s) in
                 enumerate(zip(shape, self.size))]  # fmt: skip
        starts = [int(self.R.randint(0, n - side + 1)) for n, side in zip(shape, sides)]
        self._box = [slice(b, b + side) for b, side in zip(starts, sides)]

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        self.randomize(d[self.first_key(d)].shape[1:])
        for key in self.key_iterator(d):
            d[key] = self.resize(d[key][(slice(None), *self._box)])
        return d


def dino_transforms_3d(
    dataset: str, global_size: Sequence[int] = (96, 96, 64), local_size: Sequence[int] = (48, 48, 32),
    num_local: int = 4, global_scale: tuple[float, float] = (0.8, 1.2), local_scale: tuple[float, float] = (0.8, 1.2),
    context: float = 1.5,
) -> Compose:  # fmt: skip
    """Volume loading as in fine-tuning (cacheable, body-cropped) + DINO multi-crop in 3D (module docstring); the
    sample's ``crops`` key holds 2 global and ``num_local`` local views, each ``[1, x, y, z]`` (RAS axes)."""
    info = get_dataset(dataset)
    if info.spatial_dims != 3:
        raise ConfigError(f"the 3D DINO views do not apply to the 2D dataset {dataset!r}")
    region = (math.ceil(global_size[0] * context), math.ceil(global_size[1] * context), int(global_size[2]))

    def view(size: Sequence[int], scale: tuple[float, float], blur: float) -> Compose:
        return Compose(
            [
                RandInPlaneScaledCropd(keys="image", size=size, scale=scale),
                *(RandFlipd(keys="image", spatial_axis=a, prob=0.5) for a in range(3)),
                RandGaussianNoised(keys="image", prob=0.1, std=0.1),
                RandIsotropicGaussianSmoothd(keys="image", sigma=(0.1, 2.0), prob=blur),
                RandScaleIntensityd(keys="image", factors=0.25, prob=0.8),
                RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
                RandAdjustContrastd(keys="image", prob=0.3, gamma=(0.7, 1.5), retain_stats=True),
            ]
        )

    views = [view(global_size, global_scale, 1.0), view(global_size, global_scale, 0.1)]
    views += [view(local_size, local_scale, 0.5) for _ in range(num_local)]
    return Compose(
        [
            *image_transforms(dataset),
            # the body's bounding box: z-scored CT is positive in tissue and negative in the surrounding air
            CropForegroundd(keys="image", source_key="image", allow_smaller=True),
            SpatialPadd(keys="image", spatial_size=region),
            RandSpatialCropd(keys="image", roi_size=region, random_size=False),
            MultiCropd(views, zscore=False),
        ]
    )


def masked_transforms_3d(
    dataset: str, size: Sequence[int], scale: tuple[float, float] = (0.8, 1.2)
) -> Compose:  # fmt: skip
    """Volume loading as in fine-tuning (cacheable, body-cropped) + one random view of ``size`` (x, y, z) per volume
    for the reconstruction pretexts (MAE, MIM): in-plane scale jitter and flips on every axis."""
    info = get_dataset(dataset)
    if info.spatial_dims != 3:
        raise ConfigError(f"the 3D masked-modelling views do not apply to the 2D dataset {dataset!r}")
    size = tuple(int(s) for s in size)
    return Compose(
        [
            *image_transforms(dataset),
            CropForegroundd(keys="image", source_key="image", allow_smaller=True),
            SpatialPadd(keys="image", spatial_size=size),
            RandInPlaneScaledCropd(keys="image", size=size, scale=scale),
            *(RandFlipd(keys="image", spatial_axis=a, prob=0.5) for a in range(3)),
        ]
    )
