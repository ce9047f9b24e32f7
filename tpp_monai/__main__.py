"""Command line of tpp-monai: ``python -m tpp_monai <command> ...``.

Each command lives in the module that owns it; this file only lists them, so ``--help`` stays fast (the modules,
and torch with them, are imported only for the command that runs). A module provides ``configure(parser)`` and
``run(args) -> int``. Errors a user can cause (:class:`tpp_monai.errors.UserError`) print one message, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from tpp_monai.errors import UserError

COMMANDS: dict[str, tuple[str, str]] = {
    "params": ("tpp_monai.params", "trainable/total parameter counts and the paper's Ratio column"),
    "datalist": ("tpp_monai.data.cli_datalist", "build a train/validation/test datalist from an official download"),
    "demo-data": ("tpp_monai.data.cli_demo", "write a small synthetic dataset in a dataset's official layout"),
    "bundles": ("tpp_monai.bundlegen.cli", "write (--check, --list) the bundles from the dataset x method table"),
    "demo": ("tpp_monai.demo", "does TPP help? seeds x {random, TPP-MAE} on embedded data, gain and its 95 % interval"),
    "report": ("tpp_monai.report.runs", "collect evaluated runs into the paper's table, with plots"),
    "experiment": ("tpp_monai.experiment_cli", "run a grid of bundle workflows (a paper table or your own)"),
    "bench": ("tpp_monai_bench.cli", "measure step time and memory of TPP and fine-tuning against full fine-tuning"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tpp_monai", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text.replace("%", "%%"), add_help=False)  # argparse %-formats help texts
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        parser = build_parser()
        if argv and not argv[0].startswith("-"):
            parser.error(f"unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}")
        parser.print_help()  # the bare command, -h and --help: the list of commands
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"python -m tpp_monai {name}", description=COMMANDS[name][1])
    module.configure(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
