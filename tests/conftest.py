"""Shared fixtures: demo datasets made once per session, and running bundle workflows in-process.

In-process runs use ``monai.bundle.ConfigWorkflow``, the object ``python -m monai.bundle run`` builds (the CLI adds
only argument parsing); tests that must exercise the CLI itself run it in a subprocess.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def demo_roots(tmp_path_factory: pytest.TempPathFactory):
    """``demo_roots(dataset) -> Path``: a demo dataset with its ``datalist.json``, made once per session."""
    from tpp_monai.workflows import demo_dataset

    base = tmp_path_factory.mktemp("demo_data")
    cache: dict[str, Path] = {}

    def get(dataset: str) -> Path:
        if dataset not in cache:
            cache[dataset] = Path(demo_dataset(dataset, str(base)))
        return cache[dataset]

    return get


def bundle_dataset(bundle: str) -> str:
    """The dataset a bundle is for (its ``dataset_name``)."""
    return json.loads((BUNDLES / bundle / "configs" / "finetune.json").read_text())["dataset_name"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bundle_configs(bundle: str, *names: str) -> list[str]:
    """The config files of workflows and overlays ``names`` (``evaluate``: ``finetune.json`` + ``evaluate.json``)."""
    from tpp_monai.bundlegen import workflow_config_files

    files = [f for name in names for f in workflow_config_files(BUNDLES / bundle, name)]
    return list(dict.fromkeys(files))


def make_workflow(bundle: str, run_id: str, configs: tuple[str, ...], **overrides: object):
    from monai.bundle import ConfigWorkflow

    if "runs_dir" in overrides:  # keep every output of a test out of the repository's bundle folders
        overrides.setdefault("ckpt_dir", str(Path(str(overrides["runs_dir"])) / "models"))

    wf = ConfigWorkflow(
        config_file=bundle_configs(bundle, *configs),
        meta_file=str(BUNDLES / bundle / "configs" / "metadata.json"),
        logging_file=False,
        run_id=run_id,
        workflow_type="train",
        **overrides,
    )
    wf.initialize()
    return wf


def run_workflow(bundle: str, run_id: str, configs: tuple[str, ...] | None = None, **overrides: object):
    """Initialize, run and finalize a bundle workflow in-process; returns the workflow (its parser holds objects)."""
    wf = make_workflow(bundle, run_id, configs or (run_id, "demo"), **overrides)
    wf.run()
    wf.finalize()
    return wf


def run_cli(*args: str, cwd: Path = REPO, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m <args>`` in a subprocess and return the completed process (stdout+stderr captured)."""
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
