"""What a bundle says about itself: README (install step first, every overridable key with its default and
meaning, the ckpt_export command), LICENSE, large_files.yml, and ``python -m tpp_monai bundles --list``."""

from __future__ import annotations

import json

import yaml
from conftest import BUNDLES, REPO, run_cli

from tpp_monai.bundlegen import bundle_names
from tpp_monai.bundlegen.parts import NOT_SETTINGS


def test_readme_license_and_large_files_of_every_bundle() -> None:
    licence = (REPO / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0" in licence
    assert 'license = { text = "Apache-2.0" }' in (REPO / "pyproject.toml").read_text()
    for name in bundle_names():
        folder = BUNDLES / name
        readme = (folder / "docs" / "README.md").read_text()
        sections = [line for line in readme.splitlines() if line.startswith("## ")]
        assert sections[0] == "## Install" and "pip install" in readme.split("## ", 2)[1], name
        assert "ckpt_export network_def" in readme, name
        keys = set()
        for config in (folder / "configs").glob("*.json"):
            if config.stem not in ("metadata", "demo", "multi_gpu"):
                keys |= {k for k in json.loads(config.read_text()) if k not in NOT_SETTINGS and "#" not in k}
        table = {line.split("`")[1] for line in readme.splitlines() if line.startswith("| `")}
        assert keys <= table, (name, sorted(keys - table))
        assert (folder / "LICENSE").read_text() == licence
        text = (folder / "large_files.yml").read_text()
        files = yaml.safe_load(text)["large_files"]
        assert files and all(f["url"].startswith("https://") and f["path"].startswith("models/") for f in files)
        # an entry without a hash says why (the publisher states none)
        assert text.count("# no hash: ") == sum(not f["hash_val"] for f in files), name


def test_list_names_every_bundle_with_its_workflows() -> None:
    proc = run_cli("tpp_monai", "bundles", "--list")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()}
    assert set(rows) == set(bundle_names())
    assert rows["glas_adapter"][1:5] == ["glas", "seg", "adapter", "medcoss_vit_b16"]
    assert "pretrain_tpp" in rows["lits_conv_adapter"] and "pretrain_tpp" not in rows["mhist_full_finetune"]
    assert rows["lits_full_finetune"][-3:] == ["finetune", "evaluate", "inference"]
