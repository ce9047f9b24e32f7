"""``python -m tpp_monai bench``: step time and peak memory of TPP and fine-tuning against full fine-tuning.

One process measures, on the same machine state:

* **steps**: full fine-tuning, PEFT fine-tuning (``--method``), TPP-MAE with a frozen and with a trainable decoder,
  TPP-DINO, the inference forward, and activation checkpointing's effect, timed in interleaved rounds (one step of
  every configuration per round, so background load hits all of them alike) after warm-up; medians are reported.
  A dense fp32 GEMM (bf16 on GPU) runs in every round too: the machine's matmul rate.
* **engine**: the TPP stage through the bundle's own trainer and handlers (``pretrain_tpp.json`` instantiated with
  MONAI's ``ConfigParser``) against a bare PyTorch step on the same network, optimizer and batches, run right
  after every engine iteration so that each pair sees the same machine state; the median of the pairs' ratios.
* **data**: images/s delivered by the bundle's cached, augmented loader on demo data against the TPP step's
  consumption.
* **scaling**: TPP-MAE step time at 224 and 512 (GlaS), and STU-Net's TPP step at two 3D patch sizes.

Accounting (documented here because every figure depends on it):

* FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on the real forward/step (matmuls,
  convolutions and attention; elementwise work counts zero), with PyTorch's own attention formulas registered for
  the CPU flash-attention kernels it lacks. For the ViT encoder :func:`vit_encoder_flops` gives the same number
  analytically: ``2 B depth (L (4 D^2 + 2 D M) + 2 L^2 D)`` (q/k/v/out projections, MLP, QK^T and PV; 2 FLOPs per
  multiply-add), plus ``2 B N C p^2 D`` for the patch embedding.
* Peak memory is tensor memory, the CPU counterpart of ``torch.cuda.max_memory_allocated``: the bytes of the
  configuration's own persistent tensors (parameters, buffers, optimizer state, inputs; shared storages counted
  once) plus the high-water mark of allocations minus frees during one step, read from PyTorch's allocator events
  (profiler ``profile_memory``) on CPU and from ``torch.cuda.max_memory_allocated`` on GPU. Gradients are released
  before the measured step (``zero_grad(set_to_none=True)``), so the step allocates them itself.
* Ratios are medians over medians: ``median(config) / median(full fine-tuning)``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tpp_monai.errors import ConfigError

MIB = 2**20
STUNET_SCALING = "stunet_b"


# ================================================================================================================
# Accounting: targets, ratios, FLOPs (pure functions; tests/test_bench.py checks them on toy models)
# ================================================================================================================
@dataclass(frozen=True)
class Target:
    """A performance target of the issue: ``value <op> limit``."""

    key: str
    label: str
    op: str  # "<=" or ">="
    limit: float

    def met(self, value: float | None) -> bool | None:
        if value is None or not math.isfinite(value):
            return None
        return value <= self.limit if self.op == "<=" else value >= self.limit

    def missed_by(self, value: float | None) -> float | None:
        """How far ``value`` is on the wrong side of the limit (absolute); ``None`` when met or not measured."""
        if self.met(value) in (None, True):
            return None
        return abs(value - self.limit)


TARGETS: tuple[Target, ...] = (
    Target("tpp_mae_step_ratio", "TPP-MAE step (frozen decoder) / full fine-tuning step", "<=", 0.40),
    Target("peft_step_ratio", "PEFT fine-tuning step / full fine-tuning step", "<=", 0.65),
    Target("peft_memory_ratio", "PEFT fine-tuning peak memory / full fine-tuning", "<=", 0.60),
    Target("tpp_mae_memory_ratio", "TPP-MAE peak memory (frozen decoder) / full fine-tuning", "<=", 0.40),
    Target("forward_matmul_fraction", "inference forward FLOP/s / measured matmul FLOP/s", ">=", 0.70),
    Target("engine_overhead", "MONAI engine + bundle handlers over a bare PyTorch loop", "<=", 0.05),
    Target("data_supply_ratio", "cached augmented loader images/s / TPP step images/s", ">=", 2.0),
)
TARGETS_BY_KEY = {t.key: t for t in TARGETS}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or ``None`` when either is missing or the denominator is not positive."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def overhead(engine_iteration: float, engine_epoch_extra: float, iterations: int, bare_iteration: float) -> float:
    """Relative cost of the engine per iteration: ``(t_engine + epoch_extra / n) / t_bare - 1``.

    ``engine_epoch_extra`` is what an epoch costs beyond its iterations (epoch-end handlers: checkpoint writes),
    spread over the epoch's ``iterations``.
    """
    return (engine_iteration + engine_epoch_extra / max(1, iterations)) / bare_iteration - 1.0


def evaluate_targets(values: dict[str, float | None], why: dict[str, str] | None = None) -> dict[str, dict]:
    """Every target with its value, limit, pass/fail, shortfall and (when missed or not measured) the reason."""
    why = why or {}
    out = {}
    for t in TARGETS:
        value = values.get(t.key)
        met = t.met(value)
        out[t.key] = {
            "label": t.label,
            "value": value,
            "target": f"{t.op} {t.limit:g}",
            "met": met,
            "missed_by": t.missed_by(value),
            "why": None if met else why.get(t.key, "not measured in this run"),
        }
    return out


def median(values: Iterable[float]) -> float | None:
    values = list(values)
    return statistics.median(values) if values else None


def vit_encoder_flops(batch: int, tokens: int, dim: int, depth: int, mlp_dim: int) -> int:
    """Forward FLOPs of ``depth`` pre-LN transformer blocks on ``tokens`` tokens (2 FLOPs per multiply-add).

    Per block and token: q/k/v and output projections ``4 D^2``, MLP ``2 D M`` multiply-adds; per block the attention
    products QK^T and PV ``2 L^2 D``. Norms, GELU, softmax and residual adds are not counted (as FlopCounterMode).
    """
    return 2 * batch * depth * (tokens * (4 * dim * dim + 2 * dim * mlp_dim) + 2 * tokens * tokens * dim)


def patch_embed_flops(batch: int, num_patches: int, in_chans: int, patch: int, dim: int) -> int:
    """FLOPs of the patch-embedding convolution (a ``C p^2 -> D`` projection per patch)."""
    return 2 * batch * num_patches * in_chans * patch * patch * dim


def _flop_formulas() -> dict:
    """FLOP formulas for attention kernels FlopCounterMode does not know (the CPU flash-attention kernels), taken
    from PyTorch's own formulas for the GPU kernels."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    formulas: dict = {}

    def fwd(query, key, value, *args, out_shape=None, **kwargs):
        return fc.sdpa_flop_count(query, key, value)

    def bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out, query, key, value)

    for name, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu", fwd),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", bwd),
    ):
        op = getattr(aten, name, None)
        if op is not None and op not in fc.flop_registry:
            formulas[op] = formula
    return formulas


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of ``fn()`` (forward and, if it runs one, backward) by ``torch.utils.flop_counter.FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_flop_formulas()) as counter:
        fn()
    return int(counter.get_total_flops())


