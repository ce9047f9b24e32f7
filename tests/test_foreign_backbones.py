"""MONAI's SwinUNETR, ViT/UNETR and timm ViTs strict-load checkpoints written in their real key layouts.

Each file is built here from the library's own class (no download) and, where the public file has another layout,
translated to it: the model zoo's ``swin_unetr_btcv_segmentation`` ``models/model.pt`` (a flat SwinUNETR state dict,
or ``{"model": ...}``), Tang et al.'s ``model_swinvit.pt`` (``{"state_dict": {"module.<encoder key>"}}`` with
``mlp.fc1/fc2`` and a final ``module.norm``: the keys ``SwinUNETR.load_from`` reads), a MONAI ``ViT``/``UNETR`` state
dict, the weights of a MONAI ``MaskedAutoEncoderViT``, and a timm ViT's state dict (``.pt`` and ``.safetensors``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.networks.nets import UNETR, MaskedAutoEncoderViT, SwinUNETR, ViT

from tpp_monai.backbones import build_backbone, get_backbone_spec, load_backbone_checkpoint
from tpp_monai.compat import import_timm
from tpp_monai.errors import CheckpointError
from tpp_monai.params import count
from tpp_monai.peft import apply_peft

SWIN = get_backbone_spec("swinunetr_tiny").kwargs  # feature_size 12, window 4
VIT = get_backbone_spec("monai_vit_tiny").kwargs


def _swin_reference(seed: int = 3) -> SwinUNETR:
    """MONAI's SwinUNETR as the BTCV model is built (1 input, 14 outputs), at the tiny geometry."""
    torch.manual_seed(seed)
    return SwinUNETR(in_channels=1, out_channels=14, **SWIN)


