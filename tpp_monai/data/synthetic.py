"""The writers of the demo datasets: miniature synthetic images in each dataset's *official layout*, with a signal a
model can learn (each dataset's entry in :data:`tpp_monai.data.info.DATASETS` names its writer; the demo itself is
:func:`tpp_monai.data.demo.make_demo_dataset`).

A writer is ``write(root, n, rng, classes)``: ``n`` images or cases under the layout root ``root``, drawn from ``rng``;
``classes`` are the entry's, in label-index order. The builders read the result exactly like the real downloads (same
folder names, file formats, CSV headers, mask naming and label values). What can be learnt:

- MHIST: HP = many small round crypts; SSA = a few large, elongated crypts with saw-tooth borders.
- OCT-C8: retina-like bright layers whose waviness (cycles across the image) and layer count encode the class.
- Chest X-ray PA: normal = clear lungs; pneumonia = one large dense patch; covid = several hazy peripheral spots.
- GlaS: purple-rimmed glands on pink stroma; the instance masks are the glands (malignant ones are irregular).
  Appearance `"ihc"` (the TPP demo's target, :func:`write_glas_ihc`): large soft-bordered glands, DAB-brown on a blue
  counterstain.
- QaTa: bright hazy opacities in the lungs; the 0/255 masks mark them.
- LiTS / KiTS19: a bright liver / two kidneys in a body in air, with a darker/brighter tumour inside (labels 1, 2).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

Rng = np.random.Generator


# --------------------------------------------------------------------------------------------------------------
# Drawing helpers (numpy only; every image is a few milliseconds).


def _grid(shape: tuple[int, ...]) -> list[np.ndarray]:
    return np.meshgrid(*(np.arange(s, dtype=np.float32) for s in shape), indexing="ij", sparse=True)


def _ellipse(
    shape: tuple[int, int],
    cy: float,
    cx: float,
    ry: float,
    rx: float,
    angle: float = 0.0,
    wobble: np.ndarray | None = None,
) -> np.ndarray:
    """Radial distance (1 on the border) of an ellipse; ``wobble(theta)`` makes the border irregular."""
    yy, xx = _grid(shape)
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(angle), np.sin(angle)
    u, v = (dx * c + dy * s) / rx, (-dx * s + dy * c) / ry
    r = np.sqrt(u**2 + v**2)
    if wobble is not None:
        theta = np.arctan2(v, u)
        r = r / (1 + sum(a * np.sin(k * theta + p) for k, a, p in wobble))
    return r


def _texture(rng: Rng, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Smooth zero-mean unit-ish noise: the tissue texture under every synthetic image."""
    noise = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return noise / (noise.std() + 1e-6)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(img, 0, 255).round().astype(np.uint8)


