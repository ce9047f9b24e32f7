"""The benchmark of tpp-monai, outside the runtime package: step time and peak memory of TPP and fine-tuning against
full fine-tuning, with workloads built from the bundle configs' own recipes.

``python -m tpp_monai_bench`` (or ``python -m tpp_monai bench``). Modules: :mod:`~tpp_monai_bench.recipes` (the
recipes read from the bundles), :mod:`~tpp_monai_bench.workloads`, :mod:`~tpp_monai_bench.timing`,
:mod:`~tpp_monai_bench.sections`, :mod:`~tpp_monai_bench.report`, :mod:`~tpp_monai_bench.cli`.

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

from tpp_monai_bench.cli import SECTIONS, configure, run
from tpp_monai_bench.report import (
    TARGETS,
    TARGETS_BY_KEY,
    Target,
    collect_ratios,
    evaluate_targets,
    explain,
    format_report,
)
from tpp_monai_bench.timing import (
    Device,
    allocation_peak,
    count_flops,
    measure_peak_memory,
    median,
    overhead,
    patch_embed_flops,
    ratio,
    unique_bytes,
    vit_encoder_flops,
)

__all__ = [
    "SECTIONS", "TARGETS", "TARGETS_BY_KEY", "Device", "Target", "allocation_peak", "collect_ratios", "configure",
    "count_flops", "evaluate_targets", "explain", "format_report", "measure_peak_memory", "median", "overhead",
    "patch_embed_flops", "ratio", "run", "unique_bytes", "vit_encoder_flops",
]  # fmt: skip
