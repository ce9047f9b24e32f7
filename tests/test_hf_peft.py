"""huggingface peft as a method source (``peft.<tuner>``) against the built-in methods and the TPP stage's files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tpp_monai.backbones import build_backbone
from tpp_monai.peft import apply_peft, count_parameters, mark_trainable, trainable_parameter_names
from tpp_monai.peft.lora import SLICES

RANK, ALPHA, TARGETS = 2, 8.0, ("q", "v")


def _pair() -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    """The built-in ``lora`` and ``peft.lora`` on two copies of one ViT with the same backbone and head tensors, and
    peft's ``lora_B`` entries outside the built-in's blocks (a mask, 1 where the built-in has a parameter).

    The built-in LoRA puts a rank-r update on each target slice of the fused qkv projection; peft's LoRA on the same
    ``attn.qkv`` with rank ``len(TARGETS) * r`` and the same scaling is that update when its ``A`` holds the slices'
    ``A`` stacked and its ``B`` the slices' ``B`` block-wise (zeros elsewhere).
    """
    torch.manual_seed(0)
    builtin = build_backbone("vit_tiny", task="cls", num_classes=3)
    hf = build_backbone("vit_tiny", task="cls", num_classes=3)
    hf.load_state_dict(builtin.state_dict())
    apply_peft(builtin, "lora", {"rank": RANK, "alpha": ALPHA, "targets": list(TARGETS)})
    rank = len(TARGETS) * RANK
    apply_peft(hf, "peft.lora", {"r": rank, "lora_alpha": ALPHA / RANK * rank, "target_modules": ["attn.qkv"]})
    params = dict(hf.named_parameters())
    masks = {}
    with torch.no_grad():
        for i, block in enumerate(builtin.blocks):
            updates = block.peft_sites.qkv.updates
            for u in updates.values():  # non-zero B: the test must see the update, not only LoRA's identity start
                u.lora_b.normal_(0, 0.02)
            a = params[f"blocks.{i}.attn.qkv.lora_A.default.weight"]
            b = params[f"blocks.{i}.attn.qkv.lora_B.default.weight"]
            a.copy_(torch.cat([updates[t].lora_a for t in TARGETS]))
            b.zero_()
            mask = torch.zeros_like(b)
            dim = b.shape[0] // len(SLICES)
            for col, t in enumerate(TARGETS):
                rows, cols = (
                    slice(SLICES.index(t) * dim, (SLICES.index(t) + 1) * dim),
                    slice(col * RANK, (col + 1) * RANK),
                )
                b[rows, cols] = updates[t].lora_b
                mask[rows, cols] = 1
            masks[b] = mask
    return builtin, hf, masks


def _loss(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(images), labels)


def test_peft_lora_equals_the_builtin_lora_on_the_same_vit() -> None:
    builtin, hf, masks = _pair()
    gen = torch.Generator().manual_seed(1)
    images, labels = torch.randn(4, 3, 224, 224, generator=gen), torch.randint(0, 3, (4,), generator=gen)
    counts = count_parameters(builtin), count_parameters(hf)
    free = sum(int(m.sum()) for m in masks.values())  # peft's lora_B entries the built-in has
    dense = sum(m.numel() for m in masks.values())
    assert counts[0]["trainable"] == counts[1]["trainable"] - dense + free, counts
    builtin.eval(), hf.eval()  # no dropout: the same function
    torch.testing.assert_close(builtin(images), hf(images), rtol=1e-4, atol=1e-5)

    # one SGD step; peft's lora_B entries outside the built-in's blocks are held at zero (gradient mask), the rest
    # of the update is peft's own autograd
    for b, mask in masks.items():
        b.register_hook(lambda grad, mask=mask: grad * mask)
    losses = []
    for model in (builtin, hf):
        params = mark_trainable(model, trainable_parameter_names(model))  # as the workflows do (peft froze the head)
        opt = torch.optim.SGD(params, lr=0.5)
        before = _loss(model, images, labels)
        before.backward()
        opt.step()
        with torch.no_grad():
            losses.append((before.item(), _loss(model, images, labels).item()))
    (b0, b1), (h0, h1) = losses
    assert abs(b1 - b0) > 1e-3, "the step must change the loss, else the comparison says nothing"
    assert abs(b0 - h0) < 1e-5 and abs(b1 - h1) < 1e-4, losses


LOAD_IN_PEFT = """
import sys, torch
from tpp_monai.compat import import_peft
from tpp_monai.backbones import build_backbone
peft = import_peft()
folder, expected = sys.argv[1], torch.load(sys.argv[2], weights_only=True)
loaded = peft.PeftModel.from_pretrained(build_backbone("vit_tiny", task="cls", num_classes=2), folder)
params = dict(loaded.base_model.model.named_parameters())
assert set(expected) <= set(params), sorted(set(expected) - set(params))[:3]
for name, tensor in expected.items():
    assert torch.equal(params[name], tensor), name
