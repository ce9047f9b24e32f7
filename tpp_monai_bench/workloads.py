"""The measured configurations, built from the bundle configs' own recipes (:mod:`tpp_monai_bench.recipes`)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from tpp_monai_bench.recipes import bundle_settings, finetune_recipe, tpp_recipe
from tpp_monai_bench.timing import (
    MIB,
    Device,
    Sample,
    median,
    patch_embed_flops,
    quiet_median,
    ratio,
    unique_bytes,
    vit_encoder_flops,
)

STUNET_SCALING = "stunet_b"


def make_adamw(params: Any, device: Device, **kwargs: Any) -> torch.optim.Optimizer:
    """AdamW with the fused kernel where PyTorch has one for the device (CPU and CUDA in PyTorch >= 2.4), else
    the multi-tensor one: one pass over the trainable tensors instead of a Python loop per tensor."""
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(params, foreach=device.cuda, **kwargs)


@dataclass
class Workload:
    """One measured configuration: ``step`` (timed), ``prepare`` (before each step, e.g. releasing gradients;
    timed with the step, outside the memory window), ``persistent`` (its own long-lived tensors)."""

    key: str
    label: str
    step: Callable[[], Any]
    images: int
    trainable: int = 0
    prepare: Callable[[], Any] = lambda: None
    persistent: Callable[[], list[Tensor | None]] = list
    weights: Callable[[], list[Tensor]] = list
    samples: list[Sample] = field(default_factory=list)
    min_quiet: int = 1
    flops: int | None = None
    peak_bytes: int | None = None
    persistent_bytes: int | None = None
    host_syncs: int | None = None
    optimizer: torch.optim.Optimizer | None = None  # the recipe being measured (training workloads)

    def run(self) -> None:
        self.prepare()
        self.step()

    @property
    def seconds(self) -> float | None:
        return quiet_median(self.samples, self.min_quiet)[0]

    @property
    def quiet_count(self) -> int:
        return sum(x.quiet for x in self.samples)

    def summary(self, matmul_rate: float | None) -> dict:
        s = self.seconds
        rate = self.flops / s if self.flops and s else None
        return {
            "label": self.label,
            "step_s": s,
            "quiet_steps": self.quiet_count,
            "steps": len(self.samples),
            "step_s_all": [round(x.wall, 4) for x in self.samples],
            "stall_s_all": [None if x.stall is None else round(x.stall, 4) for x in self.samples],
            "cpu_s_median": median(x.cpu for x in self.samples),
            "images_per_s": self.images / s if s else None,
            "peak_mib": self.peak_bytes / MIB if self.peak_bytes is not None else None,
            # persistent = weights + gradients kept + optimizer state + inputs; peak - persistent = the step's own
            "weights_mib": unique_bytes(self.weights()) / MIB,
            "persistent_mib": self.persistent_bytes / MIB if self.persistent_bytes is not None else None,
            "gflop_per_step": self.flops / 1e9 if self.flops else None,
            "gflop_per_s": rate / 1e9 if rate else None,
            "matmul_fraction": ratio(rate, matmul_rate),
            "trainable": self.trainable,
            "host_syncs": self.host_syncs,
        }


def _optimizer_tensors(opt: torch.optim.Optimizer) -> list[Tensor]:
    out: list[Tensor] = []
    for state in opt.state.values():
        out.extend(v for v in state.values() if isinstance(v, Tensor))
    return out


def train_workload(
    key: str, label: str, device: Device, model: nn.Module, forward_loss: Callable[[], Tensor],
    optimizer: torch.optim.Optimizer, images: int, inputs: Sequence[Tensor], clip: float = 0.0,
    after_step: Callable[[], Any] | None = None, extra: Sequence[nn.Module] = (),
) -> Workload:  # fmt: skip
    """One optimizer step: forward + loss (bf16 autocast on GPU), backward, optional clipping, optimizer step.

    Nothing in it reads a value back to the host, so on GPU the step is queued without synchronising.
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def step() -> None:
        with device.autocast():
            loss = forward_loss()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip, foreach=device.cuda or None)
        optimizer.step()
        if after_step is not None:
            after_step()

    def prepare() -> None:
        optimizer.zero_grad(set_to_none=True)

    def persistent() -> list[Tensor | None]:
        mods = [model, *extra]
        tensors: list[Tensor | None] = [t for m in mods for t in (*m.parameters(), *m.buffers())]
        tensors += [p.grad for m in mods for p in m.parameters()]
        return [*tensors, *_optimizer_tensors(optimizer), *inputs]

    trainable = sum(p.numel() for p in params)
    weights = lambda: [p for m in (model, *extra) for p in m.parameters()]  # noqa: E731
    return Workload(key, label, step, images, trainable, prepare, persistent, weights, optimizer=optimizer)


