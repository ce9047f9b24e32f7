"""Create the MONAI Label environment: ``python -m tpp_monai.label.environment [--path DIR] [--force]``.

Runs, from the repository root::

    python -m venv .venv-monailabel
    .venv-monailabel/bin/pip install -r requirements-monailabel.txt
    .venv-monailabel/bin/pip install --no-deps -r requirements-monailabel-nodeps.txt

then imports the app's task module in it (MONAI Label, torchvision, this package) as a check, and records the
requirement files' hash in the environment, so an environment built from older requirement files counts as stale.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_PATH = REPO / ".venv-monailabel"
REQUIREMENTS = ("requirements-monailabel.txt", "requirements-monailabel-nodeps.txt", "requirements.txt")
STAMP = "tpp_monai_requirements.sha256"  # in the environment folder: the hash it was built from


def requirements_hash(repo: Path = REPO) -> str:
    """Hash of the requirement lines (comments and blank lines left out: editing a comment needs no rebuild)."""
    digest = hashlib.sha256()
    for name in REQUIREMENTS:
        lines = (line.split(" #")[0].strip() for line in (repo / name).read_text().splitlines())
        digest.update(name.encode() + b"\0" + "\n".join(x for x in lines if x and not x.startswith("#")).encode())
    return digest.hexdigest()


def python_of(env: Path) -> Path:
    return env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def is_current(env: Path = DEFAULT_PATH) -> bool:
    """The environment exists, finished building, and was built from the current requirement files."""
    stamp = env / STAMP
    return python_of(env).is_file() and stamp.is_file() and stamp.read_text().strip() == requirements_hash()


def commands(env: Path) -> list[list[str]]:
    # The pip script, not `python -m pip`: that would put the repository on sys.path, where pip then reads the
    # tpp_monai.egg-info that installing `-e .` rewrites meanwhile (seen failing: a distribution without version).
    pip = [str(python_of(env).parent / ("pip.exe" if os.name == "nt" else "pip")), "install"]
    pip.append("--disable-pip-version-check")
    return [
        [sys.executable, "-m", "venv", str(env)],
        [*pip, "-r", "requirements-monailabel.txt"],
        [*pip, "--no-deps", "-r", "requirements-monailabel-nodeps.txt"],
        # MONAI Label and torchvision import together
        [str(python_of(env)), "-c", "import tpp_monai.label.infer_task, tpp_monai.label.train_task"],
    ]


def create(env: Path = DEFAULT_PATH, force: bool = False, quiet: bool = False) -> Path:
    """Build (or rebuild when stale or ``force``) the environment at ``env``; raises ``CalledProcessError`` when a
    step fails, ``FileExistsError`` rather than delete a folder this command did not make (unless ``force``)."""
    env = env.resolve()
    if is_current(env) and not force:
        return env
    if env.exists():
        if not (force or (env / STAMP).is_file() or env == DEFAULT_PATH.resolve()):
            raise FileExistsError(f"{env} exists and was not made by this command; pass --force to replace it")
        shutil.rmtree(env)
    start = time.monotonic()
    for cmd in commands(env):
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL if quiet else None)
    (env / STAMP).write_text(requirements_hash() + "\n")
    size = sum(f.stat().st_size for f in Path(env).rglob("*") if f.is_file() and not f.is_symlink())
    print(f"MONAI Label environment ready at {env} ({time.monotonic() - start:.0f} s, {size / 1e9:.1f} GB)", flush=True)
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tpp_monai.label.environment", description=__doc__.splitlines()[0])
    parser.add_argument("--path", type=Path, default=DEFAULT_PATH, help=f"where to create it (default {DEFAULT_PATH})")
    parser.add_argument("--force", action="store_true", help="rebuild even when it is current")
    args = parser.parse_args(argv)
    try:
        env = create(args.path, force=args.force)
    except subprocess.CalledProcessError as err:
        print(f"error: {' '.join(err.cmd)} failed with exit code {err.returncode}", file=sys.stderr)
        return 1
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"start a server with: source {python_of(env).parent / 'activate'} && monailabel start_server "
          "--app tpp_monai/label --studies <images folder> --conf models <bundle>[,<bundle>...]")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
