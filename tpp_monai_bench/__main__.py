"""``python -m tpp_monai_bench [options]``: the benchmark (same as ``python -m tpp_monai bench``)."""

from __future__ import annotations

import argparse
import sys

from tpp_monai.errors import UserError
from tpp_monai_bench.cli import configure, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tpp_monai_bench", description=__doc__.splitlines()[0])
    configure(parser)
    try:
        return int(run(parser.parse_args(argv)) or 0)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
