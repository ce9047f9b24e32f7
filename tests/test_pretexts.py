"""A pretext for every backbone (issue 23 item 4): MAE on any token-dropping backbone, masked-image modelling (MIM,
SimMIM-style) on any dense-feature backbone in 2D and 3D, DINO on any global-feature backbone, and the default
pretext per backbone."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import make_workflow
from ignite.engine import Events
from monai.engines.utils import IterationEvents
from torch import nn

from tpp_monai.backbones import BACKBONES, build_backbone, get_backbone_spec
from tpp_monai.backbones.timm_vit import TimmViT
from tpp_monai.contract import DENSE_FEATURE, DROPS_TOKENS, GLOBAL_FEATURE, BackboneInterface
from tpp_monai.errors import ConfigError
from tpp_monai.handlers import GradientClipHandler
from tpp_monai.io import load_verified
from tpp_monai.peft import apply_peft, mark_trainable, target_parameter_names, trainable_parameter_names
from tpp_monai.peft.files import read_record
from tpp_monai.pretext import (
    PRETEXTS,
    build_pretext,
    check_pretext,
    default_pretext,
    pretext_loss,
    resume_state,
    supported_pretexts,
)
from tpp_monai.pretext.mae import MAEPretext, MaskedPatchLoss, patchify
from tpp_monai.pretext.mim import MaskedPixelLoss, MIMPretext, pixel_shuffle

TINY_DINO = {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "global_size": 32, "local_size": 16, "num_local": 1}


def ramps(batch: int, shape: tuple[int, ...], channels: int, generator: torch.Generator) -> torch.Tensor:
    """Linear intensity ramps with a random direction and contrast per image (2D or 3D): every hidden cell is
    predictable from its neighbours."""
    axes = torch.meshgrid(*(torch.linspace(-1, 1, n) for n in shape), indexing="ij")
    direction = torch.nn.functional.normalize(torch.randn(batch, len(shape), generator=generator), dim=1)
    ramp = sum(direction[:, i].view(-1, *(1,) * len(shape)) * axes[i] for i in range(len(shape)))
    contrast = torch.rand(batch, *(1,) * len(shape), generator=generator) + 0.5
    return (ramp * contrast)[:, None].expand(-1, channels, *shape).contiguous()


def _fit(net: nn.Module, loss_fn: nn.Module, images, steps: int, lr: float) -> list[float]:
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        x = images()
        loss = loss_fn(net(x), x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


# ---------------------------------------------------------------------------------------------------------------
# Backbones implementing only parts of the contract: no pretext may assume a ViT or STU-Net


class ToyCNN(nn.Module):
    """A 2D or 3D CNN outside the registry: a global feature and a dense map (``hooks`` narrows what it gives)."""

    family, backbone_name, HOOKS = "toy_cnn", "toy_cnn", frozenset({GLOBAL_FEATURE, DENSE_FEATURE})

    def __init__(self, dims: int = 2, channels: int = 1, width: int = 8, hooks: frozenset | None = None) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.dims, self.channels, self.width = dims, channels, width
        self.body = nn.Sequential(conv(channels, width, 3, padding=1), nn.GELU(), conv(width, width, 3, padding=1))
        if hooks is not None:
            self.HOOKS = hooks

    def interface(self) -> BackboneInterface:
        return BackboneInterface(family=self.family, layout="feature_maps", spatial_dims=self.dims, width=self.width,
                                 in_channels=self.channels, patch_size=(1,) * self.dims)  # fmt: skip

    def head_parameter_names(self) -> list[str]:
        return []

    def unused_parameter_names(self) -> set[str]:
        return set()

    def dense_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def global_feature_dims(self) -> list[int]:
        return [self.width]

    def global_feature(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).flatten(2).mean(-1)

    def global_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.global_feature(x)]


class NoPrefixViT(TimmViT):
    """A timm-layout ViT without a class token (timm's ``class_token=False``): 0 prefix tokens."""

    def prefix_tokens(self, batch: int) -> None:
        return None


class TokenDropViT3D(nn.Module):
    """A 3D ViT from MONAI's parts that drops tokens (as the ``nets`` MONAI ViT will): 1 class token."""

    family, backbone_name, HOOKS = "toy_vit3d", "toy_vit3d", frozenset({DROPS_TOKENS})

    def __init__(self, size: int = 16, patch: int = 4, width: int = 24) -> None:
        from monai.networks.blocks import PatchEmbeddingBlock, TransformerBlock

        super().__init__()
        self.patch, self.width = patch, width
        self.patch_embedding = PatchEmbeddingBlock(1, size, patch, width, 4, spatial_dims=3)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.Sequential(TransformerBlock(width, 2 * width, 4), nn.LayerNorm(width))

    def interface(self) -> BackboneInterface:
        return BackboneInterface(family=self.family, layout="tokens", spatial_dims=3, width=self.width, in_channels=1,
                                 patch_size=(self.patch,) * 3)  # fmt: skip

    def forward_features(self, x: torch.Tensor, keep_idx: torch.Tensor | None = None, with_prefix: bool = True):
        tokens = self.patch_embedding(x)
        if keep_idx is not None:
            tokens = torch.gather(tokens, 1, keep_idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        tokens = self.blocks(torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1))
        return SimpleNamespace(tokens=tokens, num_prefix=1, patches=tokens[:, 1:])


# ---------------------------------------------------------------------------------------------------------------
# Defaults


def test_default_pretext_per_backbone() -> None:
    """ViTs (MedCoSS, timm, MONAI ViT/UNETR): MAE (the paper's default); STU-Net: DINO (its Table 10 pairing);
    Swin and a CNN with a dense map: MIM; a backbone with only a global feature: DINO; one with no pretext input is
    refused with a message."""
    expected = {"medcoss": "mae", "timm_vit": "mae", "stunet": "dino", "swinunetr": "mim", "unetr": "mae",
                "monai_vit": "mae"}  # fmt: skip
    for name, spec in BACKBONES.items():
        assert default_pretext(name) == expected[spec.family], name
    assert supported_pretexts(build_backbone("stunet_tiny").__class__) == ["mim", "dino"]
    assert default_pretext(ToyCNN()) == "mim"
    assert default_pretext(ToyCNN(hooks=frozenset({GLOBAL_FEATURE}))) == "dino"
    with pytest.raises(ConfigError, match="gives no pretext input"):
        default_pretext(ToyCNN(hooks=frozenset()))
    with pytest.raises(ConfigError, match=r"needs 'feature:dense'.*use --pretext dino \(its default\)"):
        build_pretext("mim", ToyCNN(hooks=frozenset({GLOBAL_FEATURE})))
    with pytest.raises(ConfigError, match=r"needs 'tokens:drop'.*--pretext dino \(its default\) or mim"):
        check_pretext("mae", "stunet_b")


@pytest.mark.parametrize(("bundle", "backbone", "pretext"), [
    ("glas_adapter", None, "mae"), ("glas_adapter", "vit_tiny", "mae"), ("lits_conv_adapter", None, "dino"),
])  # fmt: skip
def test_bundles_take_the_backbones_default_pretext(tmp_path, bundle, backbone, pretext) -> None:
    from monai.bundle import ConfigParser

    from tpp_monai.bundlegen import workflow_config_files
    from tpp_monai.bundlegen.cli import BUNDLES_DIR

    parser = ConfigParser()
    parser.read_config(workflow_config_files(BUNDLES_DIR / bundle, "pretrain_tpp", "demo"))
    if backbone:
        parser["backbone"] = backbone
    assert parser.get_parsed_content("pretext") == pretext == default_pretext(parser.get_parsed_content("backbone"))


# ---------------------------------------------------------------------------------------------------------------
# MIM


def test_pixel_shuffle_matches_torch_and_monai_and_takes_one_factor_per_axis() -> None:
    from monai.networks.utils import pixelshuffle

    x = torch.randn(2, 3 * 4, 5, 6)
    assert torch.equal(pixel_shuffle(x, (2, 2)), torch.nn.functional.pixel_shuffle(x, 2))
    v = torch.randn(2, 2 * 8, 3, 4, 5)
    assert torch.equal(pixel_shuffle(v, (2, 2, 2)), pixelshuffle(v, 3, 2))
    a = torch.arange(2 * 2 * 1 * 4, dtype=torch.float).reshape(1, 2 * 2 * 1 * 4, 1, 1, 1)
    out = pixel_shuffle(a, (1, 2, 4))  # channel c * 8 + j * 4 + k lands at (0, j, k)
    assert out.shape == (1, 2, 1, 2, 4) and out[0, 1, 0, 1, 3] == 15 and out[0, 0, 0, 1, 0] == 4


def test_mim_masks_cells_and_scores_masked_pixels_only() -> None:
    torch.manual_seed(0)
    net = build_pretext("mim", build_backbone("vit_tiny", task="features"), 64, mim={"mask_patch": 16})
    images = torch.randn(3, 3, 64, 64)
    mask = net.mask(images)
    # 16 cells of 16 x 16, ceil(0.6 * 16) = 10 masked per image, constant within each cell
    cells = mask[:, 0, ::16, ::16]
    assert mask.shape == (3, 1, 64, 64) and (cells.flatten(1).sum(1) == 10).all()
    assert torch.equal(mask, cells.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, None])
    with torch.no_grad():
        net.mask_token.normal_()
    masked = net.masked_input(images, mask)
    visible = mask.expand_as(images) == 0
    assert torch.equal(masked[visible], images[visible])
    tiled = net.mask_token.repeat(1, 1, 4, 4).expand_as(images)
    assert torch.equal(masked[~visible], tiled[~visible])
    # the loss reads masked pixels only: changing the reconstruction elsewhere changes nothing, and its gradient
    # there is zero; it is SimMIM's mean L1 over masked pixels and channels
    loss = MaskedPixelLoss()
    rec = torch.randn_like(images, requires_grad=True)
    value = loss((rec, mask), images)
    value.backward()
    assert torch.equal(rec.grad[visible], torch.zeros_like(rec.grad[visible])) and (rec.grad[~visible] != 0).all()
    changed = torch.where(visible, rec.detach() + 5, rec.detach())
    assert torch.allclose(loss((changed, mask), images), value)
    manual = (rec.detach() - images).abs()[~visible].mean()
    assert torch.allclose(value, manual, rtol=1e-5)


