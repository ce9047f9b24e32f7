"""Issue 16: where the methods and the TPP stage follow the official implementations, and where they keep their own
rule on purpose. Every expectation is computed here from the official rule's formula, not from the code under test."""

from __future__ import annotations

import inspect
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Engine
from monai.engines.utils import IterationEvents
from PIL import Image

from tpp_monai.backbones import build_backbone, load_backbone_checkpoint
from tpp_monai.errors import CheckpointError
from tpp_monai.handlers import GradientClipHandler
from tpp_monai.io import read_file
from tpp_monai.peft import (
    applicable_methods,
    apply_peft,
    get_method,
    make_config,
    mark_trainable,
    trainable_parameter_names,
)
from tpp_monai.peft.modules import Bottleneck
from tpp_monai.pretext import PretextHandlers, adamw_betas, build_pretext, lr_schedule, pretext_loss
from tpp_monai.pretext.transforms import (
    RandIsotropicGaussianSmoothd,
    RandResizedCropd,
    dino_transforms,
    mae_transforms,
)
from tpp_monai.schedules import teacher_temp_schedule

get_method("adapter")  # register the built-in methods
VIT_METHODS = applicable_methods("medcoss_vit_tiny")


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----- 1. EVP's embedding tune reads the raw patch projection ------------------------------------------------------
@pytest.mark.parametrize("masked", [False, True])
def test_evp_embedding_tune_reads_the_raw_patch_projection(masked: bool) -> None:
    torch.manual_seed(0)
    model = apply_peft(build_backbone("medcoss_vit_tiny", task="features"), "evp").eval()
    evp = model.peft_encoder
    with torch.no_grad():  # silence the high-frequency branch: the cached feature is then the embedding tune alone
        evp.prompt_generator.weight.zero_()
        evp.prompt_generator.bias.zero_()
    x = _rand(2, 3, 64, 64)
    keep = torch.tensor([[0, 3, 5, 9], [1, 2, 8, 15]]) if masked else None
    with torch.no_grad():
        out = model.forward_features(x, keep_idx=keep)
        conv = model.patch_embedding_conv()
        raw = F.conv2d(x, conv.weight, conv.bias, stride=conv.stride).flatten(2).transpose(1, 2)  # [B, N, D]
        if keep is not None:
            raw = torch.stack([raw[b, keep[b]] for b in range(2)])
        expected = raw @ evp.embedding_generator.weight.T + evp.embedding_generator.bias
    torch.testing.assert_close(out.layout.cache["evp"], expected, rtol=1e-5, atol=1e-5)


# ----- 2. DINO clips each tensor's gradient norm -----------------------------------------------------------------
def test_dino_gradient_clipping_is_per_tensor() -> None:
    grads = [_rand(5, 4, seed=1) * 10, _rand(7, seed=2) * 0.01, _rand(3, 3, seed=3) * 2]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    GradientClipHandler(params, 3.0, per_tensor=True)(SimpleNamespace(amp=False))
    for p, g in zip(params, grads):
        norm = math.sqrt(float((g.double() ** 2).sum()))
        coef = 3.0 / (norm + 1e-6)
        expected = g.double() * coef if coef < 1 else g.double()
        torch.testing.assert_close(p.grad.double(), expected, rtol=1e-6, atol=1e-9)
    # the first tensor alone exceeds 3, and only it is clipped: the global norm stays above 3 (global clipping: 3)
    assert math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in params)) > 3.0 + 1e-3


def _dino_net(**dino: object):
    torch.manual_seed(0)
    enc = apply_peft(build_backbone("vit_tiny", task="features"), "adapter")
    mark_trainable(enc, trainable_parameter_names(enc, "tpp"))
    options = {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, **dino}
    net = build_pretext("dino", enc, dino=options)
    return net, pretext_loss("dino", net, options), options


def test_dino_handlers_clip_per_tensor() -> None:
    net, loss, options = _dino_net()
    engine = Engine(lambda e, b: None)
    engine.register_events(*IterationEvents)
    PretextHandlers(net, loss, epochs=2, iters_per_epoch=3, dino=options).attach(engine)
    clips = [h for h, _, _ in engine._event_handlers[IterationEvents.BACKWARD_COMPLETED]
             if isinstance(h, GradientClipHandler)]  # fmt: skip
    assert len(clips) == 1 and clips[0].per_tensor and clips[0].max_norm == 3.0