print("loaded", len(expected))
"""


def test_peft_target_folder_loads_in_peft_and_back(tmp_path) -> None:
    import subprocess
    import sys

    from tpp_monai.peft import load_target_state, target_parameter_names
    from tpp_monai.peft.files import write_target_folder

    torch.manual_seed(0)
    model = build_backbone("vit_tiny", task="cls", num_classes=2)
    apply_peft(model, "peft.lora", {"r": 4})
    targets = target_parameter_names(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in targets:
                p.normal_()  # not peft's initial values: the load must carry these tensors
    folder = write_target_folder(model, tmp_path / "tpp_target")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    state = dict(model.named_parameters())
    expected = {name: state[name].detach().clone() for name in targets}
    torch.save(expected, tmp_path / "expected.pt")
    proc = subprocess.run([sys.executable, "-c", LOAD_IN_PEFT, str(folder), str(tmp_path / "expected.pt")],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and f"loaded {len(targets)}" in proc.stdout, proc.stderr[-3000:]

    fresh = build_backbone("vit_tiny", task="cls", num_classes=2)
    apply_peft(fresh, "peft.lora", {"r": 4})  # finetune's start: a new wrapped network, then the target folder
    load_target_state(fresh, folder)
    now = dict(fresh.named_parameters())
    assert all(torch.equal(now[name], tensor) for name, tensor in expected.items())


def test_a_tuner_that_cannot_wrap_is_refused_with_the_reason_and_the_tuners_that_can() -> None:
    import pytest

    from tpp_monai.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        apply_peft(build_backbone("vit_tiny", task="cls", num_classes=2), "peft.lora", {"target_modules": ["head"]})
    message = str(err.value)
    assert "cannot tune backbone 'vit_tiny'" in message and "task-head layers ['head']" in message, message
    can = message.split("peft tuners that can: ", 1)[1].split(" (not probed", 1)[0].split(", ")
    assert {"peft.lora", "peft.dora", "peft.ia3"} <= set(can) and "peft.adalora" not in can, message


@pytest.mark.parametrize(("method", "options", "layer"), [
    ("peft.lora", {"r": 4}, "lora_A"), ("peft.dora", {"r": 4}, "lora_magnitude_vector"), ("peft.ia3", {}, "ia3_l"),
])  # fmt: skip
def test_glas_bundle_runs_a_peft_method_through_every_workflow(tmp_path, demo_roots, method, options, layer) -> None:
    """glas_adapter (demo overlay) with --method peft.<tuner>: pretrain_tpp leaves a peft adapter folder and its
    pretext loss falls, finetune wraps the network with that tuner, evaluate writes its metrics."""
    import json

    import pandas as pd
    from conftest import run_workflow

    from tpp_monai.peft.files import read_record

    common = {"runs_dir": str(tmp_path), "dataset_dir": str(demo_roots("glas")), "backbone": "vit_tiny",
              "backbone_ckpt": "none", "method": method, "method_options": options,
              "ckpt_dir": str(tmp_path / "models")}  # fmt: skip
    run_workflow("glas_adapter", "pretrain_tpp", tpp_epochs=2, **common)
    folder = tmp_path / "pretrain_tpp" / "tpp_target"
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    losses = pd.read_csv(tmp_path / "pretrain_tpp" / "history.csv")["train_loss"].tolist()
    assert len(losses) == 2 and losses[1] < losses[0], losses
    assert read_record(folder)["method"] == method
    wf = run_workflow("glas_adapter", "finetune", epochs=1, val_interval=1, **common)
    network = wf.parser.get_parsed_content("network")
    assert any(layer in n for n, _ in network.named_parameters())
    run_workflow("glas_adapter", "evaluate", **common)
    assert json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    if method == "peft.lora":  # inference.json builds the same wrapped network from model.pt
        from PIL import Image

        root, images = demo_roots("glas"), tmp_path / "in"
        images.mkdir()
        for rec in json.loads((root / "datalist.json").read_text())["test"][:2]:
            (images / Path(rec["image"]).name).write_bytes((root / rec["image"]).read_bytes())
        run_workflow("glas_adapter", "run", ("inference", "demo"), input_dir=str(images),
                     output_dir=str(tmp_path / "inference"), **common)  # fmt: skip
        for src in images.iterdir():
            assert Image.open(tmp_path / "inference" / f"{src.stem}_mask.png").size == Image.open(src).size


def test_glas_peft_dora_bundle_demo_runs_its_tpp_stage_into_an_adapter_folder(tmp_path, demo_roots) -> None:
    """The generated ``glas_peft_dora`` bundle (its own configs and demo overlay, no ``--method``) runs pretrain_tpp
    and leaves peft's adapter folder for DoRA."""
    import json
    import math

    import pandas as pd
    from conftest import run_workflow

    run_workflow("glas_peft_dora", "pretrain_tpp", tpp_epochs=1, runs_dir=str(tmp_path),
                 dataset_dir=str(demo_roots("glas")))  # fmt: skip
    folder = tmp_path / "pretrain_tpp" / "tpp_target"
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is True
    losses = pd.read_csv(tmp_path / "pretrain_tpp" / "history.csv")["train_loss"].tolist()
    assert len(losses) == 1 and math.isfinite(losses[0])
    assert (tmp_path / "pretrain_tpp" / "init_cost.json").is_file()
