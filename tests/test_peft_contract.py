"""The contract every registered PEFT method keeps, on both ViT backbone families and both tasks."""

from __future__ import annotations

import pytest
import torch

from tpp_monai.backbones import build_backbone
from tpp_monai.errors import CheckpointError, ConfigError
from tpp_monai.peft import (
    METHODS,
    applicable_methods,
    apply_peft,
    count_parameters,
    get_method,
    load_target_state,
    make_config,
    mark_trainable,
    target_parameter_names,
    target_state,
    trainable_parameter_names,
)

get_method("adapter")  # register the built-in methods
SIZE = 64
# backbone -> (tasks with a head, input shape); every registered method of the backbone's family runs on it
CASES = {
    "medcoss_vit_tiny": (("cls", "seg"), (3, SIZE, SIZE)),
    "vit_tiny": (("cls", "seg"), (3, SIZE, SIZE)),
    "stunet_tiny": (("seg",), (1, 16, 32, 32)),  # smallest patch that trains: bottleneck 1x2x1
}
BACKBONES = tuple(CASES)
VIT_METHODS = applicable_methods("medcoss_vit_tiny")


def _methods(backbone: str) -> list[str]:
    return applicable_methods(backbone)


def _cases(with_features: bool = False) -> list[tuple[str, str, str]]:
    return [
        (b, t, m)
        for b, (tasks, _) in CASES.items()
        for t in (*tasks, "features")
        if with_features or t != "features"
        for m in _methods(b)
    ]


def _build(backbone: str, task: str, method: str | None, seed: int = 0):
    torch.manual_seed(seed)
    model = build_backbone(backbone, task=task, num_classes=3)
    if method is not None:
        apply_peft(model, method)
    return model


def _plain_and_tuned(backbone: str, task: str, method: str):
    """A plain model and the same weights with the method injected."""
    plain = _build(backbone, task, None)
    tuned = _build(backbone, task, method, seed=1)
    missing, unexpected = tuned.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected
    assert all(n in target_parameter_names(tuned) or n.startswith("peft") or ".peft" in n for n in missing)
    return plain, tuned


def _input(batch: int = 2, seed: int = 7, backbone: str = "vit_tiny") -> torch.Tensor:
    return torch.randn(batch, *CASES[backbone][1], generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("backbone", "task", "method"), _cases())
def test_shape_and_identity_at_init(backbone: str, task: str, method: str) -> None:
    plain, tuned = _plain_and_tuned(backbone, task, method)
    plain.eval()
    tuned.eval()
    x = _input(backbone=backbone)
    with torch.no_grad():
        ref, out = plain(x), tuned(x)
    assert out.shape == ref.shape
    if backbone in ("medcoss_vit_tiny", "vit_tiny"):
        assert out.shape == ((2, 3) if task == "cls" else (2, 1, SIZE, SIZE))
    if METHODS[method].identity_at_init:
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    else:  # a method that does not promise identity must actually change the function
        assert not torch.allclose(out, ref, atol=1e-6)


def _train_steps(model: torch.nn.Module, stage: str, backbone: str, steps: int = 3) -> None:
    params = mark_trainable(model, trainable_parameter_names(model, stage))
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)  # no decay: changes come from gradients only
    model.train()
    for step in range(steps):
        out = model(_input(4, seed=step, backbone=backbone))
        loss = (out.float() ** 2).mean() + out.float().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss), f"step {step}"


@pytest.mark.parametrize(("backbone", "task", "method"), _cases(with_features=True))
def test_optimizer_step_moves_targets_only(backbone: str, task: str, method: str) -> None:
    """features = the TPP stage (targets only); cls/seg = fine-tuning (targets + head).

    Several steps on different batches, because zero-initialised factors (LoRA's B, adapters' up-projection) leave
    their partner factor without a gradient in the very first step.
    """
    model = _build(backbone, task, method)
    stage = "tpp" if task == "features" else "finetune"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    targets = set(target_parameter_names(model))
    trainable = set(trainable_parameter_names(model, stage))
    unused = model.unused_parameter_names()
    if not METHODS[method].pretrainable and stage == "tpp":
        assert method == "linear_probe" or targets, "full fine-tuning has targets"
    if not trainable:  # a linear probe without a head (the TPP stage's features model) trains nothing
        assert method == "linear_probe" and not targets
        return
    _train_steps(model, stage, backbone)
    for name, p in model.named_parameters():
        if name not in trainable:
            assert torch.equal(p, before[name]), f"frozen tensor {name} changed"
        elif name not in unused:
            assert not torch.equal(p, before[name]), f"trainable tensor {name} did not change"
    assert targets <= trainable


