"""``python -m tpp_monai demo-data DATASET --out DIR [--n N] [--seed S]``: a small synthetic dataset."""

from __future__ import annotations

import argparse
import time

from tpp_monai.data.info import DATASETS


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", metavar="DATASET", help=f"one of: {', '.join(DATASETS)}")
    parser.add_argument("--out", required=True, help="parent folder; the dataset's official top folder is made in it")
    parser.add_argument("--n", type=int, default=None, help="images (2D) or cases (3D); default: a few dozen / 10")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic content (default 0)")


def run(args: argparse.Namespace) -> int:
    from tpp_monai.data.demo import make_demo_dataset

    start = time.perf_counter()
    root = make_demo_dataset(args.dataset, args.out, n=args.n, seed=args.seed)
    print(f"wrote a demo {args.dataset} dataset in its official layout to {root} ({time.perf_counter() - start:.1f} s)")
    print(f"next: python -m tpp_monai datalist {args.dataset} --root {root} --out {args.dataset}.json")
    return 0