def unique_bytes(tensors: Iterable[Tensor | None]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and shared tensors counted once)."""
    seen: dict[tuple, int] = {}
    for t in tensors:
        if isinstance(t, Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            seen[(t.device.type, t.device.index, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def allocation_peak(deltas: Iterable[int]) -> int:
    """High-water mark of a sequence of allocation (+) and free (-) byte counts, relative to the start."""
    current = peak = 0
    for d in deltas:
        current += d
        peak = max(peak, current)
    return peak


# ================================================================================================================
# Measurement machinery
# ================================================================================================================
class Device:
    """Device-specific timing, memory and precision settings."""

    def __init__(self, name: str) -> None:
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        self.torch = torch.device(name)
        self.cuda = self.torch.type == "cuda"
        if self.cuda and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but no CUDA device is available")
        if self.cuda:
            from tpp_monai.workflows import gpu_settings

            gpu_settings()  # the bundles' own: TF32 and cudnn.benchmark; the steps run under bf16 autocast

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.cuda:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.torch)

    def describe(self) -> dict:
        info = {"device": self.torch.type, "threads": torch.get_num_threads(), "torch": torch.__version__}
        if self.cuda:
            info["gpu"] = torch.cuda.get_device_name(self.torch)
        info["cpu"] = cpu_model()
        info["cores"] = os.cpu_count()
        info["load_at_start"] = machine_load()
        return info


def machine_load() -> dict:
    """1-minute load average and the share of time runnable tasks waited for a CPU (Linux PSI, last 10 s): other
    processes on the machine inflate every timing, so a report says how busy the machine was."""
    load: dict = {}
    with contextlib.suppress(OSError, AttributeError):
        load["loadavg_1min"] = os.getloadavg()[0]
    with contextlib.suppress(OSError, ValueError, IndexError):
        first = Path("/proc/pressure/cpu").read_text().split()
        load["cpu_pressure_10s"] = float(first[1].split("=")[1])
    return load


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


QUIET_STALL = 0.10  # a step is "quiet" when other processes kept runnable tasks waiting < 10 % of its wall time


class CpuPressure:
    """Linux pressure-stall information (``/proc/pressure/cpu``, machine-wide): cumulative time during which some
    runnable task waited for a CPU. Other processes on a shared machine make the bench's threads wait, and with
    OpenMP every parallel region then waits for its slowest thread, so a contended step can take several times
    longer; the stall time during a step says whether it ran undisturbed."""

    def __init__(self, path: str = "/proc/pressure/cpu") -> None:
        self.path = Path(path)
        self.available = self.total() is not None

    def total(self) -> float | None:
        """Seconds of "some" CPU stall since boot, or ``None`` where PSI is not available."""
        try:
            first = self.path.read_text().split("\n", 1)[0].split()
            return int(first[4].split("=")[1]) / 1e6
        except (OSError, IndexError, ValueError):
            return None

    def wait_quiet(self, timeout: float, probe: float = 0.25) -> float:
        """Sleep until a ``probe``-long window shows (almost) no stall, at most ``timeout`` seconds; returns the
        seconds waited. Cheap insurance: a step started into a burst of other work is a wasted sample."""
        if not self.available or timeout <= 0:
            return 0.0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            before = self.total() or 0.0
            time.sleep(probe)
            if (self.total() or 0.0) - before <= 0.02 * probe:
                break
        return time.perf_counter() - t0


PRESSURE = CpuPressure()


@dataclass
class Sample:
    """One timed call: wall seconds, process CPU seconds, and machine-wide CPU stall seconds during it."""

    wall: float
    cpu: float
    stall: float | None = None

    @property
    def quiet(self) -> bool:
        return self.stall is None or self.stall <= QUIET_STALL * self.wall


def quiet_median(samples: Sequence[Sample], minimum: int = 1) -> tuple[float | None, bool]:
    """Median wall time over the quiet samples when at least ``minimum`` are quiet, else over all samples;
    and whether the quiet ones were used."""
    quiet = [s.wall for s in samples if s.quiet]
    if len(quiet) >= max(1, minimum):
        return median(quiet), True
    return median(s.wall for s in samples), False


class RoundTimer:
    """Times callables into :class:`Sample` lists; on GPU the wall time comes from CUDA events resolved after the
    round, so no step waits for the device."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.pending: list[tuple[list[Sample], Any, Any, Sample]] = []

    def time(self, fn: Callable[[], Any], into: list[Sample]) -> None:
        p0, c0 = PRESSURE.total(), time.process_time()
        if self.device.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()  # after the step, so the host-side CPU and stall readings cover it
            sample = Sample(0.0, time.process_time() - c0, _delta(p0, PRESSURE.total()))
            self.pending.append((into, start, end, sample))
        else:
            t0 = time.perf_counter()
            fn()
            wall = time.perf_counter() - t0
            into.append(Sample(wall, time.process_time() - c0, _delta(p0, PRESSURE.total())))

    def flush(self) -> None:
        self.device.sync()
        for into, start, end, sample in self.pending:
            sample.wall = start.elapsed_time(end) / 1000.0
            into.append(sample)
        self.pending.clear()


def _delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def measure_peak_memory(
    device: Device, run: Callable[[], Any], persistent: Callable[[], Iterable[Tensor | None]]
) -> tuple[int, int]:
    """``(persistent, peak)`` tensor bytes of one call of ``run``: the persistent tensors, and those plus the step's
    allocation high-water mark."""
    device.sync()
    base = unique_bytes(persistent())
    if device.cuda:
        torch.cuda.reset_peak_memory_stats(device.torch)
        before = torch.cuda.memory_allocated(device.torch)
        run()
        device.sync()
        return base, base + torch.cuda.max_memory_allocated(device.torch) - before
    from torch.profiler import ProfilerActivity, profile

    # Allocation events only: no shapes or stacks are recorded, so the profiler allocates little of its own.
    with _quiet_fd(2), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events = [e for e in events if e.device_type() == torch.device("cpu").type or str(e.device_type()).endswith("CPU")]
    events.sort(key=lambda e: e.start_ns())
    return base, base + allocation_peak(e.nbytes() for e in events)


