"""``python -m tpp_monai bundles``: write the bundles, ``--check`` them against the generator (and print each
bundle's ``$`` expression count and longest config line), ``--list`` them."""

from __future__ import annotations

import argparse
import difflib
import json
import re
import shutil
from pathlib import Path

from tpp_monai.bundlegen import BUNDLES_DIR, all_bundles
from tpp_monai.errors import UserError

MAX_LINE = 160
DOLLAR = re.compile(r'"\$')


WIDTH = 100  # a list or mapping that fits on one line of this width is written on one line


def config_json(value: object, indent: int = 0, lead: int = 0) -> str:
    """JSON with 4-space indentation where every list or mapping that fits in :data:`WIDTH` columns (with its
    ``lead``: the key before it) stays on one line: ``"image_size": [512, 512]``, not four lines."""
    line = json.dumps(value)
    if not isinstance(value, (dict, list)) or not value or indent + lead + len(line) <= WIDTH:
        return line
    pad = " " * (indent + 4)
    if isinstance(value, dict):
        keys = [json.dumps(k) for k in value]
        items = [f"{pad}{k}: {config_json(v, indent + 4, len(k) + 2)}" for k, v in zip(keys, value.values())]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    return "[\n" + ",\n".join(pad + config_json(v, indent + 4) for v in value) + "\n" + " " * indent + "]"


def render(content: object) -> str:
    return content if isinstance(content, str) else config_json(content) + "\n"


def write_bundles(out: Path = BUNDLES_DIR) -> list[str]:
    """(Re)write every bundle under ``out``; bundle folders that the table no longer has are left alone."""
    names = []
    for bundle in all_bundles():
        root = out / bundle.name
        if (root / "configs").exists():
            shutil.rmtree(root / "configs")
        for rel, content in bundle.files().items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(render(content))
        names.append(bundle.name)
    return names


def config_stats(folder: Path) -> tuple[int, int]:
    """(``$`` expressions, longest line) over the JSON configs of one bundle folder."""
    dollars, longest = 0, 0
    for path in sorted((folder / "configs").glob("*.json")):
        text = path.read_text()
        dollars += len(DOLLAR.findall(text))
        longest = max([longest, *(len(line) for line in text.splitlines())])
    return dollars, longest


def check_bundles(out: Path = BUNDLES_DIR) -> list[str]:
    """Differences between the committed bundles and the generator's output (empty when in sync), and configs with
    a line over :data:`MAX_LINE` characters."""
    problems = []
    for bundle in all_bundles():
        files = bundle.files()
        for rel, content in files.items():
            path = out / bundle.name / rel
            want = render(content)
            if not path.is_file():
                problems.append(f"{bundle.name}/{rel}: missing")
            elif path.read_text() != want:
                diff = difflib.unified_diff(path.read_text().splitlines(), want.splitlines(), lineterm="", n=0)
                problems.append(f"{bundle.name}/{rel}: differs\n" + "\n".join(list(diff)[2:8]))
            elif rel.endswith(".json") and max(map(len, want.splitlines())) > MAX_LINE:
                problems.append(f"{bundle.name}/{rel}: a line over {MAX_LINE} characters")
        for path in sorted((out / bundle.name / "configs").glob("*")):
            if f"configs/{path.name}" not in files:
                problems.append(f"{bundle.name}/configs/{path.name}: not written by the generator")
    return problems


def list_bundles() -> list[dict]:
    return [{"bundle": b.name, "dataset": b.info.name, "task": b.info.task, "method": b.method,
             "backbone": b.backbone, "workflows": b.workflows()} for b in all_bundles()]  # fmt: skip


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=BUNDLES_DIR, help="bundles folder (default: the repo's)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--check", action="store_true", help="fail if the bundles differ from the generator's output; "
                       "print each bundle's $ expression count and longest config line")  # fmt: skip
    group.add_argument("--list", action="store_true", help="every bundle: dataset, task, method, backbone, workflows")


def run(args: argparse.Namespace) -> int:
    if args.list:
        rows = list_bundles()
        widths = [max(len(str(r[k])) for r in rows) for k in ("bundle", "dataset", "task", "method", "backbone")]
        for r in rows:
            cells = [str(r[k]).ljust(w) for k, w in zip(("bundle", "dataset", "task", "method", "backbone"), widths)]
            print("  ".join(cells), " ".join(r["workflows"]))
        return 0
    if args.check:
        problems = check_bundles(args.out)
        if problems:
            raise UserError(
                f"{len(problems)} bundle file(s) differ from the generator:\n"
                + "\n".join(problems[:20])
                + "\nrun `python -m tpp_monai bundles` to rewrite them"
            )
        total, longest = 0, 0
        for bundle in all_bundles():
            dollars, line = config_stats(args.out / bundle.name)
            total, longest = total + dollars, max(longest, line)
            print(f"{bundle.name:28s} $ expressions {dollars:4d}   longest line {line:3d}")
        print(f"{len(all_bundles())} bundles match the generator: {total} $ expressions, longest config line {longest}")
        return 0
    names = write_bundles(args.out)
    print(f"wrote {len(names)} bundles under {args.out}")
    return 0