def forward_workload(key: str, label: str, device: Device, model: nn.Module, inputs: Tensor, images: int) -> Workload:
    """The inference forward (eval mode, ``torch.inference_mode``)."""

    def step() -> None:
        was_training = model.training
        model.eval()
        with torch.inference_mode(), device.autocast():
            model(inputs)
        model.train(was_training)

    def persistent() -> list[Tensor | None]:
        return [*model.parameters(), *model.buffers(), inputs]

    return Workload(key, label, step, images, 0, persistent=persistent, weights=lambda: list(model.parameters()))


def gemm_workload(device: Device, size: int | None = None, reps: int = 3) -> Workload:
    """The dense matmul rate: ``reps`` products of two ``size x size`` matrices (fp32 on CPU, bf16 on GPU)."""
    size = size or (8192 if device.cuda else 2048)
    dtype = torch.bfloat16 if device.cuda else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device.torch, dtype)
    b = torch.randn(size, size, generator=gen).to(device.torch, dtype)
    out = torch.empty(size, size, device=device.torch, dtype=dtype)

    def step() -> None:
        for _ in range(reps):
            torch.mm(a, b, out=out)

    w = Workload("matmul", f"dense GEMM {size}^3 {str(dtype).replace('torch.', '')} x{reps}", step, 0)
    w.flops = 2 * size**3 * reps
    w.persistent = lambda: [a, b, out]
    return w


def with_checkpointing(base: Workload, modules: Sequence[nn.Module], key: str, label: str) -> Workload:
    """``base``'s step with activation checkpointing switched on for its duration (same model and optimizer)."""
    from tpp_monai.backbones.vit import set_activation_checkpointing

    def step() -> None:
        for m in modules:
            set_activation_checkpointing(m, True)
        try:
            base.step()
        finally:
            for m in modules:
                set_activation_checkpointing(m, False)

    return Workload(key, label, step, base.images, base.trainable, base.prepare, base.persistent, base.weights)


def _random_images(device: Device, batch: int, channels: int, size: Sequence[int], seed: int = 0) -> Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.rand(batch, channels, *size, generator=gen).to(device.torch)


@contextlib.contextmanager
def _quiet_logs():
    """Random-weight warnings of ``build_network`` are expected here; keep the bench's output readable."""
    logger = logging.getLogger("tpp_monai")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


@dataclass(frozen=True)
class VitCase:
    """A 2D setting of the bundles: the backbone, the fine-tuning image size and task, and the bundle dataset whose
    recipes (optimizer, loss) apply; TPP runs at ``pretext_size`` (the pretrain_tpp bundles' own)."""

    backbone: str = "medcoss_vit_b16"
    size: int = 224
    task: str = "cls"
    dataset: str = "mhist"
    pretext_size: int = 224

    def bundle(self, method: str) -> str:
        return f"{self.dataset}_{method}"


def _finetune_inputs(case: VitCase, batch: int, device: Device) -> tuple[Tensor, Tensor]:
    x = _random_images(device, batch, 3, (case.size, case.size))
    gen = torch.Generator().manual_seed(1)
    if case.task == "cls":
        return x, torch.randint(0, 2, (batch,), generator=gen).to(device.torch)
    return x, torch.randint(0, 2, (batch, 1, case.size, case.size), generator=gen).float().to(device.torch)


