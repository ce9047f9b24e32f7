"""What a bundle says about itself: README (install step first, every overridable key with its default and
meaning, the ckpt_export command), LICENSE, large_files.yml, and ``python -m tpp_monai bundles --list``."""

from __future__ import annotations

import json

import yaml
from conftest import BUNDLES, REPO, run_cli

from tpp_monai.bundlegen import bundle_names
from tpp_monai.workflows.running_config import NOT_SETTINGS


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


def _restated(node: object) -> int:
    """The most top-level settings one mapping or list of a config passes on under their own name (``"lr": "@lr"``)."""
    if isinstance(node, dict):
        own = sum(isinstance(v, str) and v == f"@{k}" and k not in NOT_SETTINGS for k, v in node.items())
        return max([own, *(_restated(v) for v in node.values())])
    return max([0, *(_restated(v) for v in node)]) if isinstance(node, list) else 0


def test_configs_state_each_setting_once_and_check_in_one_step() -> None:
    """No block restates the top-level settings (the checks and the settings record read them from the config), one
    pre-run step does every check, and a 2D finetune.json stays short."""
    for name in bundle_names():
        for config in (BUNDLES / name / "configs").glob("*.json"):
            cfg = json.loads(config.read_text())
            # a component may take a few settings by name (build_network: backbone, method, ...), never a block
            assert _restated(cfg) <= 6, config
            init = [s.get("_target_") if isinstance(s, dict) else s for s in cfg.get("initialize", [])]
            if init:
                assert init[0] == "tpp_monai.workflows.prepare", (config, init)
                checks = ("check_", "validate_", "preflight_")
                assert not [t for t in init[1:] if str(t).rsplit(".", 1)[-1].startswith(checks)], (config, init)
        finetune = BUNDLES / name / "configs" / "finetune.json"
        if len(json.loads(finetune.read_text())["image_size"]) == 2:
            assert len(finetune.read_text().splitlines()) < 300, name