def test_mim_learns_in_2d_on_a_vit_through_its_dense_features() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    net = MIMPretext(build_backbone("vit_tiny", task="features"), 32, mask_patch=16, mask_ratio=0.5)
    net.requires_grad_(True)
    loss_fn = MaskedPixelLoss()
    with torch.no_grad():  # predicting 0 (the images' mean) everywhere: the level without any context
        x = ramps(64, (32, 32), 3, gen)
        mean_level = float(loss_fn((torch.zeros_like(x), net.mask(x)), x))
    losses = _fit(net, loss_fn, lambda: ramps(8, (32, 32), 3, gen), 80, 1e-3)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.65 * first and last < 0.65 * mean_level, (first, last, mean_level)


def test_mim_learns_in_3d_on_stunet_training_its_adapters_only() -> None:
    """TPP proper: STU-Net frozen (random weights), Conv-Adapters (encoder and decoder) + mask value + decoder trained;
    8^3-voxel cells, so that hidden cells have visible neighbours within the tiny network's reach."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    encoder = apply_peft(build_backbone("stunet_tiny", task="features"), "conv_adapter")
    mark_trainable(encoder, trainable_parameter_names(encoder, "tpp"))
    net = build_pretext("mim", encoder, [32, 32, 32], mim={"mask_patch": 8})
    assert net.stride == (1, 1, 1) and net.cell == (8, 8, 8) and net.count == math.ceil(0.6 * 64)
    loss_fn = pretext_loss("mim", net)
    with torch.no_grad():  # predicting 0 (the volumes' mean) everywhere
        x = ramps(16, (32, 32, 32), 1, gen)
        mean_level = float(loss_fn((torch.zeros_like(x), net.mask(x)), x))
    targets = target_parameter_names(encoder)
    start = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    losses = _fit(net, loss_fn, lambda: ramps(2, (32, 32, 32), 1, gen), 40, 3e-2)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.75 * first and last < 0.85 * mean_level, (first, last, mean_level)
    now = dict(encoder.named_parameters())
    assert all(torch.equal(now[n], start[n]) for n in start if n not in targets), "a frozen tensor moved"
    decoder_side = [n for n in targets if n.startswith("conv_blocks_localization.")]
    assert decoder_side and all(not torch.equal(now[n], start[n]) for n in decoder_side), "decoder adapters learn"


@pytest.mark.parametrize(("options", "expected"), [
    ({"mask_patch": 24}, r"pretext_size \[64, 64\]: mim mask_patch \[24, 24\] is not a multiple of the backbone's "
                         r"stride \[16, 16\]"),
    ({"mask_patch": 48}, r"the MIM input size \[64, 64\] is not a multiple of the mask cell \[48, 48\]"),
    ({"mask_patch": 64}, r"masks 1 of 1 cells"),
    ({"ratio": 0.5}, r"unknown MIM option 'ratio'.*valid MIM options: clip_grad, mask_patch, mask_ratio"),
])  # fmt: skip
def test_mim_settings_that_do_not_fit_are_named(options, expected) -> None:
    with pytest.raises(ConfigError, match=expected):
        build_pretext("mim", build_backbone("vit_tiny", task="features"), 64, mim=options)


# ---------------------------------------------------------------------------------------------------------------
# MAE on other token layouts


@pytest.mark.parametrize("prefix", [0, 1])
def test_mae_learns_with_0_or_1_prefix_tokens_other_patch_width_and_channels(prefix) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    cls = TimmViT if prefix else NoPrefixViT
    encoder = cls(embed_dim=48, depth=2, num_heads=3, patch_size=8, in_chans=1, pos_grid=4)
    net = MAEPretext(encoder, "random", 32, decoder={"dim": 32, "depth": 1, "heads": 2})
    assert net.decoder.num_prefix == prefix and net.decoder.decoder_pos_embed_2D.shape[1] == 16 + prefix
    net.requires_grad_(True)
    loss_fn = MaskedPatchLoss(net.patch)
    mean_level = 1 - 1 / patchify(ramps(1, (32, 32), 1, gen), 8).shape[-1]
    losses = _fit(net, loss_fn, lambda: ramps(16, (32, 32), 1, gen), 60, 2e-3)
    last = sum(losses[-5:]) / 5
    assert last < 0.5 * mean_level, (losses[:3], last)


def test_patchify_in_3d_orders_pixels_row_col_slice_channel() -> None:
    x = torch.arange(2 * 4 * 4 * 2, dtype=torch.float).reshape(1, 2, 4, 4, 2)  # C=2, patch (2, 2, 2)
    p = patchify(x, 2)
    assert p.shape == (1, 2 * 2 * 1, 2 * 2 * 2 * 2)
    # patch (1, 0, 0) (raster order index 2), pixel (row 1, col 0, slice 1), channel 1
    assert p[0, 2, ((1 * 2 + 0) * 2 + 1) * 2 + 1] == x[0, 1, 3, 0, 1]
    assert torch.equal(patchify(x[:, :, :, :, 0], 2), torch.einsum("nchpwq->nhwpqc", x[:, :, :, :, 0].reshape(
        1, 2, 2, 2, 2, 2)).reshape(1, 4, 8))  # fmt: skip


def _monai_mae(patch: int = 4):
    from monai.networks.nets import MaskedAutoEncoderViT

    torch.manual_seed(3)
    return MaskedAutoEncoderViT(in_channels=1, img_size=16, patch_size=patch, hidden_size=24, mlp_dim=48, num_layers=1,
                                num_heads=4, decoder_hidden_size=12, decoder_mlp_dim=24, decoder_num_layers=2,
                                decoder_num_heads=2, spatial_dims=3)  # fmt: skip


def test_mae_inherits_a_monai_masked_autoencoder_decoder_in_3d() -> None:
    """A MONAI ``MaskedAutoEncoderViT`` state dict's decoder keys, as ``nets`` will keep them, plug in (frozen): the
    decoder computes what MONAI's forward computes from the same encoder tokens."""
    mae = _monai_mae()
    decoder_keys = ("decoder_", "mask_tokens")
    extras = {k: v for k, v in mae.state_dict().items() if k.startswith(decoder_keys)}
    encoder = TokenDropViT3D()
    encoder.mae_checkpoint = extras
    net = MAEPretext(encoder, "freeze", 16, decoder={"heads": 2})
    assert net.decoder.layout == "monai" and not any(p.requires_grad for p in net.decoder.parameters())
    got = net.decoder.state_dict()
    assert all(torch.equal(got[k], v) for k, v in extras.items())
    # MONAI's own decoder path (MaskedAutoEncoderViT.forward after the encoder), on tokens of 16 kept patches
    tokens = torch.randn(2, 1 + 16, 24)
    keep = torch.stack([torch.randperm(64)[:16] for _ in range(2)])
    ids_restore = torch.argsort(torch.cat([keep, _rest(keep, 64)], dim=1), dim=1)
    x = mae.decoder_embed(tokens)
    x_ = mae.mask_tokens.repeat(2, 64, 1)
    x_[torch.arange(2).unsqueeze(-1), keep] = x[:, 1:, :]
    reference = mae.decoder_pred(mae.decoder_blocks(torch.cat([x[:, :1], x_ + mae.decoder_pos_embedding], 1)))[:, 1:]
    with torch.no_grad():
        assert torch.allclose(net.decoder(tokens, ids_restore), reference, atol=1e-5)
    pred, mask = net(torch.randn(2, 1, 16, 16, 16))
    assert pred.shape == (2, 64, 4**3) and mask.sum(1).eq(48).all()
    assert pretext_loss("mae", net)((pred, mask), torch.randn(2, 1, 16, 16, 16)).isfinite()