def _save(path: Path, array: np.ndarray) -> None:
    """Save an 8-bit array in the format its suffix names (PNG, JPEG, BMP)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"quality": 92} if path.suffix.lower() in (".jpg", ".jpeg") else {}
    Image.fromarray(array).save(path, **options)


def _place(
    rng: Rng, shape: tuple[int, int], count: int, radius: tuple[float, float], margin: float = 2.0
) -> list[tuple[float, float, float]]:
    """Up to ``count`` non-overlapping circles ``(cy, cx, r)`` inside ``shape`` (rejection sampling)."""
    placed: list[tuple[float, float, float]] = []
    for _ in range(count * 30):
        if len(placed) == count:
            break
        r = rng.uniform(*radius)
        cy, cx = rng.uniform(r + 1, shape[0] - r - 1), rng.uniform(r + 1, shape[1] - r - 1)
        if all((cy - y) ** 2 + (cx - x) ** 2 > (r + q + margin) ** 2 for y, x, q in placed):
            placed.append((cy, cx, r))
    return placed


def _split_sizes(n: int, fractions: tuple[float, ...]) -> list[int]:
    """Integer sizes proportional to ``fractions`` that sum to ``n``, each at least 1."""
    sizes = [max(1, round(n * f)) for f in fractions[:-1]]
    return [*sizes, n - sum(sizes)]


# --------------------------------------------------------------------------------------------------------------
# 2D classification


def _crypts(rng: Rng, size: int, ssa: bool) -> np.ndarray:
    """H&E-like RGB patch: pink lamina propria with crypts (purple epithelium ring, pale lumen)."""
    shape = (size, size)
    stroma = np.array([228, 160, 196], np.float32) + 14 * _texture(rng, shape, 1.5)[..., None]
    img = np.broadcast_to(stroma, (*shape, 3)).copy()
    if ssa:  # few, large, dilated, serrated (saw-tooth) crypts
        circles = _place(rng, shape, int(rng.integers(2, 4)), (size * 0.16, size * 0.22), margin=3)
        shapes = [(cy, cx, r, r * 0.45, rng.uniform(0, np.pi), [(9, 0.12, rng.uniform(0, 6))]) for cy, cx, r in circles]
    else:  # many small round crypts
        circles = _place(rng, shape, int(rng.integers(6, 10)), (size * 0.06, size * 0.1), margin=2)
        shapes = [(cy, cx, r, r, 0.0, None) for cy, cx, r in circles]
    for cy, cx, rx, ry, angle, wobble in shapes:
        r = _ellipse(shape, cy, cx, ry, rx, angle, wobble)
        img[(r > 0.65) & (r <= 1.0)] = [120, 60, 150]  # nuclei-rich epithelium
        img[r <= 0.65] = [245, 235, 245]  # lumen / mucin
    return _to_uint8(img + 6 * rng.standard_normal(img.shape))


def write_mhist(root: Path, n: int, rng: Rng, classes: tuple[str, ...] = ()) -> None:
    n_ssa = max(4, round(n * 0.4))
    labels = rng.permutation(["SSA"] * n_ssa + ["HP"] * (n - n_ssa))
    rows, test_left = [], {"HP": round((n - n_ssa) * 0.3), "SSA": round(n_ssa * 0.3)}
    for i, label in enumerate(labels):
        name = "MHIST_" + "".join(chr(97 + (i // 26**k) % 26) for k in (2, 1, 0)) + ".png"
        _save(root / "images" / name, _crypts(rng, 64, label == "SSA"))
        votes = int(rng.integers(4, 8)) if label == "SSA" else int(rng.integers(0, 4))
        partition = "test" if test_left[label] > 0 else "train"
        test_left[label] -= partition == "test"
        rows.append(f"{name},{label},{votes},{partition}")
    header = "Image Name,Majority Vote Label,Number of Annotators who Selected SSA (Out of 7),Partition"
    (root / "annotations.csv").write_text("\n".join([header, *rows]) + "\n")


def _retina(rng: Rng, label: int, width: int = 96, height: int = 64) -> np.ndarray:
    """OCT-like B-scan: speckled dark background, bright retinal layers; waviness and layer count carry the class."""
    _, xx = _grid((height, width))
    cycles, layers = 0.5 + 0.5 * label, 1 + label % 3
    base = height * rng.uniform(0.45, 0.6) + height * 0.08 * np.sin(2 * np.pi * cycles * xx / width + rng.uniform(0, 6))
    yy = np.arange(height, dtype=np.float32)[:, None]
    img = 25 + 10 * np.abs(rng.standard_normal((height, width)))
    for k in range(layers):
        img += 170 / (k + 1) * np.exp(-(((yy - base + 7 * k) / 2.2) ** 2))
    return _to_uint8(gaussian_filter(img, 0.6) + 8 * rng.standard_normal(img.shape))


def write_oct_c8(root: Path, n: int, rng: Rng, classes: tuple[str, ...]) -> None:
    per_class = n // len(classes)
    held_out = max(1, round(per_class * 0.2))
    counts = {"train": per_class - 2 * held_out, "val": held_out, "test": held_out}
    for label, name in enumerate(classes):
        for split, count in counts.items():
            for i in range(count):
                grey = _retina(rng, label)
                _save(root / split / name / f"{name.lower()}_{split}_{1001 + i}.jpg", np.stack([grey] * 3, -1))


def _chest(rng: Rng, size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """A PA chest radiograph cartoon: body, two dark lungs, spine; returns the image and the two lung masks."""
    shape = (size, size)
    img = 20 + 110 * (_ellipse(shape, size * 0.55, size * 0.5, size * 0.5, size * 0.44) <= 1)
    lungs = [_ellipse(shape, size * 0.5, size * cx, size * 0.3, size * 0.16) <= 1 for cx in (0.3, 0.7)]
    for lung in lungs:
        img = np.where(lung, 55, img)
    img = img + 12 * _texture(rng, shape, 2.0)
    return img.astype(np.float32), lungs


def _opacity(rng: Rng, size: int, lung: np.ndarray, radius: float) -> np.ndarray:
    """A hazy opacity centred inside ``lung``; values 0..1."""
    ys, xs = np.nonzero(lung)
    k = rng.integers(len(ys))
    r = _ellipse(lung.shape, ys[k], xs[k], radius, radius * rng.uniform(0.7, 1.3), rng.uniform(0, np.pi))
    return np.clip(1.3 - r, 0, 1) * lung


def _chest_xray(rng: Rng, size: int, kind: str) -> np.ndarray:
    img, lungs = _chest(rng, size)
    if kind == "pneumonia":  # one large dense consolidation
        img += 110 * _opacity(rng, size, lungs[int(rng.integers(2))], size * 0.14)
    elif kind == "covid":  # several hazy peripheral spots, both lungs
        for lung in lungs:
            for _ in range(int(rng.integers(3, 5))):
                img += 90 * gaussian_filter(_opacity(rng, size, lung, size * 0.05), 1.0)
    return _to_uint8(gaussian_filter(img, 0.7))


def write_chest_xray_pa(root: Path, n: int, rng: Rng, classes: tuple[str, ...]) -> None:
    for c, kind in enumerate(classes):
        for i in range(n // len(classes) + (c < n % len(classes))):
            img = _chest_xray(rng, 96, kind)
            if kind == "covid":  # mixed formats and UUID-like names, as in the covid folder of the download
                uid = "-".join(rng.bytes(k).hex().upper() for k in (4, 2, 2, 2, 6))
                name = f"{uid}-{1068 + i}x{817 + i}{('.jpeg', '.jpg', '.png')[i % 3]}"
                _save(root / kind / name, np.stack([img] * 3, -1) if i % 3 < 2 else img)
            else:  # NIH ChestX-ray14 style names
                _save(root / kind / f"{100 * i + 2 + 7 * c:08d}_{c:03d}.png", img)


# --------------------------------------------------------------------------------------------------------------
# 2D segmentation


# The TPP demo's target: glands in an immunohistochemistry-like stain (blue haematoxylin counterstain, brown DAB
# epithelium, pale mucin) that none of the other demo datasets (the upstream stand-in's data) has. MAE's loss normalises
# each patch by its own mean and variance, so pixel noise and fine texture in a flat region become unit-variance noise
# that no model predicts: on the earlier, textured targets every MAE (all parameters trained too) stayed at the ~1.0 of
# predicting each hidden patch's mean. Here every patch holds structure at least as large as the patch: large glands
# with soft borders under an uneven illumination (a flat region is then a ramp), with little pixel noise. Measured in
# `python -m tpp_monai demo` (tiny MedCoSS ViT, 64 px, 16 px patches, Adapter + inherited decoder, the GlaS bundles'
# per-image z-scored input, batch 8, 120 steps): 1.05 -> 0.98-0.99 against the 0.999 of the patch mean; the same
# stage on [0, 1] input (batch 16, 320 steps) reached 0.89.
IHC_STROMA, IHC_EPITHELIUM, IHC_LUMEN = [205, 215, 240], [150, 85, 40], [250, 248, 235]


def _soft_glands(rng: Rng, malignant: bool, width: int = 96, height: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """IHC-like tissue: large glands with soft borders (malignant: smaller, more, irregular) under an uneven
    illumination; returns the RGB image and the instance mask."""
    shape = (height, width)
    yy, xx = _grid(shape)
    angle = rng.uniform(0, 2 * np.pi)
    illumination = 0.9 + 0.1 * (np.cos(angle) * (xx - width / 2) + np.sin(angle) * (yy - height / 2)) / (width / 2)
    img = np.broadcast_to(np.array(IHC_STROMA, np.float32), (*shape, 3)).copy()
    mask = np.zeros(shape, np.uint8)
    count, radius = (int(rng.integers(3, 5)), (9.0, 14.0)) if malignant else (int(rng.integers(2, 4)), (13.0, 19.0))
    for k, (cy, cx, r) in enumerate(_place(rng, shape, count, radius, margin=3), start=1):
        wobble = [(3, 0.12, rng.uniform(0, 6))] if malignant else None
        dist = _ellipse(shape, cy, cx, r * rng.uniform(0.75, 1.0), r, rng.uniform(0, np.pi), wobble)
        mask[dist <= 1.0] = k
        for colour, edge in ((IHC_EPITHELIUM, 1.0), (IHC_LUMEN, 0.55)):  # soft borders, 0.12 radii wide
            weight = np.clip((edge - dist) / 0.12 + 0.5, 0, 1)[..., None]
            img = img * (1 - weight) + np.array(colour, np.float32) * weight
    img = gaussian_filter(img, (1.0, 1.0, 0)) * illumination[..., None]
    return _to_uint8(img + rng.standard_normal(img.shape)), mask


def _glands(rng: Rng, malignant: bool, width: int = 96, height: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """H&E-like colon tissue with glands; returns RGB image and instance mask (0 background, 1..k glands)."""
    shape = (height, width)
    img = np.array([235, 170, 205], np.float32) + 16 * _texture(rng, shape, 1.2)[..., None]
    mask = np.zeros(shape, np.uint8)
    count, radius = (int(rng.integers(4, 7)), (6.0, 10.0)) if malignant else (int(rng.integers(3, 5)), (8.0, 13.0))
    for k, (cy, cx, r) in enumerate(_place(rng, shape, count, radius, margin=3), start=1):
        wobble = [(3, 0.15, rng.uniform(0, 6)), (5, 0.1, rng.uniform(0, 6))] if malignant else None
        dist = _ellipse(shape, cy, cx, r * rng.uniform(0.7, 1.0), r, rng.uniform(0, np.pi), wobble)
        gland = dist <= 1.0
        mask[gland] = k
        img[gland & (dist > 0.6)] = [110, 50, 140]  # epithelium, nuclei
        img[dist <= 0.6] = [250, 240, 248]  # lumen
    return _to_uint8(img + 7 * rng.standard_normal(img.shape)), mask


def write_glas(root: Path, n: int, rng: Rng, classes: tuple[str, ...] = (), draw: Callable = _glands) -> None:
    sizes = dict(zip(("train", "testA", "testB"), _split_sizes(n, (85 / 165, 60 / 165, 20 / 165))))
    rows = []
    for prefix, count in sizes.items():
        # at least two of each grade in train, so both grades reach training and validation
        grades = ["benign", "malignant"] * 2 + list(rng.choice(["benign", "malignant"], max(0, count - 4)))
        for i, grade in enumerate(rng.permutation(grades[:count]), start=1):
            name = f"{prefix}_{i}"
            img, mask = draw(rng, grade == "malignant")
            _save(root / f"{name}.bmp", img)
            _save(root / f"{name}_anno.bmp", mask)
            detail = "moderately differentiated" if grade == "malignant" else "healthy"
            rows.append((name, f"{name},{int(rng.integers(1, 17))}, {grade}, {detail}"))
    header = "name,patient ID, grade (GlaS), grade (Sirinukunwattana et al. 2015)"
    # rows sorted as strings and CRLF line ends, as in the published Grade.csv
    (root / "Grade.csv").write_bytes(("\r\n".join([header, *(r for _, r in sorted(rows))]) + "\r\n").encode())


def write_qata(root: Path, n: int, rng: Rng, classes: tuple[str, ...] = ()) -> None:
    for folder, count in zip(("Train Set", "Test Set"), _split_sizes(n, (7145 / 9258, 2113 / 9258))):
        for i in range(count):
            name = f"covid_{i + 1}.png" if i % 2 else f"sub-S{11596 + i}_ses-E{21420 + i}_run-1_bp-chest_vp-ap_dx.png"
            img, lungs = _chest(rng, 64)
            infection = np.zeros_like(img)
            for _ in range(int(rng.integers(1, 4))):  # every image has infection (MedCoSS asserts it for train)
                infection = np.maximum(infection, _opacity(rng, 64, lungs[int(rng.integers(2))], 64 * 0.1))
            _save(root / folder / "Images" / name, _to_uint8(gaussian_filter(img + 90 * infection, 0.6)))
            _save(root / folder / "Ground-truths" / f"mask_{name}", np.where(infection > 0.25, 255, 0).astype(np.uint8))


# --------------------------------------------------------------------------------------------------------------
# 3D CT


def _ct(
    rng: Rng, shape: tuple[int, int, int], spacing: tuple[float, float, float], kidney: bool
) -> tuple[np.ndarray, np.ndarray]:
    """A CT cartoon on an (x, y, z) voxel grid: air, body, organ(s) (label 1) and a tumour inside (label 2)."""
    xx, yy, zz = (g * s for g, s in zip(_grid(shape), spacing))  # millimetres
    ex, ey, ez = (n * s for n, s in zip(shape, spacing))
    body = ((xx - ex / 2) / (ex * 0.46)) ** 2 + ((yy - ey / 2) / (ey * 0.4)) ** 2 <= 1
    hu = np.where(body, 30.0, -1000.0) + 12 * rng.standard_normal(shape)
    label = np.zeros(shape, np.uint8)
    if kidney:
        centres = [(ex * 0.3, ey * 0.62), (ex * 0.7, ey * 0.62)]
        radii, organ_hu, tumour_hu = (ex * 0.13, ey * 0.16, ez * 0.32), 160.0, 80.0
    else:
        centres = [(ex * 0.38, ey * 0.48)]
        radii, organ_hu, tumour_hu = (ex * 0.2, ey * 0.18, ez * 0.35), 110.0, 40.0
    for cx, cy in centres:
        cz = ez * rng.uniform(0.45, 0.55)
        organ = sum(((g - c) / r) ** 2 for g, c, r in zip((xx, yy, zz), (cx, cy, cz), radii)) <= 1
        label[organ] = 1
        hu[organ] = organ_hu + 8 * rng.standard_normal(int(organ.sum()))
    idx = np.argwhere(label == 1)
    tx, ty, tz = idx[rng.integers(len(idx))] * np.asarray(spacing)
    tumour_r = min(radii) * rng.uniform(0.45, 0.6)
    tumour = (((xx - tx) ** 2 + (yy - ty) ** 2 + (zz - tz) ** 2) <= tumour_r**2) & (label == 1)
    label[tumour] = 2
    hu[tumour] = tumour_hu + 8 * rng.standard_normal(int(tumour.sum()))
    return hu, label


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm", "sec")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def write_lits(root: Path, n: int, rng: Rng, classes: tuple[str, ...] = ()) -> None:
    for i in range(n):
        spacing = (round(rng.uniform(0.72, 0.88), 3),) * 2 + (round(rng.uniform(1.5, 2.0), 2),)
        shape = (48, 48, int(rng.integers(20, 29)))
        hu, label = _ct(rng, shape, spacing, kidney=False)
        # LiTS volumes come in either in-plane orientation (eva flips the LPS ones); alternate them
        sign = -1.0 if i % 2 else 1.0
        affine = np.diag([sign * spacing[0], sign * spacing[1], spacing[2], 1.0])
        affine[:3, 3] = [-sign * 20.0, -sign * 20.0, -100.0 - 10 * i]
        batch = root / ("Training Batch 1" if i <= 27 else "Training Batch 2")
        _nifti(batch / f"volume-{i}.nii", hu.round().astype(np.int16), affine)
        _nifti(batch / f"segmentation-{i}.nii", label, affine)


def write_kits(root: Path, n: int, rng: Rng, classes: tuple[str, ...] = ()) -> None:
    clinical = []
    for i in range(n):
        px, thick = round(rng.uniform(0.74, 0.86), 4), float(rng.choice([1.5, 2.0, 2.5]))
        shape_xyz = (48, 48, max(16, round(40 / thick)))
        hu, label = _ct(rng, shape_xyz, (px, px, thick), kidney=True)
        # kits19 arrays are (slices, rows, columns) with the slice axis first in the affine (README)
        affine = np.array([[0, 0, -px, 0], [0, -px, 0, 0], [-thick, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
        case = root / f"case_{i:05d}"
        _nifti(case / "imaging.nii.gz", np.ascontiguousarray(hu.transpose(2, 1, 0)).astype(np.float32), affine)
        _nifti(case / "segmentation.nii.gz", np.ascontiguousarray(label.transpose(2, 1, 0)), affine)
        clinical.append(
            {
                "case_id": case.name,
                "age_at_nephrectomy": int(rng.integers(30, 80)),
                "gender": str(rng.choice(["male", "female"])),
                "malignant": True,
                "tumor_histologic_subtype": "clear_cell_rcc",
            }
        )
    (root / "kits.json").write_text(json.dumps(clinical, indent=4) + "\n")


def write_glas_ihc(root: Path, n: int, rng: Rng, classes: tuple[str, ...] = ()) -> None:
    """GlaS in the TPP demo's target appearance (``"ihc"``): :func:`_soft_glands` in the GlaS layout."""
    write_glas(root, n, rng, classes, draw=_soft_glands)
