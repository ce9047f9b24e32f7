"""``python -m tpp_monai_bench`` (also ``python -m tpp_monai bench``): arguments and the run."""

from __future__ import annotations

import argparse
import json
import sys
import time

from tpp_monai.errors import ConfigError
from tpp_monai_bench.report import TARGETS, collect_ratios, evaluate_targets, explain, format_report
from tpp_monai_bench.sections import section_data, section_engine, section_pairs, section_scaling, section_steps
from tpp_monai_bench.timing import Device, machine_load
from tpp_monai_bench.workloads import STUNET_SCALING, _family

SECTIONS = ("pairs", "steps", "engine", "data", "scaling")
DEFAULT_SECTIONS = ("pairs", "engine", "data")


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
    parser.add_argument(
        "--batch-size", type=int, default=None,
        help="images per step (pairs: the bundles' own batch sizes; steps/engine/scaling: 2, 1 for 3D)",
    )  # fmt: skip
    parser.add_argument(
        "--max-batch", type=int, default=None,
        help="pairs: cap on the bundles' batch sizes (what fits this machine's time; default no cap)",
    )  # fmt: skip
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
    parser.add_argument(
        "--sections", default=",".join(DEFAULT_SECTIONS),
        help=f"comma list from {', '.join(SECTIONS)} (default {','.join(DEFAULT_SECTIONS)})",
    )  # fmt: skip
    parser.add_argument("--no-dino", action="store_true", help="skip the TPP-DINO step")
    parser.add_argument("--no-checkpointing", action="store_true", help="skip the activation-checkpointing rows")
    parser.add_argument("--json", action="store_true", help="print one JSON object (progress goes to stderr)")
    parser.add_argument(
        "--suite", default="cpu", choices=("cpu", "gpu"),
        help="cpu: the sections above (default); gpu: every workflow at the bundles' real sizes (gpu_suite)",
    )  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="gpu suite: tiny sizes (checks the code paths on CPU)")
    parser.add_argument(
        "--suite-parts", default="steps,workflows", help="gpu suite: comma list from steps, workflows (both)"
    )
    parser.add_argument(
        "--suite-groups", default=None, help="gpu suite: comma list of step groups (default all: see gpu_suite)"
    )
    parser.add_argument("--out", default=None, help="gpu suite: JSON path (default tpp_monai_bench/results/...)")


def run_gpu_suite(args: argparse.Namespace) -> int:
    from tpp_monai_bench.gpu_suite import STEP_GROUPS, format_suite, run_suite

    parts = [p.strip() for p in args.suite_parts.split(",") if p.strip()]
    if not parts or set(parts) - {"steps", "workflows"}:
        raise ConfigError(f"--suite-parts {args.suite_parts!r}: a comma list from steps, workflows")
    args.suite_parts = parts
    groups = [g.strip() for g in (args.suite_groups or ",".join(STEP_GROUPS)).split(",") if g.strip()]
    if not groups or set(groups) - set(STEP_GROUPS):
        raise ConfigError(f"--suite-groups {args.suite_groups!r}: a comma list from {', '.join(STEP_GROUPS)}")
    args.suite_groups = groups
    device = Device(args.device)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[gpu suite {time.perf_counter() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    result = run_suite(args, device, log)
    print(json.dumps(result, indent=2, default=float) if args.json else format_suite(result))
    return 0


def run(args: argparse.Namespace) -> int:
    from tpp_monai.peft import get_method, why_not_applicable

    if args.suite == "gpu":
        return run_gpu_suite(args)

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"unknown bench section(s) {sorted(unknown)}; valid: {', '.join(SECTIONS)}")
    family = _family(args.backbone)
    args.method = args.method or ("conv_adapter" if family == "stunet" else "adapter")
    spec = get_method(args.method, "--method")
    reason = why_not_applicable(spec, args.backbone)
    if reason:
        raise ConfigError(f"--method {args.method} cannot tune backbone {args.backbone}: {reason}")
    # TPP needs target parameters: the baselines pre-train nothing, so the TPP rows use the adapter instead.
    args.tpp_method = args.method if spec.pretrainable else ("conv_adapter" if family == "stunet" else "adapter")
    args.pairs_batch = args.batch_size  # None: the pairs run at the bundles' batch sizes
    args.batch_size = args.batch_size or (1 if family == "stunet" else 2)
    args.max_rounds = args.max_rounds or 3 * args.steps
    counts = {"--batch-size": args.batch_size, "--max-batch": args.max_batch or 1, "--steps": args.steps,
              "--scaling-steps": args.scaling_steps,
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
    if "pairs" in sections:
        result["pairs"] = section_pairs(args, device, log)
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