def _rest(keep: torch.Tensor, n: int) -> torch.Tensor:
    """The indices not in ``keep``, per row (the masked patches, in order)."""
    return torch.stack([torch.tensor([i for i in range(n) if i not in set(row.tolist())]) for row in keep])


def test_an_inherited_decoder_that_does_not_fit_is_named() -> None:
    mae = _monai_mae(patch=8)  # 8^3 patches: 512 values per patch, 8 patches
    encoder = TokenDropViT3D()  # 4^3 patches
    encoder.mae_checkpoint = {k: v for k, v in mae.state_dict().items() if k.startswith(("decoder_", "mask_tokens"))}
    with pytest.raises(ConfigError, match=r"predicts 512 values per patch but the backbone's patches hold 64"):
        MAEPretext(encoder, "update", 16, decoder={"heads": 2})
    encoder.mae_checkpoint = {"decoder_foo.weight": torch.zeros(1)}
    with pytest.raises(ConfigError, match="in neither accepted layout"):
        MAEPretext(encoder, "update", 16)
    encoder.mae_checkpoint = {}
    with pytest.raises(ConfigError, match="holds no MAE decoder to inherit; use mae_decoder 'random'"):
        MAEPretext(encoder, "freeze", 16)


def test_mae_random_decoder_learns_on_a_3d_token_dropping_vit() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    net = MAEPretext(TokenDropViT3D(), "random", 16, decoder={"dim": 24, "depth": 1, "heads": 2})
    assert net.decoder.layout == "monai"
    net.requires_grad_(True)
    net.decoder.decoder_pos_embedding.requires_grad_(False)
    losses = _fit(net, MaskedPatchLoss(net.patch), lambda: ramps(8, (16, 16, 16), 1, gen), 40, 3e-3)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses


# ---------------------------------------------------------------------------------------------------------------
# DINO on any global feature; its crop sizes checked against any backbone


@pytest.mark.parametrize("dims", [2, 3])
def test_dino_runs_on_a_backbone_with_only_a_global_feature(dims) -> None:
    torch.manual_seed(0)
    encoder = apply_peft(ToyCNN(dims, hooks=frozenset({GLOBAL_FEATURE})), "bitfit")  # the biases are the targets
    mark_trainable(encoder, trainable_parameter_names(encoder, "tpp"))
    net = build_pretext("dino", encoder, dino=TINY_DINO)
    assert [n for n in net.ema_names if n.startswith("backbone.")] == ["backbone.body.0.bias", "backbone.body.2.bias"]
    crops = [torch.randn(2, 1, *(32,) * dims) for _ in range(2)] + [torch.randn(2, 1, *(16,) * dims)]
    loss = pretext_loss("dino", net, TINY_DINO)(net(crops))
    assert loss.isfinite()


def test_dino_crops_must_fit_the_patch_of_any_vit() -> None:
    with pytest.raises(ConfigError, match=r"dino local_size \[40, 40\]: not a multiple of the timm_vit backbone's "
                                          r"patch size \[16, 16\]"):  # fmt: skip
        build_pretext("dino", build_backbone("vit_tiny", task="features"), dino={**TINY_DINO, "local_size": 40})