def finetune_workload(
    case: VitCase, method: str, batch: int, device: Device, key: str, label: str, backbone: str | None = None,
    peer_lora: bool = False,
) -> tuple[Workload, nn.Module]:  # fmt: skip
    """One fine-tuning step of ``case``'s bundle for ``method``: its network, loss and optimizer recipe.

    ``peer_lora``: the peer of the LoRA method, Hugging Face peft's LoRA (rank 8, alpha 8) on the fused ``attn.qkv``
    linear of a timm-layout ``backbone`` (``vit_b16``), with the same head trainable as the project's LoRA.
    """
    from tpp_monai.network import build_network

    backbone = backbone or case.backbone
    head = {"num_classes": 2} if case.task == "cls" else {"out_channels": 1}
    bundle = case.bundle(method)
    loss_fn = bundle_settings(bundle, "finetune", ("loss",))["loss"]
    r = finetune_recipe(bundle)
    net = build_network(backbone, case.task, method, backbone_ckpt="none", **head).to(device.torch).train()
    if peer_lora:
        from peft import LoraConfig, inject_adapter_in_model

        heads = {n for n, p in net.named_parameters() if p.requires_grad and ".peft_" not in f".{n}"}
        net = build_network(backbone, case.task, "full_finetune", backbone_ckpt="none", **head).to(device.torch)
        net.requires_grad_(False)
        net = inject_adapter_in_model(LoraConfig(r=8, lora_alpha=8, target_modules=["attn.qkv"]), net).train()
        for n, p in net.named_parameters():
            p.requires_grad_(p.requires_grad or n in heads)
    x, y = _finetune_inputs(case, batch, device)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = make_adamw(params, device, lr=r.lr, weight_decay=r.weight_decay)
    w = train_workload(key, label, device, net, lambda: loss_fn(net(x), y), opt, batch, [x, y], clip=r.grad_clip)
    return w, net


def tpp_mae_workload(
    case: VitCase, method: str, batch: int, device: Device, key: str, label: str, trainable_decoder: bool = False
) -> tuple[Workload, nn.Module]:
    """A TPP-MAE step of the pretrain_tpp bundle at its pretext size: a random decoder of the MedCoSS geometry (no
    checkpoint here), frozen as the inherited decoder of the classification setting, or trainable (segmentation)."""
    from tpp_monai.backbones import get_backbone_spec
    from tpp_monai.handlers import param_groups
    from tpp_monai.network import build_network
    from tpp_monai.pretext import build_pretext, pretext_loss

    s = case.pretext_size
    geometry = dict(get_backbone_spec(case.backbone).mae_decoder)
    enc = build_network(case.backbone, "features", method, backbone_ckpt="none", stage="tpp")
    net = build_pretext("mae", enc, s, mae_decoder="random", decoder=geometry).to(device.torch).train()
    net.decoder.requires_grad_(trainable_decoder)
    loss = pretext_loss("mae", net).to(device.torch)
    x = _random_images(device, batch, 3, (s, s))
    # The pretrain_tpp bundle's own MAE recipe (paper: AdamW lr 1.5e-3, wd 1.5e-2, betas (0.9, 0.95)).
    r = tpp_recipe(case.bundle(method), "mae", batch)
    opt = make_adamw(param_groups(net, r.weight_decay), device, lr=r.lr, betas=r.betas)
    return train_workload(key, label, device, net, lambda: loss(net(x), x), opt, batch, [x]), net


def tpp_dino_workload(
    case: VitCase, method: str, batch: int, device: Device, key: str = "tpp_dino", dino: dict | None = None
) -> Workload:
    """A TPP-DINO step of the pretrain_tpp bundle (its DINO settings over the library's defaults; then ``dino``)."""
    from tpp_monai.handlers import param_groups
    from tpp_monai.network import build_network
    from tpp_monai.pretext import DINO_DEFAULTS, build_pretext, pretext_loss

    bundle = case.bundle(method)
    d = dict(bundle_settings(bundle, "pretrain_tpp", ("dino",), pretext="dino")["dino"] or {})
    d = {**DINO_DEFAULTS, **d, **(dino or {})}
    enc = build_network(case.backbone, "features", method, backbone_ckpt="none", stage="tpp")
    dino = build_pretext("dino", enc, case.pretext_size, dino=d).to(device.torch).train()
    dloss = pretext_loss("dino", dino, d).to(device.torch)
    g, loc = d["global_size"], d["local_size"]
    crops = [_random_images(device, batch, 3, (g, g), seed=i) for i in range(2)]
    crops += [_random_images(device, batch, 3, (loc, loc), seed=10 + i) for i in range(d["num_local"])]
    r = tpp_recipe(bundle, "dino", batch)  # the pretrain_tpp bundle's own DINO recipe (rate scaled by the batch)
    opt = make_adamw(param_groups(dino, r.weight_decay), device, lr=r.lr, betas=r.betas)
    return train_workload(
        key, f"TPP-DINO ({2 + d['num_local']} crops)", device, dino, lambda: dloss(dino(crops)),
        opt, batch, crops, clip=r.grad_clip, after_step=lambda: dino.update_teacher(0.996), extra=[dloss],
    )  # fmt: skip