# ----- 3. DINO's optimizer and schedules ---------------------------------------------------------------------------
def test_dino_adamw_betas_are_pytorch_defaults_and_mae_keeps_its_own() -> None:
    default = inspect.signature(torch.optim.AdamW).parameters["betas"].default
    assert tuple(adamw_betas("dino")) == tuple(default)
    assert tuple(adamw_betas("mae")) == (0.9, 0.95)


def test_dino_lr_schedule_warms_up_to_base_and_ends_at_min_lr() -> None:
    base, epochs, iters, warm = 2e-3, 6, 5, 2
    got = lr_schedule("dino", base, epochs, iters, warm)
    total, w = epochs * iters, warm * iters
    expected = [
        base * i / (w - 1) if i < w else 1e-6 + 0.5 * (base - 1e-6) * (1 + math.cos(math.pi * (i - w) / (total - w)))
        for i in range(total)
    ]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)
    assert got[w - 1] == pytest.approx(base)  # the warm-up's last step reaches the base rate
    assert got[w:].min() > 1e-6  # the cosine heads for min_lr, not 0


def test_mae_lr_schedule_is_medcoss_lr_sched() -> None:
    base, epochs, iters, warm = 1.5e-3, 6, 4, 2
    got = lr_schedule("mae", base, epochs, iters, warm)
    expected = []
    for i in range(epochs * iters):
        t = i / iters  # MAE's fractional epoch
        expected.append(
            base * t / warm if t < warm else 0.5 * base * (1 + math.cos(math.pi * (t - warm) / (epochs - warm)))
        )
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)


def test_dino_teacher_temperature_steps_per_epoch() -> None:
    start, end, warm, epochs, iters = 0.02, 0.07, 3, 5, 4
    got = teacher_temp_schedule(start, end, warm, epochs, iters)
    per_epoch = [start + (end - start) * e / (warm - 1) if e < warm else end for e in range(epochs)]
    np.testing.assert_allclose(got, np.repeat(per_epoch, iters), rtol=1e-12)


# ----- 4. Conv-Adapter: the released init ---------------------------------------------------------------------------
def test_conv_adapter_convs_have_the_released_kaiming_fan_out_init() -> None:
    torch.manual_seed(0)
    model = apply_peft(build_backbone("stunet_tiny", task="seg", out_channels=3), "conv_adapter")
    convs = [m for n, m in model.named_modules() if ".peft_sites." in f".{n}." and isinstance(m, torch.nn.Conv3d)]
    assert convs
    standardised = []
    for conv in convs:
        assert torch.count_nonzero(conv.bias) == 0
        fan_out = conv.weight.shape[0] * math.prod(conv.weight.shape[2:])  # out channels x kernel volume
        standardised.append(conv.weight.detach().flatten() / math.sqrt(2.0 / fan_out))
    z = torch.cat(standardised)
    assert z.numel() > 2000
    assert abs(float(z.mean())) < 0.1
    assert abs(float(z.std()) - 1.0) < 0.05


# ----- 5. SSF: the tap pairs act on the residual stream (kept) ------------------------------------------------------
def test_ssf_tap_pairs_rescale_the_stream_that_feeds_later_blocks() -> None:
    torch.manual_seed(0)
    model = apply_peft(build_backbone("medcoss_vit_tiny", task="features"), "ssf").eval()
    x = _rand(2, 3, 32, 32)
    with torch.no_grad():
        out = model.forward_features(x).tokens
        tokens = torch.cat([model.prefix_tokens(2), model.embed(x)[0]], dim=1)
        for i, block in enumerate(model.encoder_blocks()):
            tokens = block(tokens)
            if str(i + 1) in model.peft_encoder.taps:
                pair = model.peft_encoder.taps[str(i + 1)]
                tokens = tokens * pair.scale + pair.shift
    assert len(model.peft_encoder.taps) == 4  # the Ratio's 6 global pairs: patch, embed and 4 taps
    torch.testing.assert_close(out, tokens, rtol=1e-5, atol=1e-5)


