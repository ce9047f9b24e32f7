"""Timing and accounting: devices, quiet-step medians, peak memory, FLOP counts, host syncs (pure measurement)."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tpp_monai.errors import ConfigError

MIB = 2**20

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

def scheduled_rounds(
    items: Sequence, rounds: int, max_rounds: int | None, budget_s: float | None, short: Callable[[Any], bool]
) -> Iterable[tuple[int, list]]:
    """``(round, items to time)``: every item for ``rounds`` rounds, then only the items still ``short`` of quiet
    samples, until none is, ``max_rounds`` rounds ran or the extra rounds took ``budget_s`` seconds."""
    start = time.perf_counter()
    for r in range(max(rounds, max_rounds or rounds)):
        need = list(items) if r < rounds else [i for i in items if short(i)]
        if not need or (r >= rounds and budget_s is not None and time.perf_counter() - start > budget_s):
            return
        yield r, need


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