def vit_workloads(args: argparse.Namespace, device: Device) -> tuple[list[Workload], dict]:
    """Full / PEFT fine-tuning, TPP-MAE (frozen, trainable decoder), TPP-DINO, inference, checkpointing variants."""
    b, s = args.batch_size, args.image_size
    case = VitCase(args.backbone, s, "cls", "mhist", s)
    torch.manual_seed(0)
    out: list[Workload] = []
    info: dict = {}
    with _quiet_logs():
        full, full_net = finetune_workload(case, "full_finetune", b, device, "full_ft", "full fine-tuning")
        peft, peft_net = finetune_workload(case, args.method, b, device, "peft_ft", f"PEFT fine-tuning ({args.method})")
        mae_f, mae_f_net = tpp_mae_workload(
            case, args.tpp_method, b, device, "tpp_mae_frozen", "TPP-MAE, frozen decoder"
        )
        mae_u, _ = tpp_mae_workload(
            case, args.tpp_method, b, device, "tpp_mae_trainable", "TPP-MAE, trainable decoder", trainable_decoder=True
        )
        out += [full, peft, mae_f, mae_u]
        if not args.no_dino:
            out.append(tpp_dino_workload(case, args.tpp_method, b, device))
    x = _random_images(device, b, 3, (s, s))
    # The forward-rate target is about the encoder: the plain backbone's forward (what full fine-tuning deploys)
    # carries it; the PEFT model's forward is shown beside it.
    out.append(forward_workload("inference", "inference forward (backbone)", device, full_net, x, b))
    if args.method != "full_finetune":
        out.append(forward_workload("inference_peft", f"inference forward ({args.method})", device, peft_net, x, b))
    if not args.no_checkpointing:
        out.append(with_checkpointing(full, [full_net], "full_ft_ckpt", "full fine-tuning + act. checkpointing"))
        out.append(with_checkpointing(mae_f, [mae_f_net], "tpp_mae_frozen_ckpt", "TPP-MAE frozen + act. checkpointing"))
    # Analytic cross-check of the counted forward FLOPs: encoder + patch embedding + the classifier's linear.
    n = (s // full_net.patch_size) ** 2
    info["analytic_forward_flops"] = (
        vit_encoder_flops(b, n + 1, full_net.embed_dim, full_net.depth, full_net.encoder_blocks()[0].fc1.out_features)
        + patch_embed_flops(b, n, full_net.in_chans, full_net.patch_size, full_net.embed_dim)
        + 2 * b * full_net.embed_dim * full_net.num_classes
    )
    return out, info


def stunet_step_workloads(
    backbone: str,
    method: str,
    device: Device,
    batch: int,
    patch: int | Sequence[int],
    which: Sequence[str],
    suffix: str = "",
    tpp_method: str | None = None,
) -> list[Workload]:
    """STU-Net: full / PEFT (``method``) fine-tuning (deep supervision, Dice+CE), TPP-DINO of ``tpp_method``'s
    target parameters (default ``method``), inference, at ``patch``^3 (or the 3 edges ``patch``)."""
    from monai.losses import DeepSupervisionLoss, DiceCELoss

    from tpp_monai.network import build_network

    dev = device.torch
    size = (patch,) * 3 if isinstance(patch, int) else tuple(patch)
    x = _random_images(device, batch, 1, size)
    # Float labels: DeepSupervisionLoss resizes them to every head's scale (nearest), which needs floats.
    label = torch.randint(0, 3, (batch, 1, *size), generator=torch.Generator().manual_seed(1)).float().to(dev)
    seg_loss = DeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True))
    out: list[Workload] = []
    tag = f"{patch}^3" if isinstance(patch, int) else "x".join(map(str, size))
    with _quiet_logs():
        for kind in which:
            if kind in ("full_ft", "peft_ft", "inference"):
                m = "full_finetune" if kind == "full_ft" else method
                net = build_network(
                    backbone, "seg", m, num_classes=3, backbone_ckpt="none",
                    backbone_options={"deep_supervision": True},
                ).to(dev).train()  # fmt: skip
                if kind == "inference":
                    out.append(
                        forward_workload(f"inference{suffix}", f"inference forward {tag}", device, net, x, batch)
                    )
                    continue
                params = [p for p in net.parameters() if p.requires_grad]
                opt = make_adamw(params, device, lr=1e-3, weight_decay=3e-5)
                label_text = "full fine-tuning" if kind == "full_ft" else f"PEFT fine-tuning ({method})"
                out.append(
                    train_workload(
                        f"{kind}{suffix}", f"{label_text} {tag}", device, net,
                        lambda net=net: seg_loss(list(net(x)), label), opt, batch, [x, label], clip=12.0,
                    )
                )  # fmt: skip
            elif kind == "tpp_dino":
                out.append(stunet_dino_workload(backbone, tpp_method or method, device, batch, patch, suffix))
    return out


