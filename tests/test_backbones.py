"""Backbones: exact public key layouts, checkpoint containers, strict loading with clear errors, MedCoSS numerics."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tpp_monai.backbones import build_backbone, load_backbone_checkpoint
from tpp_monai.errors import CheckpointError, ConfigError
from tpp_monai.network import build_network

KEYS = Path(__file__).parent / "fixtures" / "keys"


def _spec(name: str) -> dict:
    return json.loads((KEYS / f"{name}.json").read_text())


def _random_state(spec: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """A distinct constant per tensor (cheap to make for 200M parameters, and every key is recognisable)."""
    return {prefix + k: torch.full(shape, 1e-3 * (i + 1)) for i, (k, shape) in enumerate(spec["keys"])}


@pytest.mark.parametrize(("task", "name"), [("cls", "medcoss_cls_2class"), ("seg", "medcoss_seg_glas")])
def test_medcoss_keys_and_counts_match_the_public_models(task: str, name: str) -> None:
    spec = _spec(name)
    model = build_backbone("medcoss_vit_b16", task=task, num_classes=2, out_channels=1)
    assert [[k, list(v.shape)] for k, v in model.state_dict().items()] == spec["keys"]
    assert sum(p.numel() for p in model.parameters()) == spec["num_params"]


def test_vit_small_keys_match_timm_and_dino() -> None:
    model = build_backbone("path_dino_vit_s16")
    ours = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert ours == _spec("vit_small_p16_timm")["keys"] == _spec("vit_small_p16_dino")["keys"]
    assert sum(p.numel() for p in model.parameters()) == 21_665_664


@pytest.fixture(scope="module")
def medcoss_pretrain_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The MedCoSS pre-training container: {'model', 'optimizer', 'epoch', 'scaler', 'args'} (argparse Namespace)."""
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint-299.pth"
    spec = _spec("medcoss_mae_pretrain")
    assert spec["container"]["top_level_keys"] == ["model", "optimizer", "epoch", "scaler", "args"]
    torch.save(
        {
            "model": _random_state(spec),
            "optimizer": {"state": {}, "param_groups": []},
            "epoch": 299,
            "scaler": {"scale": 65536.0},
            "args": argparse.Namespace(blr=1.5e-4, norm_pix_loss=True),
        },
        path,
    )
    return path


@pytest.mark.parametrize("task", ["cls", "seg", "features"])
def test_pretraining_checkpoint_loads_and_reports_unused(medcoss_pretrain_file: Path, task: str) -> None:
    model = build_backbone("medcoss_vit_b16", task=task, num_classes=2)
    report = load_backbone_checkpoint(model, medcoss_pretrain_file)
    state = torch.load(medcoss_pretrain_file, weights_only=False)["model"]
    for key in report.loaded:
        assert torch.equal(model.state_dict()[key], state[key])
    assert (
        "video_embed.embeddings_pos.position_embeddings.weight" in report.unused["unused MedCoSS pre-training tables"]
    )
    assert "mlm_head.decoder.weight" in report.unused["MedCoSS text branch"]
    assert len(report.loaded) == (179 if task != "seg" else 178)
    if task == "seg":
        assert report.unused["class token (the segmentation model has none)"] == ["cls_token"]


def test_pretraining_checkpoint_keeps_mae_decoder_for_tpp(medcoss_pretrain_file: Path) -> None:
    model = build_backbone("medcoss_vit_b16", task="seg", out_channels=1)
    report = load_backbone_checkpoint(model, medcoss_pretrain_file, keep_mae_decoder=True)
    assert {
        "decoder_embed.weight",
        "mask_token",
        "decoder_pos_embed_2D",
        "decoder_pred_2D.weight",
        "decoder_blocks.7.mlp.fc2.bias",
        "cls_token",
    } <= set(report.extras)
    assert "decoder_pred_3D.weight" in report.unused["MAE decoder, not used by this workflow"]


@pytest.mark.parametrize(
    ("task", "name", "wrapper"),
    [
        ("cls", "medcoss_cls_2class", "model"),
        ("seg", "medcoss_seg_glas", "model"),
        ("cls", "medcoss_cls_2class", "state_dict"),
        ("cls", "medcoss_cls_2class", "flat"),
    ],
)
def test_finetuning_checkpoint_with_module_prefix_loads(tmp_path: Path, task: str, name: str, wrapper: str) -> None:
    spec = _spec(name)
    state = _random_state(spec, prefix="module.")
    path = tmp_path / "checkpoint.pth"
    torch.save(state if wrapper == "flat" else {wrapper: state, "optimizer": {}, "epoch": 3}, path)
    model = build_backbone("medcoss_vit_b16", task=task, num_classes=2, out_channels=1)
    report = load_backbone_checkpoint(model, path)
    head = model.head_parameter_names()
    assert set(report.loaded) | set(head) == {k for k, _ in spec["keys"]}
    assert sorted(report.unused["task head of the checkpoint (a fresh head is trained)"]) == sorted(head)
    assert torch.equal(
        model.fused_encoder.layers[5].linear1.weight, state["module.fused_encoder.layers.5.linear1.weight"]
    )