# ---------------------------------------------------------------------------------------------------------------
# Resume state


def _pretext_nets():
    spec = get_backbone_spec("vit_tiny").mae_decoder

    def vit(method: str = "adapter") -> nn.Module:
        enc = apply_peft(build_backbone("vit_tiny", task="features"), method)
        mark_trainable(enc, trainable_parameter_names(enc, "tpp"))
        return enc

    def stunet() -> nn.Module:
        enc = apply_peft(build_backbone("stunet_tiny", task="features"), "conv_adapter")
        mark_trainable(enc, trainable_parameter_names(enc, "tpp"))
        return enc

    return {
        "mae": (lambda: build_pretext("mae", vit(), 32, mae_decoder="random", decoder=spec), (2, 3, 32, 32)),
        "mim": (lambda: build_pretext("mim", vit(), 32, mim={"mask_patch": 16}), (2, 3, 32, 32)),
        "mim_3d": (lambda: build_pretext("mim", stunet(), [32, 32, 32]), (1, 1, 32, 32, 32)),
        "dino": (lambda: build_pretext("dino", vit(), dino=TINY_DINO), None),
    }


@pytest.mark.parametrize("case", ["mae", "mim", "mim_3d", "dino"])
def test_resume_state_round_trips_and_covers_every_trained_tensor(case) -> None:
    """Every tensor the optimizer moves is a target parameter or in the resume state; that state, loaded into a
    fresh network, reproduces the trained one's tensors."""
    make, shape = _pretext_nets()[case]
    torch.manual_seed(0)
    net = make()
    targets = set(target_parameter_names(net.student["backbone"] if case == "dino" else net.encoder))
    prefix = "student.backbone." if case == "dino" else "encoder."
    trained = {n for n, p in net.named_parameters() if p.requires_grad}
    names = set(net.pretext_state_names())
    assert trained - {prefix + t for t in targets} <= names, "a trained pretext tensor is missing from the resume"
    assert not names & {prefix + t for t in targets}, "target parameters are saved by the target file, not here"
    if case == "dino":
        crops = [torch.randn(2, 3, 32, 32) for _ in range(2)] + [torch.randn(2, 3, 16, 16)]
        loss = pretext_loss("dino", net, TINY_DINO)(net(crops))
    else:
        x = torch.randn(*shape)
        loss = pretext_loss(PRETEXTS[PRETEXTS.index(case.split("_")[0])], net)(net(x), x)
    loss.backward()
    torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1).step()
    if case == "dino":
        net.update_teacher(0.5)
    saved = resume_state(net).state_dict()
    torch.manual_seed(1)
    fresh = make()
    before = dict(fresh.named_parameters())
    assert any(not torch.equal(before[n], saved[n]) for n in saved), "the fresh network must differ to begin with"
    resume_state(fresh).load_state_dict(saved)
    now = dict(fresh.named_parameters())
    assert all(torch.equal(now[n], saved[n]) for n in saved)


