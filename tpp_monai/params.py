"""``python -m tpp_monai params``: trainable and total parameters, and the paper's Ratio column.

Ratio = trainable parameters / parameters of the plain MedCoSS fine-tuning model without PEFT additions, in percent
(``methods.md`` §3.2): 92,759,810 for 2-class classification, 94,649,329 for GlaS segmentation. Models are built on
PyTorch's meta device, so counting the full ViT-B/16 allocates no weights.
"""

from __future__ import annotations

import argparse
import json

import torch

from tpp_monai.backbones import build_backbone, get_backbone_spec
from tpp_monai.peft import METHODS, applicable_methods, apply_peft, count_parameters, get_method

TASKS = ("cls", "seg")


def count(
    method: str, task: str, num_classes: int = 2, backbone: str = "medcoss_vit_b16", options: dict | None = None
) -> dict:
    """Counts for one method and task: ``trainable``, ``target``, ``total``, ``denominator`` and ``ratio`` (%)."""
    get_method(method, "--method")
    with torch.device("meta"):
        plain = build_backbone(backbone, task=task, num_classes=num_classes)
        model = apply_peft(build_backbone(backbone, task=task, num_classes=num_classes), method, options)
    denominator = sum(p.numel() for p in plain.parameters())
    counts = count_parameters(model, "finetune")
    return {
        "method": method,
        "task": task,
        "backbone": backbone,
        "num_classes": num_classes if task == "cls" else 1,
        "options": model.peft_options,
        **counts,
        "denominator": denominator,
        "ratio": 100.0 * counts["trainable"] / denominator,
    }


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=TASKS, default="cls", help="classification head or UNETR decoder")
    parser.add_argument("--method", default="adapter", help=f"one of: {', '.join(_method_names())}")
    parser.add_argument("--num-classes", type=int, default=2, help="classifier outputs (cls)")
    parser.add_argument("--backbone", default="medcoss_vit_b16")
    parser.add_argument("--all", action="store_true", help="the whole table: every method x both tasks")
    parser.add_argument("--json", action="store_true", help="print JSON (one object, or a list with --all)")


def _method_names(backbone: str | None = None) -> list[str]:
    """Registered built-in methods (those that apply to ``backbone``, when given)."""
    if backbone is None:
        return sorted(METHODS)
    get_backbone_spec(backbone, "--backbone")
    return applicable_methods(backbone)


def run(args: argparse.Namespace) -> int:
    if args.all:
        rows = [count(m, t, args.num_classes, args.backbone) for t in TASKS for m in _method_names(args.backbone)]
    else:
        rows = [count(args.method, args.task, args.num_classes, args.backbone)]
    if args.json:
        print(json.dumps(rows if args.all else rows[0], indent=2))
        return 0
    header = f"{'method':<14} {'task':<4} {'trainable':>12} {'total':>12} {'denominator':>12} {'ratio %':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['method']:<14} {r['task']:<4} {r['trainable']:>12,} {r['total']:>12,} {r['denominator']:>12,} "
            f"{r['ratio']:>9.3f}"
        )
    return 0
