"""Targets, ratios, their explanations and the printed report."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tpp_monai_bench.timing import QUIET_STALL, ratio


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
    pairs = (result.get("pairs") or {}).get("pairs") or {}
    method = result.get("config", {}).get("method")
    for target, key in (("peft_step_ratio", f"{method}_ft"), ("tpp_mae_step_ratio", "tpp_mae_frozen")):
        if key in pairs:
            p = pairs[key]
            why[target] = f"paired at batch {p['batch']}: FLOP ratio {_fmt(p['flop_ratio'])}; {p['verdict']}"
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
    """The targets' values; step ratios from the paired comparisons where they ran (``None`` when not measurable
    under the load), else from the steps section's medians."""
    steps = result.get("steps") or {}
    ratios = dict(steps.get("ratios", {}))
    eng = result.get("engine") or {}
    ratios["engine_overhead"] = eng.get("engine_overhead")
    data = result.get("data") or {}
    tpp_key = "tpp_mae_frozen" if "tpp_mae_frozen" in steps.get("configs", {}) else "tpp_dino"
    consume = steps.get("configs", {}).get(tpp_key, {}).get("images_per_s")
    pairs = (result.get("pairs") or {}).get("pairs") or {}
    method = result.get("config", {}).get("method")
    for target, key in (("peft_step_ratio", f"{method}_ft"), ("tpp_mae_step_ratio", "tpp_mae_frozen")):
        if key in pairs:
            ratios[target] = pairs[key]["step_ratio"] if pairs[key]["measurable"] else None
    tpp = pairs.get("tpp_mae_frozen")
    if consume is None and tpp and tpp.get("step_s") and tpp["measurable"]:
        consume = tpp["batch"] / tpp["step_s"]
    ratios["data_supply_ratio"] = ratio(data.get("images_per_s"), consume)
    return ratios

def _fmt(value: float | None, spec: str = ".2f", unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"

def format_pairs(section: dict) -> list[str]:
    """The paired comparisons: step ratio (median of paired ratios, interval), FLOP ratio, verdict."""
    rule = section["rule"]
    lines = [
        "",
        f"paired, interleaved steps (A,B / B,A per round; ratio = B / A per pair; median of the quiet pairs with a "
        f"{rule['interval_confidence']:.0%} order-statistic interval). Load rule: a pair is quiet when neither step "
        f"saw CPU stall > {rule['quiet_stall']:.0%} of its time (PSI); a comparison is measurable with >= "
        f"{rule['min_quiet_pairs']} quiet pairs whose ratios spread (IQR / median) <= {rule['spread_limit']:g}.",
    ]
    head = (f"{'B (configuration)':<36} {'A (base)':<30} {'batch':>9} {'pairs':>5} {'step B/A':>8} {'interval':>13} "
            f"{'FLOP B/A':>8} {'/ideal':>6}  verdict")  # fmt: skip
    lines += [head, "-" * len(head)]
    for p in section["pairs"].values():
        batch = f"{p['batch']}" + (f" ({p['bundle_batch']})" if p["bundle_batch"] != p["batch"] else "")
        ok = p["measurable"]  # no ratio is printed for a comparison the load made unmeasurable
        interval = "-" if p["interval"] is None or not ok else f"{p['interval'][0]:.2f}-{p['interval'][1]:.2f}"
        lines.append(
            f"{p['label']:<36.36} {p['base']:<30.30} {batch:>9} {p['quiet_pairs']:>2}/{p['pairs']:<2} "
            f"{_fmt(p['step_ratio'] if ok else None, '.3f'):>8} {interval:>13} {_fmt(p['flop_ratio'], '.3f'):>8} "
            f"{_fmt(p['vs_ideal'] if ok else None, '.2f'):>6}  {p['verdict']}"
        )
    if any(p["bundle_batch"] != p["batch"] for p in section["pairs"].values()):
        lines.append(f"batch (bundle's): capped by --max-batch {section['max_batch']} to fit this machine")
    for key, why in section.get("skipped", {}).items():
        lines.append(f"{key}: not run: {why}")
    return [*lines, ""]


def format_report(result: dict) -> str:
    """The human-readable report (the JSON holds the same figures)."""
    lines: list[str] = []
    m = result["machine"]
    cfg = result["config"]
    lines.append(
        f"tpp-monai bench: {cfg['backbone']}, method {cfg['method']}, "
        + (f"{cfg['patch_size']}^3" if cfg["family"] == "stunet" else f"{cfg['image_size']}x{cfg['image_size']}")
        + f", {cfg['steps']} timed rounds after {cfg['warmup']} warm-up"
        + (f"; sections {','.join(cfg['sections'])}" if cfg.get("sections") else "")
        + (f" (steps/engine/scaling at batch {cfg['batch_size']})" if set(cfg.get("sections", ["steps"])) - {"pairs"}
           else "")
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
    pairs = result.get("pairs") or {}
    if pairs.get("pairs"):
        lines.extend(format_pairs(pairs))
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