# ---------------------------------------------------------------------------------------------------------------
# --pretext mim in the bundles' pretrain_tpp workflow (demo overlays)


MIM_BUNDLES = [("mhist_lora", "mhist", 8, True), ("kits_conv_adapter", "kits", 2, False)]


@pytest.mark.parametrize(("bundle", "dataset", "epochs", "learns"), MIM_BUNDLES)
def test_pretrain_tpp_with_mim_on_a_demo_bundle(tmp_path, demo_roots, bundle, dataset, epochs, learns) -> None:
    """``--pretext mim`` through the bundle workflow on the demo overlay. The 2D stage's loss falls over its 48 steps;
    the 3D stage (6 steps, a warm-up epoch) only runs here: its learning is tested above on STU-Net itself."""
    wf = make_workflow(bundle, "pretrain_tpp", ("pretrain_tpp", "demo"), runs_dir=str(tmp_path),
                       dataset_dir=str(demo_roots(dataset)), pretext="mim", epochs=epochs)  # fmt: skip
    net = wf.parser.get_parsed_content("pretext_net")
    assert isinstance(net, MIMPretext)
    assert wf.parser.get_parsed_content("optimizer#betas") == [0.9, 0.999]
    trainer = wf.parser.get_parsed_content("train#trainer")
    clips = [h for h, *_ in trainer._event_handlers[IterationEvents.BACKWARD_COMPLETED]
             if isinstance(h, GradientClipHandler)]  # fmt: skip
    assert [(c.max_norm, c.per_tensor) for c in clips] == [(5.0, False)], "SimMIM clips the global norm at 5"
    losses: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output[0]["loss"])))
    wf.run()
    wf.finalize()
    saved = read_record(tmp_path / "pretrain_tpp" / "tpp_target")
    encoder = wf.parser.get_parsed_content("network_def")
    assert saved["pretext"] == "mim" and set(saved["state"]) == set(target_parameter_names(encoder))
    ckpt = load_verified(next((tmp_path / "pretrain_tpp" / "checkpoints").glob("*.pt")))
    assert set(ckpt["pretext"]) == set(net.pretext_state_names()) and "mask_token" in ckpt["pretext"]
    assert losses and all(math.isfinite(v) for v in losses)
    if learns:
        k = len(losses) // 4
        assert sum(losses[-k:]) / k < 0.85 * sum(losses[:k]) / k, losses
