"""Images and labels read in full, and checked, before the app stores or uses them.

A file's header says little: a truncated PNG or NIfTI has a valid one, a PNG header can claim 100000 x 100000
pixels, a JPEG can be named ``.png``. :func:`read_image` therefore decodes every pixel (after checking the header's
pixel count against a limit, so an oversized claim is refused before any memory is spent), and :func:`check_label`
adds what a label must be: single-channel, in a lossless format, of its image's size, with integer values among
the model's classes. Every refusal is a :class:`~tpp_monai.label.guard.RequestRefused` (400) naming the problem.

Shapes: 2D files ``(H, W)``; volumes ``(X, Y, Z)`` (NIfTI and NRRD alike). No ``monailabel`` import.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from tpp_monai.label.guard import RequestRefused

IMAGE_2D = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
IMAGE_3D = (".nii.gz", ".nii", ".nrrd")  # self-contained volumes (no detached data file to follow)
LOSSLESS_2D = ("PNG", "BMP", "TIFF")  # PIL format names; a TIFF must not be JPEG-compressed
LOSSY_TIFF = ("jpeg", "tiff_jpeg", "webp")
DEFAULT_MAX_PIXELS = 2**28  # --conf max_image_pixels: pixels (voxels) times channels of one image


def dims_of(name: str) -> int:
    """2 or 3 by the file name's extension; 0 when it is neither kind."""
    low = name.lower()
    return 2 if low.endswith(IMAGE_2D) else 3 if low.endswith(IMAGE_3D) else 0


@dataclass(frozen=True)
class Decoded:
    """A fully decoded file: its spatial shape, channels per pixel, reader format and (labels) its values."""

    shape: tuple[int, ...]
    channels: int
    format: str
    array: np.ndarray | None = None
    lossy: bool = False


def read_image(path: str, name: str, max_pixels: int = DEFAULT_MAX_PIXELS, keep_array: bool = False) -> Decoded:
    """Decode ``path`` (``name``: how the client called it, for messages) in full; refused when unreadable, of an
    unknown kind, or larger than ``max_pixels`` (checked on the header first)."""
    dims = dims_of(path)
    if not dims:
        raise RequestRefused(f"{name}: not an image this server reads ({', '.join(IMAGE_2D + IMAGE_3D)})", 415)
    try:
        if dims == 2:
            return _read_2d(path, name, max_pixels, keep_array)
        if path.lower().endswith(".nrrd"):
            _refuse_detached_nrrd(path, name)
            return _read_sitk(path, name, max_pixels, keep_array)
        return _read_nifti(path, name, max_pixels, keep_array)
    except RequestRefused:
        raise
    except Exception as err:  # any reader error: the file is not a complete image
        raise RequestRefused(f"{name} is not a readable image: {type(err).__name__}: {err}"[:500]) from None


def _over(name: str, count: int, max_pixels: int) -> RequestRefused:
    return RequestRefused(
        f"{name} has {count} pixels (times channels), over this server's limit of {max_pixels} (--conf "
        "max_image_pixels)",
        413,
    )


def _read_2d(path: str, name: str, max_pixels: int, keep_array: bool) -> Decoded:
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(path)
        except Image.DecompressionBombError as err:  # PIL's own limit (the server sets it from max_pixels)
            raise RequestRefused(f"{name}: {err} (--conf max_image_pixels {max_pixels})", 413) from None
        with img:
            width, height = img.size
            channels = len(img.getbands())
            if width * height * channels > max_pixels:
                raise _over(name, width * height * channels, max_pixels)
            img.load()  # every pixel: a truncated file fails here
            compression = str(img.info.get("compression", "")).lower()
            lossy = img.format not in LOSSLESS_2D or compression in LOSSY_TIFF
            array = np.asarray(img) if keep_array else None
            return Decoded((height, width), channels, f"{img.format} {img.mode}", array, lossy)


def _read_nifti(path: str, name: str, max_pixels: int, keep_array: bool) -> Decoded:
    import nibabel as nib

    img = nib.load(path)
    shape = tuple(int(n) for n in img.shape)
    if int(np.prod(shape)) > max_pixels:
        raise _over(name, int(np.prod(shape)), max_pixels)
    array = np.asarray(img.dataobj)  # reads (and decompresses) the whole volume: a truncated file fails here
    spatial, channels = _volume_shape(shape, name)
    return Decoded(spatial, channels, "NIfTI", array if keep_array else None)


def _refuse_detached_nrrd(path: str, name: str) -> None:
    """A NRRD header can name another file to read the voxels from (``data file:``): refused, never followed."""
    with open(path, "rb") as f:
        head = f.read(65536)
    for line in head.split(b"\n\n", 1)[0].splitlines():
        key = line.split(b":", 1)[0].strip().lower().replace(b" ", b"")
        if key == b"datafile":
            raise RequestRefused(f"{name}: a NRRD file with a detached data file is not read; send one .nrrd file")


def _read_sitk(path: str, name: str, max_pixels: int, keep_array: bool) -> Decoded:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    size = tuple(int(n) for n in reader.GetSize())
    channels = int(reader.GetNumberOfComponents())
    if int(np.prod(size)) * channels > max_pixels:
        raise _over(name, int(np.prod(size)) * channels, max_pixels)
    image = reader.Execute()
    array = sitk.GetArrayFromImage(image)  # (Z, Y, X[, C])
    if len(size) != 3:
        raise RequestRefused(f"{name} has {len(size)} dimensions {size}; a volume has 3")
    array = np.moveaxis(array, (0, 1, 2), (2, 1, 0)) if keep_array else None
    return Decoded(size, channels, "NRRD", array)


def _volume_shape(shape: tuple[int, ...], name: str) -> tuple[tuple[int, ...], int]:
    if len(shape) == 3:
        return shape, 1
    if len(shape) > 3 and all(n == 1 for n in shape[4:]):
        return shape[:3], shape[3]
    raise RequestRefused(f"{name} has shape {shape}; a volume has 3 dimensions (optionally channels after them)")


def check_label(path: str, name: str, image_shape: tuple[int, ...], values: Collection[int], classes: str,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:  # fmt: skip
    """A label upload: decoded in full, one channel, lossless, ``image_shape``, integer values within ``values``
    (``classes`` describes them for the message)."""
    label = read_image(path, name, max_pixels, keep_array=True)
    array = label.array
    assert array is not None
    if label.lossy:
        raise RequestRefused(
            f"{name} is {label.format}, a lossy format: a label must be lossless (PNG, BMP or uncompressed/LZW TIFF "
            "for 2D; NIfTI or NRRD for volumes), or its class values blur"
        )
    if label.channels != 1:
        raise RequestRefused(f"{name} has {label.channels} channels ({label.format}); a label has one (class values)")
    if label.shape != tuple(image_shape):
        raise RequestRefused(
            f"{name} has shape {label.shape}, its image {tuple(image_shape)}: a label must have its image's size "
            "(one value per pixel/voxel)"
        )
    array = array.reshape(label.shape)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        finite = np.isfinite(array).all()
        if not finite or not np.equal(np.mod(array, 1), 0).all():
            raise RequestRefused(f"{name} holds non-integer values; label values are class indices ({classes})")
    found = np.unique(array)
    allowed = set(values)
    bad = [v for v in found.tolist() if int(v) not in allowed or int(v) != v]
    if bad:
        shown = ", ".join(str(int(v)) for v in bad[:8]) + (" ..." if len(bad) > 8 else "")
        raise RequestRefused(
            f"{name} holds value(s) {shown}, which are not class values here ({classes}); a 0/255 mask must be "
            "saved as 0/1"
        )
    return label