@contextlib.contextmanager
def _quiet_fd(fd: int):
    """Silence a file descriptor (the profiler's native library prints start/stop lines to it)."""
    try:
        saved = os.dup(fd)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            sys.stderr.flush()
            os.dup2(null.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def count_host_syncs(device: Device, run: Callable[[], Any]) -> int | None:
    """Host-device synchronisations during ``run`` (CUDA's sync debug mode; ``None`` on CPU). A training step
    that waits for the device stops the host from queueing the next kernels."""
    if not device.cuda:
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def make_adamw(params: Any, device: Device, **kwargs: Any) -> torch.optim.Optimizer:
    """AdamW with the fused kernel where PyTorch has one for the device (CPU and CUDA in PyTorch >= 2.4), else
    the multi-tensor one: one pass over the trainable tensors instead of a Python loop per tensor."""
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(params, foreach=device.cuda, **kwargs)


# ================================================================================================================
# Workloads
# ================================================================================================================
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
    return Workload(key, label, step, images, trainable, prepare, persistent, weights)


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


# ----- ViT (MedCoSS) -------------------------------------------------------------------------------------------
def vit_workloads(args: argparse.Namespace, device: Device) -> tuple[list[Workload], dict]:
    """Full / PEFT fine-tuning, TPP-MAE (frozen, trainable decoder), TPP-DINO, inference, checkpointing variants."""
    from tpp_monai.backbones import get_backbone_spec
    from tpp_monai.handlers import param_groups
    from tpp_monai.network import build_network
    from tpp_monai.pretext import DINO_DEFAULTS, build_pretext, pretext_loss

    b, s = args.batch_size, args.image_size
    dev = device.torch
    torch.manual_seed(0)
    x = _random_images(device, b, 3, (s, s))
    y = torch.randint(0, 2, (b,), generator=torch.Generator().manual_seed(1)).to(dev)
    ce = nn.CrossEntropyLoss()
    geometry = dict(get_backbone_spec(args.backbone).mae_decoder)
    out: list[Workload] = []
    info: dict = {}

    def finetune(method: str, key: str, label: str) -> tuple[Workload, nn.Module]:
        net = build_network(args.backbone, "cls", method, num_classes=2, backbone_ckpt="none").to(dev).train()
        params = [p for p in net.parameters() if p.requires_grad]
        # The fine-tuning recipe (MedCoSS, the finetune bundles): AdamW, weight decay 1e-4, gradient clipping 12.
        opt = make_adamw(params, device, lr=1e-4, weight_decay=1e-4)
        w = train_workload(key, label, device, net, lambda: ce(net(x), y), opt, b, [x, y], clip=12.0)
        return w, net

    with _quiet_logs():
        full, full_net = finetune("full_finetune", "full_ft", "full fine-tuning")
        peft, peft_net = finetune(args.method, "peft_ft", f"PEFT fine-tuning ({args.method})")
        out += [full, peft]

        def mae(mode: str, key: str, label: str) -> tuple[Workload, nn.Module]:
            enc = build_network(args.backbone, "features", args.tpp_method, backbone_ckpt="none", stage="tpp")
            # No checkpoint here: a random decoder of the MedCoSS geometry, frozen to model the inherited frozen
            # decoder of the classification setting, trainable for the segmentation setting.
            net = build_pretext("mae", enc, s, mae_decoder="random", decoder=geometry).to(dev).train()
            net.decoder.requires_grad_(mode == "update")
            loss = pretext_loss("mae", net).to(dev)
            # The TPP recipe (pretrain_tpp bundles): AdamW lr 1.5e-3, wd 1.5e-2, betas (0.9, 0.95), no clipping.
            opt = make_adamw(param_groups(net, 1.5e-2), device, lr=1.5e-3, betas=(0.9, 0.95))
            return train_workload(key, label, device, net, lambda: loss(net(x), x), opt, b, [x]), net

        mae_f, mae_f_net = mae("freeze", "tpp_mae_frozen", "TPP-MAE, frozen decoder")
        mae_u, _ = mae("update", "tpp_mae_trainable", "TPP-MAE, trainable decoder")
        out += [mae_f, mae_u]

        if not args.no_dino:
            d = dict(DINO_DEFAULTS)
            enc = build_network(args.backbone, "features", args.tpp_method, backbone_ckpt="none", stage="tpp")
            dino = build_pretext("dino", enc, s, dino=d).to(dev).train()
            dloss = pretext_loss("dino", dino, d).to(dev)
            crops = [_random_images(device, b, 3, (s, s), seed=i) for i in range(2)]
            crops += [_random_images(device, b, 3, (d["local_size"],) * 2, seed=10 + i) for i in range(d["num_local"])]
            opt = make_adamw(param_groups(dino, 0.04), device, lr=5e-4 * b / 256)
            w = train_workload(
                "tpp_dino", f"TPP-DINO ({2 + d['num_local']} crops)", device, dino, lambda: dloss(dino(crops)),
                opt, b, crops, clip=d["clip_grad"], after_step=lambda: dino.update_teacher(0.996), extra=[dloss],
            )  # fmt: skip
            out.append(w)

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


# ----- STU-Net ---------------------------------------------------------------------------------------------------
def stunet_step_workloads(
    backbone: str,
    method: str,
    device: Device,
    batch: int,
    patch: int,
    which: Sequence[str],
    suffix: str = "",
    tpp_method: str | None = None,
) -> list[Workload]:
    """STU-Net: full / PEFT (``method``) fine-tuning (deep supervision, Dice+CE), TPP-DINO of ``tpp_method``'s
    target parameters (default ``method``), inference, at ``patch``^3."""
    from monai.losses import DeepSupervisionLoss, DiceCELoss

    from tpp_monai.network import build_network

    dev = device.torch
    size = (patch, patch, patch)
    x = _random_images(device, batch, 1, size)
    # Float labels: DeepSupervisionLoss resizes them to every head's scale (nearest), which needs floats.
    label = torch.randint(0, 3, (batch, 1, *size), generator=torch.Generator().manual_seed(1)).float().to(dev)
    seg_loss = DeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True))
    out: list[Workload] = []
    tag = f"{patch}^3"
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