# ----- 6. Adapter: inside or outside LayerScale; adapter-bert's init -------------------------------------------------
@pytest.mark.parametrize("placement", ["inside", "outside"])
def test_adapter_placement_around_layer_scale(placement: str) -> None:
    torch.manual_seed(0)
    model = build_backbone("medcoss_vit_tiny", task="features")
    options = {"init": "houlsby"} if placement == "inside" else {"init": "houlsby", "layer_scale": "outside"}
    apply_peft(model, "adapter", options)
    block = model.encoder_blocks()[0].eval()
    with torch.no_grad():
        block.gamma_1.fill_(0.3)
        block.gamma_2.fill_(0.6)
    x = _rand(2, 5, model.embed_dim)
    adapters = {m: a.adapter for m, a in {**block.peft_sites, **block.peft_deltas}.items()}
    attn_adapter = adapters["attn_out"] if placement == "inside" else adapters["attn"]
    mlp_adapter = adapters["fc2"] if placement == "inside" else adapters["mlp"]
    with torch.no_grad():
        h = block.norm1(x)
        a = block.self_attn(h, h, h, need_weights=False)[0]  # PyTorch's own attention, independent of the block's
        if placement == "inside":  # adapter-bert: h + A(h), then MedCoSS's LayerScale
            x1 = x + block.gamma_1 * (a + attn_adapter(a))
        else:
            x1 = x + block.gamma_1 * a + attn_adapter(a)
        f = block.linear2(F.gelu(block.linear1(block.norm2(x1))))
        expected = x1 + block.gamma_2 * (f + mlp_adapter(f)) if placement == "inside" else (
            x1 + block.gamma_2 * f + mlp_adapter(f))  # fmt: skip
        got = block(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_adapter_default_is_inside_layer_scale() -> None:
    assert make_config("adapter").layer_scale == "inside"


def test_houlsby_init_is_adapter_bert_truncated_normal() -> None:
    torch.manual_seed(0)
    adapter = Bottleneck(768, 76, init="houlsby")
    # TF truncated_normal_initializer(stddev=s): N(0, s) truncated at 2 s; its std is s * sqrt(1 - 2 * 2 phi(2) / Z)
    phi2 = math.exp(-2.0) / math.sqrt(2 * math.pi)
    z = math.erf(2 / math.sqrt(2))
    expected_std = 1e-3 * math.sqrt(1 - 4 * phi2 / z)
    for w in (adapter.down.weight, adapter.up.weight):
        assert float(w.detach().abs().max()) <= 2e-3
        assert float(w.detach().std()) == pytest.approx(expected_std, rel=0.02)
    assert torch.count_nonzero(adapter.down.bias) == 0 and torch.count_nonzero(adapter.up.bias) == 0


# ----- 7. VPT: per-sample prompt dropout; DropPath stays active in the frozen backbone (kept) ------------------------
def test_vpt_prompt_dropout_draws_a_mask_per_sample() -> None:
    torch.manual_seed(0)
    model = apply_peft(build_backbone("vit_tiny", task="features"), "vpt", {"dropout": 0.5}).train()
    prompts = model.peft_encoder._prompt(0, 4)  # [B, p, D]
    dropped = prompts == 0
    assert dropped.any()
    assert not all(torch.equal(dropped[0], dropped[b]) for b in range(1, 4))


@pytest.mark.parametrize("method", VIT_METHODS)
def test_frozen_backbone_trains_with_drop_path_active(method: str) -> None:
    model = build_backbone("medcoss_vit_tiny", task="cls", num_classes=2)
    apply_peft(model, method)
    mark_trainable(model, trainable_parameter_names(model))
    model.train()
    for block in model.encoder_blocks():
        assert block.training and block.drop_path.training and block.drop_path.prob == pytest.approx(0.1)


# ----- 8. Resizing: anti-aliased crops, torchvision's fallback, one blur sigma, DINO's position interpolation ---------
def test_random_resized_crop_resizes_like_pil_bicubic() -> None:
    image = torch.rand(1, 200, 200, generator=torch.Generator().manual_seed(0))
    crop = RandResizedCropd("image", size=(96, 96), scale=(1.0, 1.0), ratio=(1.0, 1.0))  # the whole image
    got = crop({"image": image})["image"]
    pil = np.asarray(Image.fromarray(image[0].numpy(), mode="F").resize((96, 96), Image.BICUBIC))
    np.testing.assert_allclose(np.asarray(got[0]), pil, atol=1e-4)


def test_random_resized_crop_of_a_hard_edge_is_clamped_like_pil() -> None:
    """Bicubic overshoots at a hard edge; PIL resizes the 8-bit image and clamps to [0, 255], so the [0, 1] crop
    is clamped to [0, 1] (the DINO views, whose colour jitter follows, and MAE on [0, 1] inputs)."""
    image = torch.zeros(1, 200, 200)
    image[:, 60:140, 60:140] = 1.0  # a white square on black: every edge hard
    size = dict(size=(96, 96), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    raw = RandResizedCropd("image", **size)({"image": image})["image"]
    assert raw.min() < -0.01 and raw.max() > 1.01  # the overshoot the clamp removes
    got = RandResizedCropd("image", **size, value_range=(0.0, 1.0))({"image": image})["image"]
    assert got.min() == 0.0 and got.max() == 1.0
    pil = np.asarray(Image.fromarray((255 * image[0].numpy()).astype(np.uint8)).resize((96, 96), Image.BICUBIC))
    # PIL's 8-bit path rounds and clamps after each of its two 1D passes: a corner differs by just over 1 level
    np.testing.assert_allclose(255 * np.asarray(got[0]), pil, atol=1.5)
    views = next(t for t in dino_transforms("mhist").flatten().transforms if hasattr(t, "views")).views
    crops = [t for v in views for t in v.transforms if isinstance(t, RandResizedCropd)]
    assert len(crops) == len(views) and all(c.value_range == (0.0, 1.0) for c in crops)
    for dataset, clamp in (("mhist", (0.0, 1.0)), ("glas", None)):  # GlaS's MAE input is z-scored: no fixed range
        (crop,) = [t for t in mae_transforms(dataset, 64).transforms if isinstance(t, RandResizedCropd)]
        assert crop.value_range == clamp, dataset


@pytest.mark.parametrize(("h", "w"), [(100, 400), (400, 100), (120, 100)])
def test_random_resized_crop_fallback_keeps_the_aspect_ratio(h: int, w: int) -> None:
    ratio = (3 / 4, 4 / 3)
    image = torch.arange(h * w, dtype=torch.float32).reshape(1, h, w)
    crop = RandResizedCropd("image", size=(h, w), scale=(2.0, 2.0), ratio=ratio)  # no draw fits: the fallback
    crop.set_random_state(0)
    crop({"image": image})
    # torchvision: the whole image, its aspect ratio (w / h) clamped to the range by shortening the longer side
    aspect = w / h
    cw, ch = (
        (w, round(w / ratio[0])) if aspect < ratio[0] else (round(h * ratio[1]), h) if aspect > ratio[1] else (w, h)
    )
    assert crop._box == ((h - ch) // 2, (w - cw) // 2, ch, cw)


def test_dino_blur_uses_one_sigma_for_both_axes() -> None:
    views = next(t for t in dino_transforms("mhist").flatten().transforms if hasattr(t, "views")).views
    blurs = [t for v in views for t in v.transforms if isinstance(t, RandIsotropicGaussianSmoothd)]
    assert len(blurs) == len(views)
    image = torch.zeros(1, 41, 41)
    image[0, 20, 20] = 1.0
    blur = RandIsotropicGaussianSmoothd("image", sigma=(0.5, 2.0), prob=1.0)
    for seed in range(5):
        blur.set_random_state(seed)
        out = blur({"image": image})["image"][0].double()
        rows, cols = out.sum(1), out.sum(0)
        pos = torch.arange(41, dtype=torch.float64) - 20
        var_rows, var_cols = float((rows * pos**2).sum() / rows.sum()), float((cols * pos**2).sum() / cols.sum())
        assert var_rows == pytest.approx(var_cols, rel=1e-9)
        # the kernel integrates the Gaussian over each pixel: variance sigma^2 + 1/12 (a unit box's)
        assert var_rows == pytest.approx(blur.sigma**2 + 1 / 12, rel=0.03)


def _keys_cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    t = np.abs(t)
    return np.where(
        t <= 1, (a + 2) * t**3 - (a + 3) * t**2 + 1, np.where(t < 2, a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a, 0.0)
    )


def _resample_axis(table: np.ndarray, out: int, scale: float, axis: int) -> np.ndarray:
    """Cubic convolution (Keys, a = -0.75) along ``axis`` at source positions ``(o + 0.5) / scale - 0.5``, edges
    clamped: PyTorch's bicubic rule when a scale factor sets the sampling positions."""
    n = table.shape[axis]
    src = (np.arange(out) + 0.5) / scale - 0.5
    base = np.floor(src).astype(int)
    result = 0.0
    for k in range(-1, 3):
        idx = np.clip(base + k, 0, n - 1)
        weight = _keys_cubic(src - (base + k))
        shape = [1] * table.ndim
        shape[axis] = out
        result = result + np.take(table, idx, axis=axis) * weight.reshape(shape)
    return result


@pytest.mark.parametrize("grid", [(32, 32), (20, 32)])
def test_position_table_interpolation_is_dinos(grid: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = build_backbone("vit_tiny", task="features")
    side = 14
    table = model.pos_embed[0, 1:].detach().double().numpy().reshape(side, side, -1)
    # DINO: scale factor (g + 0.1) / side on each axis
    expected = _resample_axis(table, grid[0], (grid[0] + 0.1) / side, 0)
    expected = _resample_axis(expected, grid[1], (grid[1] + 0.1) / side, 1)
    with torch.no_grad():
        got = model._pos_for_grid(grid)[0].double().numpy().reshape(grid[0], grid[1], -1)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    with torch.no_grad():  # the trained grid is used as it is
        torch.testing.assert_close(model._pos_for_grid((side, side)), model.pos_embed[:, 1:])


# ----- 9. Checkpoint reading: the re-save hint, the DINO head's label, Lightning's prefix ----------------------------
class _NotAWeight:
    pass


def test_pickled_checkpoint_hint_names_every_container_key(tmp_path) -> None:
    path = tmp_path / "nnunet.model"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "plans": _NotAWeight()}, path)
    with pytest.raises(CheckpointError) as err:
        read_file(path)
    for key in ("'state_dict'", "'model'", "'network_weights'", "'teacher'"):
        assert key in str(err.value)


def test_dino_head_keys_are_reported_as_the_dino_head_and_lightning_prefix_is_stripped(tmp_path) -> None:
    torch.manual_seed(0)
    source = build_backbone("vit_tiny", task="features")
    state = {k: v.clone() for k, v in source.state_dict().items()}
    head = {"head.mlp.0.weight": torch.zeros(4, 96), "head.last_layer.weight_g": torch.ones(8, 1)}
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in {**state, **head}.items()}, "epoch": 3}, path)
    target = build_backbone("vit_tiny", task="features")
    target.backbone_name = "vit_tiny"
    report = load_backbone_checkpoint(target, path)
    assert sorted(report.unused["DINO projection head"]) == sorted(head)
    assert "task head of the checkpoint (a fresh head is trained)" not in report.unused
    for key, value in target.state_dict().items():
        torch.testing.assert_close(value, state[key])


@pytest.mark.parametrize("bundle", ["mhist_adapter", "lits_conv_adapter"])
def test_bundle_tpp_optimizer_uses_the_pretexts_betas(bundle: str) -> None:
    from pathlib import Path

    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(Path(__file__).parents[1] / "bundles" / bundle / "configs" / "pretrain_tpp.json"))
    parser["pretext"] = "dino"
    parser.parse(True)
    assert tuple(parser.get_parsed_content("optimizer#betas")) == tuple(
        inspect.signature(torch.optim.AdamW).parameters["betas"].default
    )
