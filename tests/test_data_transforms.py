"""Demo datasets round-trip through their builders and the transform chains; the chains' own contracts."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from monai.data import CacheDataset, DataLoader
from monai.transforms import Compose, RandomizableTrait
from PIL import Image

from tpp_monai.__main__ import main
from tpp_monai.data import (
    DATASETS,
    build_datalist,
    check_datalist,
    deterministic_train_transforms,
    eval_transforms,
    get_dataset,
    image_transforms,
    make_demo_dataset,
    random_train_transforms,
    train_transforms,
    write_datalist,
)
from tpp_monai.data.transforms import (
    SPACING_3D,
    RandColorJitterd,
    RandGrayscaled,
    _apply_colour,
    _hsv_to_rgb,
    _rgb_to_hsv,
)
from tpp_monai.errors import ConfigError, DatasetError

SPLITS = ("training", "validation", "test")
PATCH_3D = (32, 32, 16)  # small patches keep the 3D checks fast; the default (192, 192, 64) is only padded to


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    cache: dict[str, object] = {}

    def make(name: str):
        if name not in cache:
            cache[name] = make_demo_dataset(name, tmp_path_factory.mktemp(f"demo_{name}"))
        return cache[name]

    return make


def absolute(records: list[dict], root) -> list[dict]:
    return [
        {k: str(root / v) if k in ("image", "label") and isinstance(v, str) else v for k, v in r.items()}
        for r in records
    ]


@pytest.mark.parametrize("name", list(DATASETS))
def test_demo_round_trips_through_builder_and_chains(demo_root, name, tmp_path):
    info = get_dataset(name)
    root = demo_root(name)
    datalist = build_datalist(name, root)
    assert all(datalist["counts"][s] > 0 for s in SPLITS), datalist["counts"]
    assert datalist["skipped"] == []
    check_datalist(write_datalist(datalist, tmp_path / "dl.json"), root)

    size = PATCH_3D if info.spatial_dims == 3 else info.image_size
    train, evaluate = train_transforms(name, size), eval_transforms(name, size)
    for record in absolute(datalist["training"][:2] + datalist["validation"][:1], root):
        sample = train(record)
        sample = sample[0] if isinstance(sample, list) else sample  # 3D patch crop yields a list of one
        ref = evaluate(record)
        image, label = sample["image"], sample["label"]
        if info.task == "cls":
            assert image.shape == (3, *size) and ref["image"].shape == (3, *size)
            assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
            assert 0.0 <= float(ref["image"].min()) < float(ref["image"].max()) <= 1.0
            assert isinstance(label, int) and info.classes[label] == record["class_name"]
        elif info.task == "seg":
            assert image.shape == (3, *size) and label.shape == (1, *size)
            assert set(torch.unique(label).tolist()) <= {0.0, 1.0}
            assert set(torch.unique(ref["label"]).tolist()) == {0.0, 1.0}  # every demo image has foreground
            means, stds = ref["image"].mean(dim=(1, 2)), ref["image"].std(dim=(1, 2))
            assert torch.allclose(means, torch.zeros(3), atol=1e-3) and torch.allclose(stds, torch.ones(3), atol=1e-2)
        else:
            assert image.shape == (1, *size) and label.shape == (1, *size)
            assert set(torch.unique(label).tolist()) <= {0.0, 1.0, 2.0}
            assert set(torch.unique(ref["label"]).tolist()) == {0.0, 1.0, 2.0}
            assert ref["image"].shape == ref["label"].shape
            assert abs(float(ref["image"].mean())) < 1e-3 and abs(float(ref["image"].std()) - 1) < 1e-2
            # RAS at the training spacing: a positive diagonal 0.8/0.8/1.5 (MONAI rounds the grid, hence atol)
            direction = ref["image"].affine[:3, :3].double()
            assert torch.allclose(direction, torch.diag(torch.tensor(SPACING_3D, dtype=torch.float64)), atol=2e-3)


def test_kits_slices_first_volume_is_reoriented(demo_root):
    """KiTS19 stores (slices, rows, columns) with a permuted affine; after the chain z is the last axis."""
    import nibabel as nib

    root = demo_root("kits")
    stored = nib.load(root / "case_00000" / "imaging.nii.gz")
    slices, thickness = stored.shape[0], abs(stored.affine[2, 0])
    out = Compose(image_transforms("kits"))({"image": str(root / "case_00000" / "imaging.nii.gz")})["image"]
    assert out.shape[-1] == pytest.approx(slices * thickness / SPACING_3D[2], abs=1.5)
    assert out.shape[1] == pytest.approx(stored.shape[2] * abs(stored.affine[0, 2]) / SPACING_3D[0], abs=1.5)


def test_2d_arrays_are_upright_channel_first(demo_root):
    """(C, H, W) as PIL -> ToTensor gives it (not MONAI's default (C, W, H)): a 96x64 GlaS image stays 64 rows."""
    root = demo_root("glas")
    rgb = np.asarray(Image.open(root / "train_1.bmp"), dtype=np.float32)  # (64, 96, 3)
    out = Compose(image_transforms("glas", (64, 96)))({"image": str(root / "train_1.bmp")})["image"]
    assert out.shape == (3, 64, 96)
    expected = (rgb - rgb.mean(axis=(0, 1))) / rgb.std(axis=(0, 1))
    assert np.allclose(out.numpy(), expected.transpose(2, 0, 1), atol=1e-4)


def test_masks_are_binarised_and_resized_nearest(demo_root):
    root = demo_root("glas")
    instances = np.asarray(Image.open(root / "train_1_anno.bmp"))
    assert instances.max() > 1  # GlaS masks carry instance ids
    out = eval_transforms("glas", (64, 96))(
        {"image": str(root / "train_1.bmp"), "label": str(root / "train_1_anno.bmp")}
    )
    assert np.array_equal(out["label"][0].numpy(), (instances > 0).astype(np.float32))


def test_image_transforms_match_the_eval_chain(demo_root):
    for name in ("mhist", "qata"):
        root = demo_root(name)
        record = absolute(build_datalist(name, root)["test"][:1], root)[0]
        alone = Compose(image_transforms(name))({"image": record["image"]})["image"]
        assert torch.equal(alone, eval_transforms(name)(record)["image"])


@pytest.mark.parametrize("name", ["mhist", "glas", "lits"])
def test_split_point_deterministic_then_random(name):
    deterministic, random = deterministic_train_transforms(name), random_train_transforms(name)
    assert not any(isinstance(t, RandomizableTrait) for t in deterministic)
    assert random and all(isinstance(t, RandomizableTrait) for t in random)
    assert len(train_transforms(name).transforms) == len(deterministic) + len(random)


def test_train_chain_is_seeded_and_random(demo_root):
    root = demo_root("glas")
    record = absolute(build_datalist("glas", root)["training"][:1], root)[0]
    outputs = []
    for seed in (0, 0, 1, 2, 3):
        chain = train_transforms("glas", (64, 96))
        chain.set_random_state(seed=seed)
        outputs.append(chain(record)["image"])
    assert torch.equal(outputs[0], outputs[1])
    assert any(not torch.equal(outputs[0], o) for o in outputs[2:])


def test_cache_dataset_caches_the_deterministic_part(demo_root):
    root = demo_root("qata")
    records = absolute(build_datalist("qata", root)["training"][:4], root)
    dataset = CacheDataset(records, train_transforms("qata", 64), cache_rate=1.0, progress=False)
    batch = next(iter(DataLoader(dataset, batch_size=4)))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["label"].shape == (4, 1, 64, 64)


def test_3d_patches_oversample_the_tumour_and_batch(demo_root):
    root = demo_root("lits")
    records = absolute(build_datalist("lits", root)["training"], root)
    dataset = CacheDataset(records[:2], train_transforms("lits", PATCH_3D), cache_rate=1.0, progress=False)
    batch = next(iter(DataLoader(dataset, batch_size=2)))  # the crop's list of one sample is flattened
    assert batch["image"].shape == batch["label"].shape == (2, 1, *PATCH_3D)
    record = records[0]
    chain = train_transforms("lits", PATCH_3D)
    chain.set_random_state(seed=0)
    with_tumour = sum(bool((chain(record)[0]["label"] == 2).any()) for _ in range(12))
    assert with_tumour >= 3  # a third of the centres are tumour voxels; a tumour is ~1% of the volume


# ---------------------------------------------------------------------------------------------------------------
# Colour augmentations written here because MONAI lacks them


def test_hsv_round_trip_and_hue_rotation():
    img = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(_hsv_to_rgb(*_rgb_to_hsv(img)), img, atol=1e-5)
    red = torch.zeros(3, 2, 2)
    red[0] = 1.0
    green = _apply_colour(red, 3, 1 / 3)
    assert torch.allclose(green, torch.stack([torch.zeros(2, 2), torch.ones(2, 2), torch.zeros(2, 2)]), atol=1e-5)


def test_saturation_zero_is_grey_and_factor_one_is_identity():
    img = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1))
    grey = _apply_colour(img, 2, 0.0)
    assert torch.allclose(grey[0], grey[1]) and torch.allclose(grey[1], grey[2])
    for op in range(3):
        assert torch.allclose(_apply_colour(img, op, 1.0), img)
    jitter = RandColorJitterd(keys="image", prob=1.0, brightness=0, contrast=0, saturation=0, hue=0)
    assert torch.allclose(jitter({"image": img})["image"], img, atol=1e-5)