def stunet_dino_workload(
    backbone: str, method: str, device: Device, batch: int, patch: int, suffix: str = ""
) -> Workload:
    """TPP-DINO on STU-Net through the library's DINO pretext (the 3D bundles' TPP stage)."""
    from tpp_monai.handlers import param_groups
    from tpp_monai.network import build_network
    from tpp_monai.pretext import DINO_DEFAULTS, build_pretext, pretext_loss

    local = max(32, patch // 2)
    d = {**DINO_DEFAULTS, "global_size": patch, "local_size": local, "num_local": 2}
    enc = build_network(backbone, "features", method, backbone_ckpt="none", stage="tpp")
    dino = build_pretext("dino", enc, patch, dino=d).to(device.torch).train()
    dloss = pretext_loss("dino", dino, d).to(device.torch)
    crops = [_random_images(device, batch, 1, (patch,) * 3, seed=i) for i in range(2)]
    crops += [_random_images(device, batch, 1, (local,) * 3, seed=10 + i) for i in range(2)]
    opt = make_adamw(param_groups(dino, 0.04), device, lr=5e-4 * batch / 256)
    return train_workload(
        f"tpp_dino{suffix}", f"TPP-DINO {patch}^3 (2 global + 2 local {local}^3)", device, dino,
        lambda: dloss(dino(crops)), opt, batch, crops, clip=d["clip_grad"],
        after_step=lambda: dino.update_teacher(0.996), extra=[dloss],
    )  # fmt: skip


# ================================================================================================================
# Sections
# ================================================================================================================
def run_rounds(
    workloads: Sequence[Workload], device: Device, warmup: int, steps: int, log: Callable,
    max_rounds: int | None = None, budget_s: float | None = None, wait_s: float = 0.0,
) -> None:  # fmt: skip
    """Warm-up rounds, then timed rounds (one step of every workload still short of samples, in turn) until each
    workload has ``steps`` quiet samples, ``max_rounds`` rounds ran or ``budget_s`` seconds passed.

    On a dedicated machine (or without PSI) every sample is quiet and this is exactly ``steps`` rounds.
    """
    timer = RoundTimer(device)
    for w in workloads:
        w.min_quiet = min(steps, 3)
    for r in range(warmup):
        t0 = time.perf_counter()
        for w in workloads:
            w.run()
        timer.flush()
        log(f"warm-up round {r + 1}/{warmup}: {time.perf_counter() - t0:.1f} s")
    max_rounds = max(steps, max_rounds or steps)
    start = time.perf_counter()
    for r in range(max_rounds):
        need = [w for w in workloads if w.quiet_count < steps] if r >= steps else list(workloads)
        if not need or (r >= steps and budget_s is not None and time.perf_counter() - start > budget_s):
            break
        t0, waited = time.perf_counter(), 0.0
        for w in need:
            waited += PRESSURE.wait_quiet(wait_s)
            timer.time(w.run, w.samples)
        timer.flush()
        quiet = min(w.quiet_count for w in workloads)
        log(f"round {r + 1}: {len(need)} steps, {time.perf_counter() - t0:.1f} s (waited {waited:.1f} s for a "
            f"quiet machine); fewest quiet samples {quiet}/{steps}")  # fmt: skip


def account(workloads: Sequence[Workload], device: Device, log: Callable) -> None:
    """Peak memory (one instrumented step) and FLOPs (one counted step) of every workload."""
    for w in workloads:
        if w.key == "matmul":
            w.peak_bytes = w.persistent_bytes = unique_bytes(w.persistent())
            continue
        w.prepare()
        flops: list[int] = []
        # One step for both: FlopCounterMode only counts, it allocates no tensors of its own.
        w.persistent_bytes, w.peak_bytes = measure_peak_memory(
            device, lambda w=w, flops=flops: flops.append(count_flops(w.step)), w.persistent
        )
        w.flops = w.flops if w.flops is not None else flops[0]
        w.prepare()
        w.host_syncs = count_host_syncs(device, w.step)
        log(f"accounted {w.key}: {w.peak_bytes / MIB:.0f} MiB, {w.flops / 1e9:.1f} GFLOP")


def section_steps(args: argparse.Namespace, device: Device, log: Callable) -> dict:
    family = _family(args.backbone)
    if family == "stunet":
        which = ["full_ft", "peft_ft", "tpp_dino", "inference"]
        workloads = stunet_step_workloads(
            args.backbone, args.method, device, args.batch_size, args.patch_size, which, tpp_method=args.tpp_method
        )
        info: dict = {}
    else:
        workloads, info = vit_workloads(args, device)
    gemm = gemm_workload(device)
    workloads = [gemm, *workloads]
    log(f"steps: {', '.join(w.key for w in workloads)}")
    run_rounds(workloads, device, args.warmup, args.steps, log, args.max_rounds, args.budget, args.wait_quiet)
    account(workloads, device, log)
    rate = gemm.flops / gemm.seconds
    by_key = {w.key: w for w in workloads}
    configs = {w.key: w.summary(rate) for w in workloads if w.key != "matmul"}
    full = by_key["full_ft"]

    def step_ratio(key: str) -> float | None:
        return ratio(by_key[key].seconds, full.seconds) if key in by_key else None

    def mem_ratio(key: str) -> float | None:
        return ratio(by_key[key].peak_bytes, full.peak_bytes) if key in by_key else None

    result = {
        "matmul": {"label": gemm.label, "gflop_per_s": rate / 1e9, **gemm.summary(None)},
        "configs": configs,
        "ratios": {
            "peft_step_ratio": step_ratio("peft_ft"),
            "peft_memory_ratio": mem_ratio("peft_ft"),
            "tpp_mae_step_ratio": step_ratio("tpp_mae_frozen"),
            "tpp_mae_memory_ratio": mem_ratio("tpp_mae_frozen"),
            "tpp_mae_trainable_step_ratio": step_ratio("tpp_mae_trainable"),
            "tpp_mae_trainable_memory_ratio": mem_ratio("tpp_mae_trainable"),
            "tpp_dino_step_ratio": step_ratio("tpp_dino"),
            "tpp_dino_memory_ratio": mem_ratio("tpp_dino"),
            "forward_matmul_fraction": configs["inference"]["matmul_fraction"] if "inference" in configs else None,
        },
        "checkpointing": {},
        "info": info,
    }
    for base, ck in (("full_ft", "full_ft_ckpt"), ("tpp_mae_frozen", "tpp_mae_frozen_ckpt")):
        if ck in by_key:
            result["checkpointing"][base] = {
                "step_ratio": ratio(by_key[ck].seconds, by_key[base].seconds),
                "memory_ratio": ratio(by_key[ck].peak_bytes, by_key[base].peak_bytes),
                "vs_full_ft_step": step_ratio(ck),
                "vs_full_ft_memory": mem_ratio(ck),
            }
    if "analytic_forward_flops" in info and "inference" in by_key:
        info["counted_forward_flops"] = by_key["inference"].flops
    return result


# ----- engine -----------------------------------------------------------------------------------------------------
def _bundle_for(args: argparse.Namespace) -> Path:
    from tpp_monai.workflows import REPO_BUNDLES

    dataset = "lits" if _family(args.backbone) == "stunet" else "mhist"
    method = args.tpp_method
    path = REPO_BUNDLES / f"{dataset}_{method}" / "configs" / "pretrain_tpp.json"
    if not path.is_file():
        raise ConfigError(f"no bundle config {path} to measure the engine with; pass --method with a TPP bundle")
    return path


def section_engine(args: argparse.Namespace, device: Device, log: Callable) -> dict:
    """The bundle's TPP-stage trainer (its handlers: schedules, pretext handlers, target-state and checkpoint
    savers, progress bar, stats) against a bare loop over the same network, optimizer, loss and batches."""
    from monai.bundle import ConfigParser
    from monai.data import DataLoader
    from monai.engines.utils import IterationEvents  # noqa: F401  (registers MONAI's events with ignite)

    if _family(args.backbone) == "stunet":
        return {"skipped": "engine overhead is measured on the 2D TPP-MAE bundle"}
    from ignite.engine import Events

    from tpp_monai.pretext import PretextBatch

    path = _bundle_for(args)
    b, s, n = args.batch_size, args.image_size, args.engine_iters
    gen = torch.Generator().manual_seed(0)
    samples = [{"image": torch.rand(3, s, s, generator=gen)} for _ in range(b * n)]
    loader = DataLoader(samples, batch_size=b, shuffle=False, num_workers=0)
    with tempfile.TemporaryDirectory(prefix="tpp_bench_") as tmp, _quiet_logs():
        parser = ConfigParser()
        parser.read_config(str(path))
        parser.update(
            {
                "bundle_root": tmp, "dataset_dir": tmp, "output_dir": f"{tmp}/out", "runs_dir": f"{tmp}/runs",
                "backbone": args.backbone, "backbone_ckpt": "none", "device": f"$torch.device('{device.torch}')",
                "amp": device.cuda, "num_workers": 0, "epochs": 1, "batch_size": b, "pretext": "mae",
                "pretext_size": s, "image_size": [s, s], "mae_decoder": "random",
            }
        )  # fmt: skip
        parser["train#dataloader"] = loader
        net = parser.get_parsed_content("pretext_net")
        net.decoder.requires_grad_(False)  # the frozen-decoder setting, as the steps section
        trainer = parser.get_parsed_content("train#trainer")
        network, loss_fn = parser.get_parsed_content("network"), parser.get_parsed_content("loss")
        optimizer = parser.get_parsed_content("optimizer")
        prepare = PretextBatch("mae")

        def bare_batches() -> Iterable:
            while True:
                yield from loader

        bare_feed = bare_batches()

        def bare_step() -> None:
            images, target = prepare(next(bare_feed), device.torch)
            optimizer.zero_grad(set_to_none=True)
            with device.autocast():
                loss = loss_fn(network(images), target)
            loss.backward()
            optimizer.step()

        # One bare step right after every engine iteration (on the loader's next batch): the two alternate within
        # a second, so other load on the machine hits both sides of each pair alike, and the median over the pairs'
        # ratios is robust where medians over separate epochs are not (a burst lasts several seconds).
        pairs: list[tuple[float, float]] = []  # (engine iteration, bare step) seconds
        clock = [0.0]

        def start(_: object = None) -> None:
            device.sync()
            clock[0] = time.perf_counter()

        def interleave(_: object = None) -> None:
            device.sync()
            t_engine = time.perf_counter() - clock[0]
            t0 = time.perf_counter()
            bare_step()
            device.sync()
            clock[0] = time.perf_counter()
            pairs.append((t_engine, clock[0] - t0))

        trainer.add_event_handler(Events.EPOCH_STARTED, start)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, interleave)  # after the bundle's own handlers

        def epoch() -> float:
            """Seconds of the epoch outside its iterations and bare steps (epoch-end handlers: checkpoint writes)."""
            done = len(pairs)
            PRESSURE.wait_quiet(args.wait_quiet)
            t0 = time.perf_counter()
            with contextlib.redirect_stderr(io.StringIO()):  # the progress bar still renders, out of sight
                trainer.run()
            device.sync()
            return time.perf_counter() - t0 - sum(e + b2 for e, b2 in pairs[done:])

        epoch()  # warm-up (first-iteration allocations, optimizer state, first checkpoint files)
        pairs.clear()
        extras = []
        for r in range(args.engine_reps):
            extras.append(epoch())
            log(f"engine epoch {r + 1}/{args.engine_reps}: {len(pairs)} engine/bare pairs")
    t_bare = median(b2 for _, b2 in pairs)
    per_pair = [e / b2 for e, b2 in pairs]
    return {
        "bundle": str(path.relative_to(path.parents[2])),
        "trainer": type(trainer).__name__,
        "handlers": [type(h).__name__ for h in parser.get_parsed_content("train#handlers")],
        "iterations_per_epoch": n,
        "pairs": len(pairs),
        "engine_iteration_s": median(e for e, _ in pairs),
        "bare_iteration_s": t_bare,
        "pair_ratio_quartiles": [round(x, 4) for x in statistics.quantiles(per_pair, n=4)],
        "engine_epoch_extra_s": median(extras),
        "engine_overhead": overhead(median(per_pair), median(extras) / t_bare, n, 1.0),
    }


