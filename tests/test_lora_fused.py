"""The fused-qkv LoRA's stacked product equals the split / add / concatenate formula it replaced, and keeps its keys."""

from __future__ import annotations

import pytest
import torch

from tpp_monai.backbones import build_backbone
from tpp_monai.peft import apply_peft
from tpp_monai.peft.lora import FusedQKVLoRA, LoRAConfig

DIM, RANK = 12, 3


def _previous_formula(module: FusedQKVLoRA, qkv: torch.Tensor, h: torch.Tensor, alpha: float) -> torch.Tensor:
    """The per-slice formula written out here: split q/k/v, add ``alpha / r * h A^T B^T`` to adapted slices, concat."""
    q, k, v = qkv.split(DIM, dim=-1)
    parts = {"q": q, "k": k, "v": v}
    for name, update in module.updates.items():
        parts[name] = parts[name] + (alpha / RANK) * (h @ update.lora_a.T @ update.lora_b.T)
    return torch.cat([parts["q"], parts["k"], parts["v"]], dim=-1)


@pytest.mark.parametrize("targets", [("q", "v"), ("q", "k", "v"), ("k",), ("v", "q")])
def test_stacked_update_equals_the_per_slice_formula(targets: tuple[str, ...]) -> None:
    alpha = 5.0
    torch.manual_seed(0)
    module = FusedQKVLoRA(DIM, LoRAConfig(rank=RANK, alpha=alpha, targets=targets)).double()
    for update in module.updates.values():  # B starts at zero; give it values so the update is not trivially 0
        torch.nn.init.normal_(update.lora_b)
    h = torch.randn(2, 5, DIM, dtype=torch.float64, requires_grad=True)
    qkv = torch.randn(2, 5, 3 * DIM, dtype=torch.float64, requires_grad=True)
    got = module(qkv, h)
    want = _previous_formula(module, qkv, h, alpha)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    untouched = [i for i, s in enumerate("qkv") if s not in targets]
    for i in untouched:  # a slice without an update passes through exactly
        assert torch.equal(got[..., i * DIM : (i + 1) * DIM], qkv[..., i * DIM : (i + 1) * DIM])
    # and the gradients of every parameter and input match the old formula's
    grad_out = torch.randn_like(got)
    params = [h, qkv, *module.parameters()]
    new_grads = torch.autograd.grad(got, params, grad_out)
    old_grads = torch.autograd.grad(want, params, grad_out)
    for g_new, g_old in zip(new_grads, old_grads, strict=True):
        torch.testing.assert_close(g_new, g_old, rtol=1e-10, atol=1e-12)


def test_checkpoint_keys_and_model_forward_unchanged() -> None:
    """Keys stay ``peft_sites.qkv.updates.<slice>.lora_a/lora_b``; the whole model equals the old per-slice forward."""
    torch.manual_seed(0)
    model = apply_peft(build_backbone("medcoss_vit_tiny", task="cls", num_classes=2), "lora").double().eval()
    keys = {k.split("peft_sites.qkv.", 1)[1] for k in model.state_dict() if "peft_sites.qkv." in k}
    assert keys == {"updates.q.lora_a", "updates.q.lora_b", "updates.v.lora_a", "updates.v.lora_b"}
    for name, p in model.named_parameters():
        if name.endswith("lora_b"):
            torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    got = model(x)
    block = model.encoder_blocks()[0]
    alpha = block.peft_sites["qkv"].scaling * block.peft_sites["qkv"].rank

    class PerSlice(torch.nn.Module):  # the previous implementation's formula as a drop-in site
        def __init__(self, fused: FusedQKVLoRA) -> None:
            super().__init__()
            self.fused = fused

        def forward(self, qkv: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
            dim = self.fused.dim
            parts = list(qkv.split(dim, dim=-1))
            for name, update in self.fused.updates.items():
                i = "qkv".index(name)
                parts[i] = parts[i] + alpha / self.fused.rank * (h @ update.lora_a.T @ update.lora_b.T)
            return torch.cat(parts, dim=-1)

    for blk in model.encoder_blocks():
        blk.peft_sites["qkv"] = PerSlice(blk.peft_sites["qkv"])
    torch.testing.assert_close(got, model(x), rtol=1e-10, atol=1e-12)