@pytest.mark.parametrize("layout", ["flat", "dino_teacher"])
def test_path_dino_checkpoint_loads(tmp_path: Path, layout: str) -> None:
    spec = _spec("vit_small_p16_timm")
    state = _random_state(spec)
    if layout == "dino_teacher":
        obj = {"teacher": {"backbone." + k: v for k, v in state.items()}, "epoch": 200}
        obj["teacher"]["head.last_layer.weight_v"] = torch.zeros(8, 256)
    else:
        obj = state
    path = tmp_path / "dino_vit_small_patch16_ep200.torch"
    torch.save(obj, path)
    model = build_backbone("path_dino_vit_s16", task="cls", num_classes=2)
    report = load_backbone_checkpoint(model, path)
    assert len(report.loaded) == 150
    assert torch.equal(model.blocks[11].attn.qkv.weight, state["blocks.11.attn.qkv.weight"])


def test_mismatched_checkpoint_names_file_and_keys(tmp_path: Path) -> None:
    spec = _spec("medcoss_cls_2class")
    state = _random_state(spec)
    del state["fused_encoder.layers.3.norm2.bias"]
    state["fused_encoder.layers.0.linear1.weight"] = torch.zeros(10, 10)
    state["something.else"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save({"model": state}, path)
    model = build_backbone("medcoss_vit_b16", task="cls", num_classes=2)
    with pytest.raises(CheckpointError) as err:
        load_backbone_checkpoint(model, path)
    msg = str(err.value)
    assert str(path) in msg
    assert "missing keys: fused_encoder.layers.3.norm2.bias" in msg
    assert "unexpected keys: something.else" in msg
    assert "fused_encoder.layers.0.linear1.weight: checkpoint (10, 10) vs model (3072, 768)" in msg


def test_missing_or_corrupt_checkpoint_file(tmp_path: Path) -> None:
    model = build_backbone("vit_tiny")
    with pytest.raises(CheckpointError, match="not found"):
        load_backbone_checkpoint(model, tmp_path / "nope.pth")
    good = tmp_path / "w.pth"
    torch.save(model.state_dict(), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_backbone_checkpoint(model, truncated)


def test_build_network_requires_a_checkpoint_or_explicit_none() -> None:
    with pytest.raises(ConfigError, match=r"checkpoint-299\.pth.*--backbone_ckpt none"):
        build_network("medcoss_vit_b16", task="cls", method="adapter", num_classes=2)
    net = build_network("medcoss_vit_tiny", task="cls", method="adapter", num_classes=2, backbone_ckpt="none")
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(".peft" in n or n.startswith(("head.", "fc_norm.")) for n in trainable)


def test_medcoss_layer_matches_torch_multihead_attention() -> None:
    """Our fused-SDPA layer computes exactly what MedCoSS's nn.MultiheadAttention-based layer computes."""
    model = build_backbone("medcoss_vit_tiny").eval()
    layer = model.fused_encoder.layers[1]
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(2, 17, model.embed_dim)
    h = layer.norm1(x)
    a = layer.self_attn(h, h, h, need_weights=False)[0]
    y = x + layer.gamma_1 * a
    ref = y + layer.gamma_2 * layer.linear2(F.gelu(layer.linear1(layer.norm2(y))))
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


def test_medcoss_position_table_is_raster_indexed_and_temporal_row_random_in_training() -> None:
    model = build_backbone("medcoss_vit_tiny")
    emb = model.video_embed
    x = torch.randn(1, 3, 64, 32)  # 4 x 2 patch grid -> rows 0..7 of the table, in raster order
    model.eval()
    tokens, grid = model.embed(x)
    conv = emb.embeddings(x).flatten(2).transpose(1, 2)
    pos = emb.embeddings_st_pos_2D.spatial_pos_embed.weight[:8] + emb.embeddings_st_pos_2D.temporal_pos_embed.weight[0]
    torch.testing.assert_close(tokens, emb.embeddings_norm(conv + pos))
    assert grid == (4, 2)
    model.train()
    draws = {float(model.embed(x)[0].detach().sum()) for _ in range(20)}
    assert len(draws) > 1
    with pytest.raises(ConfigError, match="not divisible by the patch size"):
        model.embed(torch.randn(1, 3, 40, 32))
