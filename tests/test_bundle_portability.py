"""A bundle is its own: copied under another name to a temporary folder and run from another working directory
through ``python -m monai.bundle run`` (as a model-zoo user runs it), every file it writes lands in the copy or in the
folders given on the command line; every workflow runs with its run id and without (MONAI's default ``run``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import BUNDLES, REPO


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def _run(cwd: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monai.bundle", "run", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, check=False)  # fmt: skip


def test_copied_renamed_bundle_writes_only_into_itself(tmp_path) -> None:
    copy = tmp_path / "elsewhere" / "my_renamed_bundle"
    shutil.copytree(BUNDLES / "mhist_lora", copy)
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir(), home.mkdir()
    # the copy must not depend on this checkout's bundles/ folder: PYTHONPATH gives the code only
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": str(home), "TMPDIR": str(home)}
    repo_before = _files(BUNDLES / "mhist_lora")
    configs = copy / "configs"
    demo = str(configs / "demo.json")
    quick = ["--tpp_epochs", "1", "--iterations", "2", "--val_interval", "1"]

    proc = _run(cwd, env, "pretrain_tpp", "--config_file", str([str(configs / "pretrain_tpp.json"), demo]), *quick)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (copy / "runs" / "pretrain_tpp" / "tpp_target" / "target_state.safetensors").is_file()

    # with and without the run id; the second run writes to a folder given on the command line
    proc = _run(cwd, env, "finetune", "--config_file", str([str(configs / "finetune.json"), demo]), *quick)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (copy / "models" / "model.pt").is_file()
    given = tmp_path / "given"
    proc = _run(cwd, env, "--config_file", str([str(configs / "finetune.json"), demo]), *quick,
                "--output_dir", str(given / "finetune"), "--ckpt_dir", str(given / "models"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (given / "models" / "model.pt").is_file() and (given / "finetune" / "settings.json").is_file()

    proc = _run(cwd, env, "evaluate", "--config_file",
                str([str(configs / "finetune.json"), str(configs / "evaluate.json"), demo]))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (copy / "runs" / "evaluate" / "metrics.json").is_file()

    assert _files(cwd) == set()
    # libraries keep their caches in the home folder (matplotlib's font list); nothing else may go there
    caches = {p for p in _files(home) if p.relative_to(home).parts[0] == ".cache"}
    assert _files(home) == caches
    assert _files(BUNDLES / "mhist_lora") == repo_before
    written = _files(tmp_path) - _files(copy) - _files(given) - caches
    assert written == set(), sorted(map(str, written))[:5]