# ----- data -----------------------------------------------------------------------------------------------------
def section_data(args: argparse.Namespace, device: Device, log: Callable) -> dict:
    """Images/s of the bundle's TPP-stage loader (CacheDataset of the deterministic transforms, random views in
    DataLoader workers set from the CPU count) on the demo dataset, timed alone after a warm-up epoch."""
    from monai.data import CacheDataset, DataLoader

    from tpp_monai.pretext import pretext_transforms
    from tpp_monai.workflows import cpu_workers, demo_dataset, images_of

    if _family(args.backbone) == "stunet":
        return {"skipped": "the 3D data pipeline is not part of this bench"}
    dataset, s, b = args.dataset, args.image_size, args.batch_size
    workers = cpu_workers()
    with tempfile.TemporaryDirectory(prefix="tpp_bench_data_") as tmp, _quiet_logs():
        root = Path(demo_dataset(dataset, tmp))
        records = images_of(str(root / "datalist.json"), str(root), "training")
        transform = pretext_transforms("mae", dataset, s, [s, s])
        t0 = time.perf_counter()
        ds = CacheDataset(records, transform, cache_rate=1.0, num_workers=workers, progress=False)
        cache_s = time.perf_counter() - t0
        loader = DataLoader(
            ds, batch_size=b, shuffle=True, drop_last=len(ds) > b, num_workers=workers,
            persistent_workers=workers > 0, pin_memory=device.cuda,
        )  # fmt: skip
        for _ in loader:  # warm-up epoch: starts the workers
            pass
        images, t0 = 0, time.perf_counter()
        while images < args.data_images or time.perf_counter() - t0 < args.data_seconds:
            for batch in loader:
                images += int(batch["image"].shape[0])
        elapsed = time.perf_counter() - t0
        del loader
    log(f"data: {images} images in {elapsed:.1f} s")
    return {
        "dataset": f"{dataset} (demo, {len(records)} training images)",
        "transforms": f"pretext_transforms('mae', {dataset!r}, {s})",
        "workers": workers,
        "cache_s": cache_s,
        "images": images,
        "seconds": elapsed,
        "images_per_s": images / elapsed,
    }


