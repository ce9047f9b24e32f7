"""``python -m tpp_monai datalist DATASET --root DIR --out FILE``: official download -> datalist JSON."""

from __future__ import annotations

import argparse
import sys

from tpp_monai.data.info import DATASETS
from tpp_monai.io import check_writable_file


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", metavar="DATASET", help=f"one of: {', '.join(DATASETS)}")
    parser.add_argument("--root", required=True, help="the download folder (or the official layout folder inside it)")
    parser.add_argument("--out", required=True, help="datalist JSON to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random draws (default 0)")
    parser.add_argument(
        "--label-fraction",
        type=float,
        default=None,
        metavar="F",
        help="keep a seeded per-class fraction F of the training labels (paper Figure 4)",
    )
    parser.add_argument(
        "--skip-bad", action="store_true", help="skip unreadable files instead of stopping; each one is listed"
    )


def run(args: argparse.Namespace) -> int:
    from tpp_monai.data.datalist import build, format_counts, write_datalist

    check_writable_file(args.out, "--out")  # before the (possibly long) build
    datalist, layout_root = build(args.dataset, args.root, args.seed, args.label_fraction, args.skip_bad)
    out = write_datalist(datalist, args.out)
    print(format_counts(datalist))
    for note in datalist["notes"]:
        print(f"note: {note}")
    if datalist["missing"]:
        names = datalist["missing"]
        shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
        print(
            f"warning: {len(names)} case(s) of the fixed {args.dataset} split are not in {layout_root}: {shown}; "
            "the split uses the cases present (listed under 'missing' in the datalist)",
            file=sys.stderr,
        )
    for skipped in datalist["skipped"]:
        print(f"skipped: {skipped['path']}: {skipped['reason']}", file=sys.stderr)
    if datalist["skipped"]:
        print(
            f"warning: {len(datalist['skipped'])} unreadable file(s) skipped (listed under 'skipped')", file=sys.stderr
        )
    print(f"wrote {out}\npaths are relative to {layout_root} (pass it as dataset_dir)")
    return 0