def swinunetr_full_ft_workload(backbone: str, device: Device, batch: int, patch: int) -> Workload:
    """SwinUNETR full fine-tuning (the baseline bundles' step: Dice + CE on its one output, AdamW) at ``patch``^3."""
    from monai.losses import DiceCELoss

    from tpp_monai.network import build_network

    size = (patch,) * 3
    x = _random_images(device, batch, 1, size)
    label = torch.randint(0, 3, (batch, 1, *size), generator=torch.Generator().manual_seed(1)).to(device.torch)
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    with _quiet_logs():
        net = build_network(backbone, "seg", "full_finetune", num_classes=3, backbone_ckpt="none").to(device.torch)
    opt = make_adamw([p for p in net.train().parameters() if p.requires_grad], device, lr=1e-4, weight_decay=3e-5)
    return train_workload("full_ft", f"full fine-tuning {patch}^3", device, net, lambda: loss(net(x), label), opt,
                          batch, [x, label], clip=12.0)  # fmt: skip


def stunet_dino_workload(
    backbone: str, method: str, device: Device, batch: int, patch: int, suffix: str = "", dino: dict | None = None,
    bundle: str | None = None,
) -> Workload:  # fmt: skip
    """TPP-DINO on a 3D backbone (STU-Net, SwinUNETR) through the library's DINO pretext (the 3D bundles' TPP stage):
    crops of ``patch``^3 and ``max(32, patch / 2)``^3 (2 local), or the crop sizes and count of ``dino`` (a bundle's
    ``dino`` settings); the optimizer of ``bundle`` (default ``lits_<method>``)."""
    from tpp_monai.handlers import param_groups
    from tpp_monai.network import build_network
    from tpp_monai.pretext import DINO_DEFAULTS, build_pretext, pretext_loss

    local = max(32, patch // 2)
    d = {**DINO_DEFAULTS, "global_size": patch, "local_size": local, "num_local": 2, **(dino or {})}

    def edges(size: int | Sequence[int]) -> tuple[int, ...]:
        return (size,) * 3 if isinstance(size, int) else tuple(size)

    g, loc = edges(d["global_size"]), edges(d["local_size"])
    enc = build_network(backbone, "features", method, backbone_ckpt="none", stage="tpp")
    dino_net = build_pretext("dino", enc, dino=d).to(device.torch).train()
    dloss = pretext_loss("dino", dino_net, d).to(device.torch)
    crops = [_random_images(device, batch, 1, g, seed=i) for i in range(2)]
    crops += [_random_images(device, batch, 1, loc, seed=10 + i) for i in range(d["num_local"])]
    r = tpp_recipe(bundle or f"lits_{method}", "dino", batch)  # the 3D pretrain_tpp bundle's own DINO recipe
    opt = make_adamw(param_groups(dino_net, r.weight_decay), device, lr=r.lr, betas=r.betas)
    tag = "x".join(map(str, g))
    return train_workload(
        f"tpp_dino{suffix}", f"TPP-DINO {tag} (2 global + {d['num_local']} local {'x'.join(map(str, loc))})",
        device, dino_net, lambda: dloss(dino_net(crops)), opt, batch, crops, clip=r.grad_clip,
        after_step=lambda: dino_net.update_teacher(0.996), extra=[dloss],
    )  # fmt: skip


def _family(backbone: str) -> str:
    from tpp_monai.backbones import get_backbone_spec

    return get_backbone_spec(backbone, "--backbone").family