# ----- scaling --------------------------------------------------------------------------------------------------
def section_scaling(args: argparse.Namespace, device: Device, log: Callable, steps_result: dict | None) -> dict:
    """TPP-MAE (trainable decoder, the GlaS setting) at the bench size and ``--scaling-size``; STU-Net's TPP step
    at two patch sizes."""
    from tpp_monai.backbones import get_backbone_spec
    from tpp_monai.handlers import param_groups
    from tpp_monai.network import build_network
    from tpp_monai.pretext import build_pretext, pretext_loss

    out: dict = {"tpp_mae": {}, "stunet": {}}
    if _family(args.backbone) != "stunet":
        geometry = dict(get_backbone_spec(args.backbone).mae_decoder)
        for size in (args.image_size, args.scaling_size):
            with _quiet_logs():
                enc = build_network(args.backbone, "features", args.tpp_method, backbone_ckpt="none", stage="tpp")
                net = build_pretext("mae", enc, size, mae_decoder="random", decoder=geometry)
                net = net.to(device.torch).train()
            loss = pretext_loss("mae", net)
            x = _random_images(device, args.batch_size, 3, (size, size))
            opt = make_adamw(param_groups(net, 1.5e-2), device, lr=1.5e-3, betas=(0.9, 0.95))
            w = train_workload(
                f"mae_{size}", f"TPP-MAE {size}", device, net, lambda net=net, loss=loss, x=x: loss(net(x), x), opt,
                args.batch_size, [x],
            )  # fmt: skip
            run_rounds([w], device, 1, args.scaling_steps, log, 2 * args.scaling_steps, None, args.wait_quiet)
            out["tpp_mae"][str(size)] = {
                "step_s": w.seconds, "images_per_s": args.batch_size / w.seconds, "quiet_steps": w.quiet_count,
                "step_s_all": [round(x.wall, 4) for x in w.samples],
            }  # fmt: skip
            log(f"scaling: TPP-MAE {size}: {w.seconds:.2f} s")
            del w, net, enc, opt
    backbone = args.backbone if _family(args.backbone) == "stunet" else args.stunet_backbone
    method = args.tpp_method if _family(args.backbone) == "stunet" else "conv_adapter"
    for patch in args.scaling_patches:
        w = stunet_dino_workload(backbone, method, device, 1, patch, suffix=f"_{patch}")
        run_rounds([w], device, 1, args.scaling_steps, log, 2 * args.scaling_steps, None, args.wait_quiet)
        out["stunet"][str(patch)] = {
            "backbone": backbone, "label": w.label, "step_s": w.seconds, "quiet_steps": w.quiet_count,
            "step_s_all": [round(x.wall, 4) for x in w.samples],
        }  # fmt: skip
        log(f"scaling: {backbone} {w.label}: {w.seconds:.2f} s")
        del w
    return out


# ================================================================================================================
# Report
# ================================================================================================================
def _family(backbone: str) -> str:
    from tpp_monai.backbones import get_backbone_spec

    return get_backbone_spec(backbone, "--backbone").family


def explain(result: dict) -> dict[str, str]:
    """Why each target stands where it does, from the run's own figures (shown when a target is missed)."""
    why: dict[str, str] = {}
    steps = result.get("steps") or {}
    configs = steps.get("configs", {})
    full = configs.get("full_ft", {})

    def step_why(key: str, context: str, target: str) -> str | None:
        c = configs.get(key, {})
        if c.get("gflop_per_step") and full.get("gflop_per_step") and c.get("gflop_per_s"):
            flop_ratio = c["gflop_per_step"] / full["gflop_per_step"]
            limit = TARGETS_BY_KEY[target].limit
            bound = (
                f"; the FLOP ratio alone is above the {limit:g} target, so no kernel speed-up can meet it"
                if flop_ratio > limit
                else f"; at full fine-tuning's GFLOP/s the ratio would be {flop_ratio:.2f}"
            )
            return (
                f"{context}: {c['gflop_per_step']:.0f} vs {full['gflop_per_step']:.0f} GFLOP per step "
                f"(x{flop_ratio:.2f}), run at {c['gflop_per_s']:.0f} vs {full['gflop_per_s']:.0f} GFLOP/s{bound}"
            )
        return None

    def memory_why(key: str, context: str) -> str | None:
        c = configs.get(key, {})
        if not (c.get("peak_mib") and full.get("peak_mib") and c.get("persistent_mib") is not None):
            return None
        return (
            f"{context}: peak {c['peak_mib']:.0f} MiB = {c['persistent_mib']:.0f} MiB persistent (of which "
            f"{c['weights_mib']:.0f} MiB fp32 weights, {c['weights_mib'] / full['peak_mib']:.2f} x the full "
            f"fine-tuning peak on their own) + {c['peak_mib'] - c['persistent_mib']:.0f} MiB held during the step "
            f"(activations kept for the backward pass); full fine-tuning: {full['persistent_mib']:.0f} MiB persistent "
            f"(weights + AdamW moments) + {full['peak_mib'] - full['persistent_mib']:.0f} MiB (gradients, activations)"
        )

    texts = {
        "tpp_mae_step_ratio": step_why(
            "tpp_mae_frozen", "the backward pass runs through the whole frozen MAE decoder (8 blocks on all patches)"
            " to reach the encoder's target parameters, and the encoder's matrices (25 % of the tokens) are small",
            "tpp_mae_step_ratio",
        ),
        "peft_step_ratio": step_why(
            "peft_ft", "the backward pass still carries input gradients through every frozen block down to the "
            "first block's targets; only the frozen weights' gradients are saved", "peft_step_ratio",
        ),
        "tpp_mae_memory_ratio": memory_why("tpp_mae_frozen", "the frozen encoder and MAE decoder must stay resident"),
        "peft_memory_ratio": memory_why("peft_ft", "the frozen backbone must stay resident"),
    }  # fmt: skip
    why.update({k: v for k, v in texts.items() if v})
    ck = (steps.get("checkpointing") or {}).get("tpp_mae_frozen")
    if ck and "tpp_mae_memory_ratio" in why:
        why["tpp_mae_memory_ratio"] += (
            f". With activation checkpointing TPP-MAE needs {_fmt(ck['vs_full_ft_memory'])} x the full fine-tuning "
            f"memory, at {_fmt(ck['vs_full_ft_step'])} x its step time"
        )
    inf = configs.get("inference", {})
    if inf.get("matmul_fraction") is not None:
        why["forward_matmul_fraction"] = (
            f"{inf['gflop_per_s']:.0f} GFLOP/s against {steps['matmul']['gflop_per_s']:.0f}: the forward's GEMMs "
            "are smaller than the rate benchmark's, and LayerNorm, GELU, softmax and copies count no FLOPs but "
            "take time"
        )
    eng = result.get("engine") or {}
    if eng.get("engine_overhead") is not None:
        why["engine_overhead"] = (
            f"per iteration {eng['engine_iteration_s'] * 1e3:.0f} ms (engine) vs {eng['bare_iteration_s'] * 1e3:.0f}"
            f" ms (bare); epoch-end handlers (target-state and checkpoint writes) {eng['engine_epoch_extra_s']:.2f} s"
            f" spread over {eng['iterations_per_epoch']} iterations; engine/bare ratio quartiles over "
            f"{eng['pairs']} interleaved pairs: " + " / ".join(f"{x:.3f}" for x in eng["pair_ratio_quartiles"])
        )
    data = result.get("data") or {}
    if data.get("images_per_s"):
        why["data_supply_ratio"] = (
            f"{data['images_per_s']:.1f} images/s from {data['workers']} worker(s); the random views (resized crop "
            "and flip) run per image in the workers"
        )
    return why


