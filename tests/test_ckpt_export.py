"""``python -m monai.bundle ckpt_export`` as model-zoo CI runs it (``network_def`` of ``inference.json``, the bundle's
``models/model.pt`` as written by ``finetune``, no ``--key_in_ckpt``, no ``--use_trace``), for a classification, a 2D
segmentation and a 3D bundle on the demo overlay's small backbones; the TorchScript file gives the eager outputs."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import BUNDLES, run_cli

from tpp_monai.io import atomic_save


def _network(configs: list[str], bundle_root: str) -> torch.nn.Module:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(configs)
    parser["bundle_root"] = bundle_root
    return parser.get_parsed_content("network_def").eval()


@pytest.mark.parametrize("bundle", ["mhist_adapter", "glas_lora", "lits_conv_adapter"])
def test_ckpt_export_matches_eager(tmp_path, bundle) -> None:
    root = tmp_path / bundle
    shutil.copytree(BUNDLES / bundle, root)
    configs = [str(root / "configs" / "inference.json"), str(root / "configs" / "demo.json")]
    torch.manual_seed(0)
    trained = _network(configs, str(root))
    with torch.no_grad():  # every tensor away from its initial value, as after fine-tuning
        for p in trained.parameters():
            p.add_(0.05 * torch.randn_like(p))
    # the file finetune writes: the weights under "model", the run's provenance, a content digest
    atomic_save({"model": trained.network.state_dict(), "run_info": {"method": bundle}}, root / "models" / "model.pt")

    proc = run_cli(
        "monai.bundle", "ckpt_export", "network_def",
        "--filepath", str(root / "models" / "verify_model.ts"),
        "--ckpt_file", str(root / "models" / "model.pt"),
        "--meta_file", str(root / "configs" / "metadata.json"),
        "--config_file", str(configs),
        "--bundle_root", str(root),
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]

    exported = torch.jit.load(str(root / "models" / "verify_model.ts"))
    eager = _network(configs, str(root))
    eager.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=False))
    x = torch.rand(2, *eager.input_shape[1:], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = eager(x), exported(x)
        assert torch.allclose(want, trained(x), atol=1e-5)  # the file carried the trained weights
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())