def test_colour_jitter_is_seeded_and_bounded():
    img = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(2))
    outs = []
    for seed in (5, 5, 6):
        jitter = RandColorJitterd(keys="image", prob=1.0)
        jitter.set_random_state(seed=seed)
        outs.append(jitter({"image": img})["image"])
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    assert float(outs[2].min()) >= 0.0 and float(outs[2].max()) <= 1.0
    assert torch.equal(RandColorJitterd(keys="image", prob=0.0)({"image": img})["image"], img)


def test_random_grayscale():
    img = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(3))
    grey = RandGrayscaled(keys="image", prob=1.0)({"image": img})["image"]
    luma = 0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]
    assert grey.shape == img.shape and all(torch.allclose(grey[c], luma) for c in range(3))
    assert torch.equal(RandGrayscaled(keys="image", prob=0.0)({"image": img})["image"], img)


# ---------------------------------------------------------------------------------------------------------------
# Demo data: deterministic, learnable, safe to re-run


def test_demo_is_deterministic_and_replaces_only_demos(tmp_path):
    def files(root):
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    a = make_demo_dataset("chest_xray_pa", tmp_path / "a", n=15, seed=4)
    b = make_demo_dataset("chest_xray_pa", tmp_path / "b", n=15, seed=4)
    assert files(a) == files(b)
    c = make_demo_dataset("chest_xray_pa", tmp_path / "a", n=15, seed=5)  # re-run over an earlier demo
    assert c == a and files(c) != files(b)
    (tmp_path / "mine" / "mhist").mkdir(parents=True)
    (tmp_path / "mine" / "mhist" / "notes.txt").write_text("user data")
    with pytest.raises(DatasetError, match="not a demo dataset"):
        make_demo_dataset("mhist", tmp_path / "mine")
    with pytest.raises(ConfigError, match="at least"):
        make_demo_dataset("glas", tmp_path / "small", n=2)