@pytest.mark.parametrize(
    ("backbone", "method"), [(b, m) for b in BACKBONES for m in _methods(b) if METHODS[m].pretrainable]
)
def test_target_state_round_trip(backbone: str, method: str) -> None:
    task = CASES[backbone][0][0]
    model = _build(backbone, task, method)
    _train_steps(model, "finetune", backbone)
    saved = target_state(model)
    assert set(saved["state"]) == set(target_parameter_names(model))
    assert saved["method"] == method and saved["backbone"] == backbone
    fresh = _build(backbone, task, method, seed=3)
    shared = {k: v for k, v in model.state_dict().items() if k not in saved["state"]}
    fresh.load_state_dict(shared, strict=False)
    x = _input(backbone=backbone)
    model.eval()
    fresh.eval()
    loaded = load_target_state(fresh, saved)
    assert sorted(loaded) == sorted(saved["state"])
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize(("backbone", "task", "method"), _cases())
def test_trainable_share(backbone: str, task: str, method: str) -> None:
    counts = count_parameters(_build(backbone, task, method))
    share = counts["trainable"] / counts["total"]
    if method == "full_finetune":
        assert share == 1.0
    else:
        assert 0.0 < share < 1.0
    if method == "linear_probe":
        assert counts["target"] == 0
    else:
        assert counts["target"] > 0


@pytest.mark.parametrize("method", VIT_METHODS)
def test_masked_encoder_forward(method: str) -> None:
    """Every method runs on the visible 25 % of patches (MAE); prompts never come back out of the encoder."""
    model = _build("medcoss_vit_tiny", "features", method).eval()
    x = _input()
    grid = (SIZE // 16) ** 2
    keep = torch.rand(2, grid).argsort(dim=1)[:, : grid // 4]
    out = model.forward_features(x, keep_idx=keep, taps=(1, 4))
    assert out.tokens.shape == (2, 1 + grid // 4, model.embed_dim)
    assert [t.shape[1] for t in out.taps] == [grid // 4, grid // 4]


def test_target_state_refuses_other_method_options_backbone() -> None:
    saved = target_state(_build("medcoss_vit_tiny", "cls", "adapter"))
    with pytest.raises(CheckpointError, match="method 'adapter'"):
        load_target_state(_build("medcoss_vit_tiny", "cls", "lora"), saved)
    other = build_backbone("medcoss_vit_tiny", task="cls", num_classes=3)
    apply_peft(other, "adapter", {"bottleneck": 4})
    with pytest.raises(CheckpointError, match="options"):
        load_target_state(other, saved)
    with pytest.raises(CheckpointError, match="backbone 'medcoss_vit_tiny'"):
        load_target_state(_build("vit_tiny", "cls", "adapter"), saved)


def test_unknown_method_and_option_names_list_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown PEFT method 'adpter'.*valid PEFT methods: .*adapter"):
        get_method("adpter")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['rnk'\].*valid options: alpha, rank, targets"):
        make_config("lora", {"rnk": 4})
    with pytest.raises(ConfigError, match="LoRA targets"):
        apply_peft(build_backbone("vit_tiny", task="cls", num_classes=2), "lora", {"targets": ["x"]})


def test_vpt_prompts_are_dropped_before_head_and_taps() -> None:
    model = _build("medcoss_vit_tiny", "seg", "vpt").eval()
    out = model.forward_features(_input(), taps=model.taps)
    n = (SIZE // 16) ** 2
    assert out.tokens.shape[1] == n  # segmentation model: no class token, no prompts
    assert all(t.shape[1] == n for t in out.taps)