def _model_swinvit_layout(state: dict[str, torch.Tensor]) -> dict:
    """A SwinUNETR state dict as Tang et al.'s ``model_swinvit.pt``: the encoder only, ``module.`` keys, ``fc1/fc2``
    MLP names, and the pre-training model's final LayerNorm (``module.norm``, which SwinUNETR has no place for)."""
    out = {}
    for key, value in state.items():
        if key.startswith("swinViT."):
            key = "module." + key.removeprefix("swinViT.")
            out[key.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2.")] = value
    width = SWIN["feature_size"] * 16
    out["module.norm.weight"], out["module.norm.bias"] = torch.rand(width), torch.rand(width)
    return {"state_dict": out}


def _assert_loaded(model: torch.nn.Module, reference: dict[str, torch.Tensor], keys: list[str]) -> None:
    own = model.state_dict()
    assert keys
    for key in keys:
        torch.testing.assert_close(own[key], reference[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("container", ["flat", "model"])
def test_swinunetr_loads_model_zoo_model_pt(tmp_path: Path, container: str) -> None:
    ref = _swin_reference().state_dict()
    path = tmp_path / "models" / "model.pt"
    path.parent.mkdir()
    torch.save(ref if container == "flat" else {"model": ref}, path)
    model = build_backbone("swinunetr_tiny", task="seg", num_classes=3)
    report = load_backbone_checkpoint(model, path)
    encoder = [k for k in ref if k.startswith("swinViT.") and "relative_position_index" not in k]
    assert set(report.loaded) == set(encoder)
    _assert_loaded(model, ref, encoder)
    decoder = next(keys for reason, keys in report.unused.items() if reason.startswith("SwinUNETR decoder"))
    assert "out.conv.conv.weight" in decoder and "decoder1.conv_block.conv1.conv.weight" in decoder


def test_swinunetr_loads_model_swinvit_pt_as_monai_load_from_does(tmp_path: Path) -> None:
    """The encoder tensors our loader puts into the model are those MONAI's own ``SwinUNETR.load_from`` reads from
    the same file; the extra final norm is reported, not silently dropped."""
    path = tmp_path / "model_swinvit.pt"
    torch.save(_model_swinvit_layout(_swin_reference().state_dict()), path)
    model = build_backbone("swinunetr_tiny", task="features")
    report = load_backbone_checkpoint(model, path)
    monai_loaded = _swin_reference(seed=9)
    monai_loaded.load_from(torch.load(path, weights_only=True))
    _assert_loaded(model, monai_loaded.state_dict(), report.loaded)
    assert any(keys == ["norm.weight", "norm.bias"] for keys in report.unused.values()), report.unused
    x = torch.randn(1, 1, 32, 32, 32)
    monai_loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.dense_features(x), monai_loaded.swinViT(x, True)[-1])


def test_swinunetr_strict_load_names_missing_and_unexpected_keys(tmp_path: Path) -> None:
    state = _model_swinvit_layout(_swin_reference().state_dict())
    del state["state_dict"]["module.layers2.0.blocks.1.attn.qkv.weight"]
    state["state_dict"]["module.layers2.0.blocks.1.attn.qkv_typo.weight"] = torch.zeros(1)
    path = tmp_path / "model_swinvit.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_backbone_checkpoint(build_backbone("swinunetr_tiny", task="seg", num_classes=3), path)
    message = str(err.value)
    assert "missing keys: swinViT.layers2.0.blocks.1.attn.qkv.weight" in message
    assert "unexpected keys: swinViT.layers2.0.blocks.1.attn.qkv_typo.weight" in message
    assert str(path) in message


def test_swinunetr_3d_segmentation_after_loading_with_lora(tmp_path: Path) -> None:
    """Built-in LoRA on a loaded model zoo checkpoint: the encoder is MONAI's (identity at init), the decoder trains."""
    path = tmp_path / "model.pt"
    reference = _swin_reference()
    torch.save(reference.state_dict(), path)
    model = build_backbone("swinunetr_tiny", task="seg", num_classes=3)
    load_backbone_checkpoint(model, path)
    plain = model.dense_features(torch.ones(1, 1, 32, 32, 64)).detach()
    apply_peft(model, "lora")
    x = torch.ones(1, 1, 32, 32, 64)
    torch.testing.assert_close(model.dense_features(x), plain)
    out = model(x)
    assert out.shape == (1, 3, 32, 32, 64)
    out.mean().backward()


def _save(tmp_path: Path, state: dict, name: str = "weights.pt") -> Path:
    torch.save(state, tmp_path / name)
    return tmp_path / name


def _monai_vit(seed: int = 5, **extra: object) -> ViT:
    torch.manual_seed(seed)
    return ViT(in_channels=1, img_size=32, patch_size=8, hidden_size=48, mlp_dim=96, num_layers=4, num_heads=3, **extra)


def test_monai_vit_loads_vit_and_unetr_state_dicts(tmp_path: Path) -> None:
    ref = _monai_vit(classification=True, num_classes=2).state_dict()
    torch.save(ref, tmp_path / "vit.pt")
    model = build_backbone("monai_vit_tiny", task="cls", num_classes=4)
    report = load_backbone_checkpoint(model, tmp_path / "vit.pt")
    _assert_loaded(model, ref, report.loaded)
    assert "cls_token" in report.loaded and "blocks.3.attn.qkv.weight" in report.loaded
    assert any(k.startswith("classification_head.") for keys in report.unused.values() for k in keys)

    torch.manual_seed(1)
    unetr = UNETR(in_channels=1, out_channels=2, img_size=32, feature_size=8, hidden_size=48, mlp_dim=96, num_heads=3)
    unetr_state = unetr.state_dict()
    torch.save(unetr_state, tmp_path / "unetr.pt")
    model = build_backbone("unetr_tiny", task="seg", num_classes=3)
    report = load_backbone_checkpoint(model, tmp_path / "unetr.pt")
    assert {k for k in report.loaded} == {k for k in unetr_state if k.startswith("vit.")} - {
        k for k in unetr_state if ".norm_cross_attn." in k
    }
    _assert_loaded(model, unetr_state, report.loaded)


def test_monai_vit_loads_masked_autoencoder_weights(tmp_path: Path) -> None:
    torch.manual_seed(2)
    mae = MaskedAutoEncoderViT(
        in_channels=1, img_size=32, patch_size=8, hidden_size=48, mlp_dim=96, num_layers=4, num_heads=3,
        decoder_hidden_size=24, decoder_mlp_dim=48, decoder_num_layers=2, decoder_num_heads=3,
    )  # fmt: skip
    state = mae.state_dict()
    assert "blocks.4.weight" in state and "norm.weight" not in state  # its encoder norm ends nn.Sequential blocks
    torch.save(state, tmp_path / "mae.pt")
    model = build_backbone("monai_vit_tiny", task="features")
    report = load_backbone_checkpoint(model, tmp_path / "mae.pt")
    own = model.state_dict()
    torch.testing.assert_close(own["norm.weight"], state["blocks.4.weight"], rtol=0, atol=0)
    torch.testing.assert_close(own["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"], rtol=0, atol=0)
    torch.testing.assert_close(own["cls_token"], state["cls_token"], rtol=0, atol=0)
    assert any("decoder_pred.weight" in keys for keys in report.unused.values())
    kept = load_backbone_checkpoint(build_backbone("monai_vit_tiny", task="features"), tmp_path / "mae.pt", True)
    assert {k for k in kept.extras} == {k for k in state if k.startswith(("decoder_", "mask_tokens"))}


def test_monai_vit_strict_load_names_missing_and_unexpected_keys(tmp_path: Path) -> None:
    plain = _monai_vit().state_dict()  # classification=False: MONAI's ViT has no class token then
    load_backbone_checkpoint(
        build_backbone("monai_vit_tiny", task="features", class_token=False), _save(tmp_path, plain)
    )
    with pytest.raises(CheckpointError, match="missing keys: cls_token"):
        load_backbone_checkpoint(build_backbone("monai_vit_tiny", task="features"), _save(tmp_path, plain))
    state = _monai_vit(classification=True, num_classes=2).state_dict()
    del state["blocks.1.mlp.linear2.bias"]
    state["blocks.1.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "vit.pt")
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.1\.mlp\.linear2\.bias(.|\n)*unexpected keys: "
                       r"blocks\.1\.extra\.weight"):  # fmt: skip
        load_backbone_checkpoint(build_backbone("monai_vit_tiny", task="features"), tmp_path / "vit.pt")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_timm_vit_loads_a_local_checkpoint_file(tmp_path: Path, suffix: str) -> None:
    timm = import_timm()
    torch.manual_seed(4)
    reference = timm.create_model("test_vit", pretrained=False, num_classes=5)
    state = reference.state_dict()
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    model = build_backbone("timm:test_vit", task="cls", num_classes=3)
    report = load_backbone_checkpoint(model, path)
    assert "blocks.0.attn.qkv.weight" in report.loaded and "pos_embed" in report.loaded
    _assert_loaded(model, state, report.loaded)
    assert any("head.weight" in keys for keys in report.unused.values())
    apply_peft(model, "adapter")  # a built-in method on the loaded model
    assert model(torch.randn(1, 3, 160, 160)).shape == (1, 3)


def test_timm_vit_strict_load_names_missing_and_unexpected_keys(tmp_path: Path) -> None:
    state = import_timm().create_model("test_vit", pretrained=False, num_classes=0).state_dict()
    del state["blocks.0.norm1.weight"]
    state["blocks.0.unknown"] = torch.zeros(1)
    torch.save(state, tmp_path / "vit.pt")
    with pytest.raises(CheckpointError) as err:
        load_backbone_checkpoint(build_backbone("timm:test_vit", task="features"), tmp_path / "vit.pt")
    assert "missing keys: blocks.0.norm1.weight" in str(err.value)
    assert "unexpected keys: blocks.0.unknown" in str(err.value)


def test_params_counts_for_the_new_backbones() -> None:
    """Full fine-tuning trains the whole plain model, whose size is the library's own network's; LoRA trains less."""
    torch.manual_seed(0)
    monai_swin = SwinUNETR(in_channels=1, out_channels=2, **SWIN)
    full = count("full_finetune", None, backbone="swinunetr_tiny")
    assert full["denominator"] == sum(p.numel() for p in monai_swin.parameters())
    assert full["ratio"] == pytest.approx(100.0)
    lora = count("lora", None, backbone="swinunetr_tiny")
    assert 0 < lora["target"] < lora["trainable"] < full["trainable"]
    assert lora["total"] == full["denominator"] + lora["target"]
    monai_vit = ViT(in_channels=1, img_size=32, patch_size=8, hidden_size=48, mlp_dim=96, num_layers=4, num_heads=3,
                    classification=True, num_classes=2)  # fmt: skip
    assert count("full_finetune", None, backbone="monai_vit_tiny")["denominator"] == sum(
        p.numel() for p in monai_vit.parameters()
    )
    timm_vit = import_timm().create_model("test_vit", pretrained=False, num_classes=2)
    timm_full = count("full_finetune", "cls", backbone="timm:test_vit")
    assert timm_full["denominator"] == sum(p.numel() for p in timm_vit.parameters())
    assert 0 < count("adapter", "cls", backbone="timm:test_vit")["ratio"] < 100