@pytest.mark.parametrize("name", ["mhist", "oct_c8", "chest_xray_pa"])
def test_demo_classes_are_learnable(tmp_path, name):
    """A nearest-centroid classifier on grey-level histogram + spectrum features beats chance by a wide margin."""
    root = make_demo_dataset(name, tmp_path, n=96)
    datalist = build_datalist(name, root)

    def features(record):
        grey = np.asarray(Image.open(root / record["image"]).convert("L").resize((32, 32)), np.float32) / 255
        spectrum = np.log1p(np.abs(np.fft.fft2(grey))).ravel()
        return np.concatenate([spectrum, 10 * np.histogram(grey, 16, (0, 1))[0] / grey.size])

    train = datalist["training"] + datalist["validation"]
    x, y = np.stack([features(r) for r in train]), np.array([r["label"] for r in train])
    mu, sd = x.mean(0), x.std(0) + 1e-6
    centroids = np.stack([((x[y == c] - mu) / sd).mean(0) for c in range(len(datalist["classes"]))])
    xt = (np.stack([features(r) for r in datalist["test"]]) - mu) / sd
    predicted = np.argmin(((xt[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    accuracy = float((predicted == np.array([r["label"] for r in datalist["test"]])).mean())
    assert accuracy >= 1 / len(datalist["classes"]) + 0.3, accuracy


@pytest.mark.parametrize("name, brighter", [("glas", False), ("qata", True), ("lits", True), ("kits", True)])
def test_demo_masks_mark_a_visible_structure(demo_root, name, brighter):
    """Foreground differs from background in intensity (organs/opacities brighter, glands darker than stroma)."""
    root = demo_root(name)
    size = PATCH_3D if get_dataset(name).spatial_dims == 3 else 64
    for record in absolute(build_datalist(name, root)["training"][:3], root):
        out = eval_transforms(name, size)(record)
        image, fg = out["image"].mean(0), out["label"][0] > 0
        inside, outside = float(image[fg].mean()), float(image[~fg].mean())
        assert (inside - outside > 0.5) if brighter else (outside - inside > 0.5), (inside, outside)


def test_demo_and_datalist_commands(tmp_path, capsys):
    assert main(["demo-data", "qata", "--out", str(tmp_path), "--n", "10"]) == 0
    root = tmp_path / "QaTa-COV19" / "QaTa-COV19-v2"
    assert str(root) in capsys.readouterr().out
    out = tmp_path / "qata.json"
    assert main(["datalist", "qata", "--root", str(tmp_path / "QaTa-COV19"), "--out", str(out), "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "qata: 6 training / 2 validation / 2 test" in printed and f"relative to {root}" in printed
    assert json.loads(out.read_text())["seed"] == 3
    assert main(["datalist", "qata", "--root", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "error: dataset root" in capsys.readouterr().err
    assert math.isclose(json.loads(out.read_text())["counts"]["training"], 6)