def collect_ratios(result: dict) -> dict[str, float | None]:
    steps = result.get("steps") or {}
    ratios = dict(steps.get("ratios", {}))
    eng = result.get("engine") or {}
    ratios["engine_overhead"] = eng.get("engine_overhead")
    data = result.get("data") or {}
    tpp_key = "tpp_mae_frozen" if "tpp_mae_frozen" in steps.get("configs", {}) else "tpp_dino"
    consume = steps.get("configs", {}).get(tpp_key, {}).get("images_per_s")
    ratios["data_supply_ratio"] = ratio(data.get("images_per_s"), consume)
    return ratios


def _fmt(value: float | None, spec: str = ".2f", unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def format_report(result: dict) -> str:
    """The human-readable report (the JSON holds the same figures)."""
    lines: list[str] = []
    m = result["machine"]
    cfg = result["config"]
    lines.append(
        f"tpp-monai bench: {cfg['backbone']}, method {cfg['method']}, "
        + (f"{cfg['patch_size']}^3" if cfg["family"] == "stunet" else f"{cfg['image_size']}x{cfg['image_size']}")
        + f", batch {cfg['batch_size']}, {cfg['steps']} timed rounds after {cfg['warmup']} warm-up"
    )
    hw = m.get("gpu") or f"{m['cpu']}, {m['cores']} cores"
    lines.append(
        f"machine: {hw}; {m['device']}, {m['threads']} threads, torch {m['torch']}, wall {result['wall_s']:.0f} s"
    )
    loads = [m.get("load_at_start") or {}, m.get("load_at_end") or {}]
    if any(loads):
        lines.append(
            "machine load (start / end): load average "
            + " / ".join(_fmt(x.get("loadavg_1min")) for x in loads)
            + ", CPU pressure "
            + " / ".join(_fmt(x.get("cpu_pressure_10s"), ".0f", " %") for x in loads)
        )
    steps = result.get("steps")
    if steps:
        mm = steps["matmul"]
        lines.append(
            f"matmul rate: {mm['gflop_per_s']:.1f} GFLOP/s ({mm['label']}, median of {mm.get('quiet_steps', '-')} "
            f"quiet of {mm.get('steps', '-')} rounds)"
        )
        lines.append(
            f"step times: medians over quiet steps (machine-wide CPU stall < {QUIET_STALL:.0%} of the step, Linux "
            "PSI; 'quiet' column), over all steps where fewer than 3 were quiet"
        )
        lines.append("")
        head = f"{'configuration':<40} {'step ms':>9} {'quiet':>5} {'img/s':>7} {'peak MiB':>9} {'GFLOP':>7} "
        head += f"{'GFLOP/s':>8} {'of GEMM':>7} {'trainable':>11}"
        lines.append(head)
        lines.append("-" * len(head))
        for c in steps["configs"].values():
            lines.append(
                f"{c['label']:<40} {_fmt(c['step_s'] and c['step_s'] * 1e3, '.0f'):>9} "
                f"{c.get('quiet_steps', '-')}/{c.get('steps', '-'):<3} "
                f"{_fmt(c['images_per_s'], '.2f'):>7} {_fmt(c['peak_mib'], '.0f'):>9} "
                f"{_fmt(c['gflop_per_step'], '.1f'):>7} {_fmt(c['gflop_per_s'], '.1f'):>8} "
                f"{_fmt(c['matmul_fraction'] and 100 * c['matmul_fraction'], '.0f', ' %'):>7} {c['trainable']:>11,}"
            )
        r = steps["ratios"]
        lines.append("")
        lines.append(
            "vs full fine-tuning (step / memory): "
            + ", ".join(
                f"{name} {_fmt(r.get(f'{k}_step_ratio'))} / {_fmt(r.get(f'{k}_memory_ratio'))}"
                for name, k in (("PEFT", "peft"), ("TPP-MAE frozen", "tpp_mae"), ("TPP-MAE trainable",
                                "tpp_mae_trainable"), ("TPP-DINO", "tpp_dino"))
                if r.get(f"{k}_step_ratio") is not None
            )
        )  # fmt: skip
        for base, c in steps.get("checkpointing", {}).items():
            lines.append(
                f"activation checkpointing on {base}: step x{_fmt(c['step_ratio'])}, peak memory "
                f"x{_fmt(c['memory_ratio'])} (vs full fine-tuning: step {_fmt(c['vs_full_ft_step'])}, "
                f"memory {_fmt(c['vs_full_ft_memory'])})"
            )
        syncs = {c["label"]: c["host_syncs"] for c in steps["configs"].values() if c.get("host_syncs") is not None}
        if syncs:
            lines.append(
                "host-device synchronisations inside one step: " + ", ".join(f"{k} {v}" for k, v in syncs.items())
            )
        info = steps.get("info", {})
        if info.get("counted_forward_flops"):
            lines.append(
                f"forward FLOPs of the backbone: {info['counted_forward_flops'] / 1e9:.2f} G counted "
                f"(FlopCounterMode), {info['analytic_forward_flops'] / 1e9:.2f} G analytic (vit_encoder_flops + patch "
                "embedding + classifier)"
            )
    eng = result.get("engine")
    if eng and "engine_overhead" in eng:
        lines.append(
            f"engine: {eng['trainer']} from {eng['bundle']} with {', '.join(eng['handlers'])}: "
            f"{eng['engine_iteration_s'] * 1e3:.0f} ms/iteration vs bare loop {eng['bare_iteration_s'] * 1e3:.0f} ms, "
            f"epoch-end +{eng['engine_epoch_extra_s']:.2f} s per {eng['iterations_per_epoch']} iterations"
        )
    data = result.get("data")
    if data and "images_per_s" in data:
        lines.append(
            f"data: {data['transforms']} on {data['dataset']}, CacheDataset + DataLoader({data['workers']} "
            f"workers): {data['images_per_s']:.1f} images/s (cache built in {data['cache_s']:.1f} s)"
        )
    sc = result.get("scaling")
    if sc:
        parts = [f"TPP-MAE {k}: {v['step_s']:.2f} s" for k, v in sc.get("tpp_mae", {}).items()]
        parts += [f"{v['backbone']} {v['label']}: {v['step_s']:.2f} s" for v in sc.get("stunet", {}).values()]
        batch = cfg["batch_size"] if cfg["family"] != "stunet" else 2
        lines.append(f"scaling (batch {batch} in 2D, 1 in 3D): " + "; ".join(parts))
    lines.append("")
    head = f"{'target':<26} {'value':>8} {'target':>9}  status"
    lines.append(head)
    lines.append("-" * len(head))
    for key, t in result["targets"].items():
        status = {True: "met", False: f"MISSED by {_fmt(t['missed_by'], '.3f')}", None: "n/a"}[t["met"]]
        lines.append(f"{key:<26} {_fmt(t['value'], '.3f'):>8} {t['target']:>9}  {status}")
        if t["met"] is not True and t["why"]:
            lines.append(f"{'':<26}   why: {t['why']}")
    return "\n".join(lines)


# ================================================================================================================
# CLI
# ================================================================================================================
SECTIONS = ("steps", "engine", "data", "scaling")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", default="medcoss_vit_b16", help="medcoss_vit_b16 (default) or stunet_b for 3D")
    parser.add_argument("--method", default=None, help="PEFT method (default adapter; conv_adapter for STU-Net)")
    parser.add_argument("--image-size", type=int, default=224, help="2D image size (default 224)")
    parser.add_argument("--scaling-size", type=int, default=512, help="second TPP-MAE size (GlaS, default 512)")
    parser.add_argument("--patch-size", type=int, default=64, help="3D patch edge for --backbone stunet_* (64)")
    parser.add_argument(
        "--scaling-patches", type=int, nargs=2, default=(32, 64), help="two 3D patch edges for STU-Net (32 64)"
    )
    parser.add_argument(
        "--stunet-backbone", default=STUNET_SCALING, help="3D backbone of the scaling rows of a 2D run (stunet_b)"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default 2; 1 for 3D)")
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (one step of every config each)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up rounds (default 1)")
    parser.add_argument(
        "--max-rounds", type=int, default=None, help="rounds at most while steps lack quiet samples (3 x --steps)"
    )
    parser.add_argument("--budget", type=float, default=240.0, help="seconds of extra rounds at most (240)")
    parser.add_argument(
        "--wait-quiet", type=float, default=10.0, help="seconds to wait for an idle machine before a step (10)"
    )
    parser.add_argument("--scaling-steps", type=int, default=2, help="timed steps per scaling point (default 2)")
    parser.add_argument("--engine-iters", type=int, default=6, help="iterations per engine epoch (default 6)")
    parser.add_argument(
        "--engine-reps", type=int, default=4, help="engine epochs, each step paired with a bare one (default 4)"
    )
    parser.add_argument("--data-images", type=int, default=200, help="images the data pipeline must deliver")
    parser.add_argument("--data-seconds", type=float, default=5.0, help="and at least this long (seconds)")
    parser.add_argument("--dataset", default="mhist", help="demo dataset of the data pipeline (default mhist)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto, cpu or cuda")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list from {', '.join(SECTIONS)}")
    parser.add_argument("--no-dino", action="store_true", help="skip the TPP-DINO step")
    parser.add_argument("--no-checkpointing", action="store_true", help="skip the activation-checkpointing rows")
    parser.add_argument("--json", action="store_true", help="print one JSON object (progress goes to stderr)")


def run(args: argparse.Namespace) -> int:
    from tpp_monai.peft import get_method

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"unknown bench section(s) {sorted(unknown)}; valid: {', '.join(SECTIONS)}")
    family = _family(args.backbone)
    args.method = args.method or ("conv_adapter" if family == "stunet" else "adapter")
    spec = get_method(args.method, "--method")
    if family not in spec.families:
        raise ConfigError(f"--method {args.method} does not support the {family} backbone {args.backbone}")
    # TPP needs target parameters: the baselines pre-train nothing, so the TPP rows use the adapter instead.
    args.tpp_method = args.method if spec.pretrainable else ("conv_adapter" if family == "stunet" else "adapter")
    args.batch_size = args.batch_size or (1 if family == "stunet" else 2)
    args.max_rounds = args.max_rounds or 3 * args.steps
    counts = {"--batch-size": args.batch_size, "--steps": args.steps, "--scaling-steps": args.scaling_steps,
              "--engine-iters": args.engine_iters, "--engine-reps": args.engine_reps}  # fmt: skip
    low = [f"{k} {v}" for k, v in counts.items() if v < 1] + ([f"--warmup {args.warmup}"] if args.warmup < 0 else [])
    if low:
        raise ConfigError(f"{', '.join(low)}: counts must be >= 1 (--warmup >= 0)")
    if args.engine_iters * args.engine_reps < 2:
        raise ConfigError("--engine-iters x --engine-reps must give at least 2 engine/bare pairs")
    if "data" in sections:
        from tpp_monai.data import get_dataset

        get_dataset(args.dataset)  # an unknown --dataset fails now, not after the steps section
    device = Device(args.device)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[bench {time.perf_counter() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    result: dict = {
        "config": {
            "backbone": args.backbone, "family": family, "method": args.method, "tpp_method": args.tpp_method,
            "image_size": args.image_size, "patch_size": args.patch_size, "batch_size": args.batch_size,
            "steps": args.steps, "warmup": args.warmup, "sections": sections,
            "command": "python -m tpp_monai bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else []),
        },
        "machine": device.describe(),
    }  # fmt: skip
    log(f"{result['machine']}")
    if "steps" in sections:
        result["steps"] = section_steps(args, device, log)
    if "engine" in sections:
        result["engine"] = section_engine(args, device, log)
    if "data" in sections:
        result["data"] = section_data(args, device, log)
    if "scaling" in sections:
        result["scaling"] = section_scaling(args, device, log, result.get("steps"))
    result["wall_s"] = time.perf_counter() - t_start
    result["machine"]["load_at_end"] = machine_load()
    ratios = collect_ratios(result)
    result.update({t.key: ratios.get(t.key) for t in TARGETS})
    result["ratios"] = ratios
    why = explain(result)
    if family == "stunet":
        for key in ("tpp_mae_step_ratio", "tpp_mae_memory_ratio", "forward_matmul_fraction"):
            ratios[key] = result[key] = None
            why[key] = "a target of the 2D ViT part (STU-Net pre-trains with DINO; its forward is convolutional)"
        for key in ("engine_overhead", "data_supply_ratio"):
            why[key] = "measured by the 2D run (the 3D run times the steps and the scaling only)"
    result["targets"] = evaluate_targets(ratios, why)
    if args.json:
        print(json.dumps(result, indent=2, default=float))
    else:
        print(format_report(result))
    return 0


__all__ = [
    "TARGETS",
    "Target",
    "allocation_peak",
    "configure",
    "count_flops",
    "evaluate_targets",
    "overhead",
    "patch_embed_flops",
    "ratio",
    "run",
    "unique_bytes",
    "vit_encoder_flops",
]
