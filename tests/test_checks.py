"""Bad settings and bad data are named in one message before anything is built or trained."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import bundle_configs, make_workflow, run_cli
from PIL import Image

from tpp_monai.errors import UserError
from tpp_monai.workflows import user_error_in


def _refusal(bundle: str, run_id: str, **overrides: object) -> str:
    """The user error a workflow raises while it is initialized or its data are built, before its first step."""
    steps = []
    with pytest.raises(Exception) as err:
        config = "inference" if run_id == "run" else run_id
        wf = make_workflow(bundle, run_id, (config, "demo"), **overrides)
        engine = wf.parser.get_parsed_content("train#trainer" if run_id != "run" else "evaluator")
        engine.add_event_handler("iteration_started", lambda e: steps.append(1))
        wf.run()
    assert not steps, "a step ran before the error"
    user = user_error_in(err.value)
    assert isinstance(user, UserError), f"not a user error: {err.value!r}"
    return str(user)


# --------------------------------------------------------------------------------------------------------------
# Settings


@pytest.mark.parametrize(
    ("run_id", "key", "value", "allowed"),
    [
        ("pretrain_tpp", "tpp_epochs", "abc", "an integer >= 1"),
        ("pretrain_tpp", "tpp_epochs", 0, "an integer >= 1"),
        ("pretrain_tpp", "lr", -0.1, "a number > 0"),
        ("pretrain_tpp", "lr", "fast", "a number > 0"),
        ("pretrain_tpp", "batch_size", 0, "an integer >= 1"),
        ("finetune", "val_interval", 0, "an integer >= 1"),
        ("finetune", "label_fraction", 1.5, "a number in (0, 1], or None"),
    ],
)
def test_a_bad_setting_is_named_with_its_value_and_range(tmp_path, demo_roots, run_id, key, value, allowed) -> None:
    message = _refusal("glas_lora", run_id, runs_dir=str(tmp_path), dataset_dir=str(demo_roots("glas")),
                       tpp_ckpt="none", **{key: value})  # fmt: skip
    assert f"{key} {value!r}: expected {allowed}" in message, message
    assert not (tmp_path / run_id).exists(), "the run folder was made before the settings were checked"


def test_bad_settings_and_missing_inputs_on_the_command_line_are_named_in_one_message(tmp_path, demo_roots) -> None:
    """``--epochs`` of fine-tuning is computed from the data by default; the command line's value is checked
    before the data are read. Both missing checkpoints are named together, before any model is built."""
    configs = str(bundle_configs("glas_lora", "finetune", "demo"))
    missing_tpp, missing_backbone = tmp_path / "nope" / "tpp_target.pt", tmp_path / "nope" / "backbone.pth"
    proc = run_cli("monai.bundle", "run", "finetune", "--config_file", configs, "--runs_dir", str(tmp_path),
                   "--dataset_dir", str(demo_roots("glas")), "--epochs", "abc", "--lr", "fast", "--tpp_ckpt",
                   str(missing_tpp), "--backbone_ckpt", str(missing_backbone))  # fmt: skip
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    message = proc.stderr[proc.stderr.index("error:") :]
    for expected in ("4 setting(s) cannot be used", "epochs 'abc': expected an integer >= 1",
                     "lr 'fast': expected a number > 0", f"tpp_ckpt {missing_tpp}: not found",
                     f"backbone_ckpt {missing_backbone}: not found"):  # fmt: skip
        assert expected in message, message
    assert "Traceback" not in proc.stderr + proc.stdout


def test_a_run_missing_both_checkpoints_names_both_in_one_message(tmp_path, demo_roots) -> None:
    message = _refusal("mhist_adapter", "finetune", runs_dir=str(tmp_path), dataset_dir=str(demo_roots("mhist")),
                       tpp_ckpt=str(tmp_path / "a.pt"), backbone_ckpt=str(tmp_path / "b.pth"))  # fmt: skip
    assert f"tpp_ckpt {tmp_path / 'a.pt'}: not found" in message and "--tpp_ckpt none" in message
    assert f"backbone_ckpt {tmp_path / 'b.pth'}: not found" in message and "--backbone_ckpt none" in message


@pytest.mark.parametrize("run_id", ["pretrain_tpp", "finetune"])
def test_a_bad_method_is_named_with_the_other_bad_settings_in_one_message(tmp_path, demo_roots, run_id) -> None:
    """Registry names (method, backbone, pretext) are checked with the settings, not only when nothing else is
    wrong: the PEFT registry's own message for the method, beside the bad learning rate."""
    names = {"method": "lorra", "backbone": "vit_huge", "lr": "fast"}
    if run_id == "pretrain_tpp":
        names["pretext"] = "simclr"
    message = _refusal("glas_lora", run_id, runs_dir=str(tmp_path), dataset_dir=str(demo_roots("glas")),
                       tpp_ckpt="none", **names)  # fmt: skip
    assert f"{len(names)} setting(s) cannot be used" in message, message
    from tpp_monai.peft.registry import get_method

    with pytest.raises(UserError) as unknown:
        get_method("lorra", "method")
    assert str(unknown.value) in message and "valid PEFT methods: " in message and "lora" in message
    assert "unknown backbone 'vit_huge' (from backbone)" in message and "lr 'fast': expected a number > 0" in message
    if run_id == "pretrain_tpp":
        assert "unknown pretext 'simclr'" in message and "dino" in message
    assert not (tmp_path / run_id).exists()


def test_the_datalist_builder_refuses_an_unwritable_out_before_building(tmp_path, demo_roots) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "datalist.json"
    proc = run_cli("tpp_monai", "datalist", "glas", "--root", str(demo_roots("glas")), "--out", str(out))
    assert proc.returncode != 0
    assert f"--out {out}: cannot write there (" in proc.stderr and "choose a file in a folder you can write" in (
        proc.stderr
    ), proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------------------------------------
# Data


def _copy(demo_roots, dataset: str, tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "data"
    shutil.copytree(demo_roots(dataset), root)
    return root, json.loads((root / "datalist.json").read_text())


def _corrupt(path: Path) -> None:
    path.write_bytes(b"\x00garbage" * 50)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _zero(path: Path) -> None:
    path.write_bytes(b"")


def _damage_png(path: Path) -> None:
    """Flip bytes inside the image data: the PNG still opens, its chunk checksum fails."""
    data = bytearray(path.read_bytes())
    at = data.index(b"IDAT") + 12
    data[at : at + 4] = bytes(255 - b for b in data[at : at + 4])
    path.write_bytes(bytes(data))


def _other_size(path: Path) -> None:
    with Image.open(path) as im:
        im.resize((im.width // 2, im.height // 2), Image.NEAREST).save(path)


def _edit_volume(path: Path, change) -> None:
    img = nib.load(str(path))
    data, affine = np.asanyarray(img.dataobj).copy(), img.affine.copy()
    data, affine = change(data, affine)
    changed = nib.Nifti1Image(data, affine, img.header)
    changed.set_data_dtype(data.dtype)
    nib.save(changed, str(path))


def _fewer_slices(path: Path) -> None:
    _edit_volume(path, lambda d, a: (d[..., :16], a))


def _flipped_affine(path: Path) -> None:
    def flip(data, affine):
        affine[0, 0] = -affine[0, 0]
        return data, affine

    _edit_volume(path, flip)


def _nan_voxels(path: Path) -> None:
    def nan(data, affine):
        data = data.astype(np.float32)
        data[0, 0, 0], data[1, 1, 1] = np.nan, np.inf
        return data, affine

    _edit_volume(path, nan)


def _label_seven(path: Path) -> None:
    def seven(data, affine):
        data[0, 0, 0] = 7
        return data, affine

    _edit_volume(path, seven)


@pytest.mark.parametrize(
    ("dataset", "bundle", "key", "damage", "problem"),
    [
        ("glas", "glas_lora", "image", _corrupt, "unreadable (cannot decode it as an image"),
        ("glas", "glas_lora", "image", _truncate, "unreadable (cannot decode it as an image"),
        ("qata", "qata_lora", "image", _zero, "unreadable (cannot decode it as an image"),
        ("glas", "glas_lora", "label", _zero, "unreadable (cannot decode it as a mask image"),
        ("qata", "qata_lora", "image", _damage_png, "unreadable (cannot decode it as an image"),
        ("glas", "glas_lora", "label", _other_size, "mask size 48x32 differs from its image"),
        ("lits", "lits_conv_adapter", "image", _truncate, "unreadable (truncated"),
        ("lits", "lits_conv_adapter", "label", _fewer_slices, "segmentation shape (48, 48, 16) differs from its "
                                                              "volume"),
        ("lits", "lits_conv_adapter", "label", _flipped_affine, "affine differs from its volume"),
        ("lits", "lits_conv_adapter", "image", _nan_voxels, "NaN or infinite voxel values (2 voxels)"),
        ("lits", "lits_conv_adapter", "label", _label_seven, "label values [7] outside 0..2"),
    ],
    ids=["corrupt-image", "truncated-image", "zero-byte-image", "zero-byte-mask", "corrupt-png", "mask-other-size",
         "truncated-nifti", "seg-fewer-slices", "seg-flipped-affine", "nan-voxels", "label-7"],
)  # fmt: skip
def test_bad_data_is_named_before_the_first_step(tmp_path, demo_roots, dataset, bundle, key, damage, problem) -> None:
    root, datalist = _copy(demo_roots, dataset, tmp_path)
    bad = root / datalist["training"][1][key]
    damage(bad)
    message = _refusal(bundle, "finetune", runs_dir=str(tmp_path / "runs"), dataset_dir=str(root), tpp_ckpt="none")
    assert message.startswith("1 problem(s) in the training/validation data of"), message
    assert f"{bad}: {problem}" in message, message


def _inference_folder(demo_roots, tmp_path: Path) -> tuple[Path, list[Path]]:
    root = demo_roots("glas")
    folder = tmp_path / "images"
    folder.mkdir()
    images = []
    for record in json.loads((root / "datalist.json").read_text())["test"][:3]:
        images.append(Path(shutil.copy(root / record["image"], folder)))
    return folder, images


def test_a_corrupt_image_in_an_inference_folder_is_named_before_the_first_step(tmp_path, demo_roots) -> None:
    folder, images = _inference_folder(demo_roots, tmp_path)
    _corrupt(images[1])
    message = _refusal("glas_lora", "run", runs_dir=str(tmp_path), input_dir=str(folder),
                       ckpt_dir=str(tmp_path / "models"))  # fmt: skip
    assert f"{images[1]}: unreadable (cannot decode it as an image" in message
    assert "--skip_bad_files true" in message


def test_skip_bad_files_and_files_of_another_kind_are_skipped_with_a_note(tmp_path, demo_roots, caplog) -> None:
    from tpp_monai.checks import preflight_inference
    from tpp_monai.workflows import image_files

    folder, images = _inference_folder(demo_roots, tmp_path)
    _corrupt(images[0])
    (folder / "scan.nii.gz").write_bytes(b"")
    (folder / "slice.dcm").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="tpp_monai.checks"):
        kept = preflight_inference(image_files(str(folder)), "glas", skip_bad_files="true")
    assert [r["image"] for r in kept] == [str(p) for p in images[1:]]
    assert "skipping 2 file(s) that are not 2D images" in caplog.text and "scan.nii.gz, slice.dcm" in caplog.text
    assert f"skipping 1 unreadable input(s) (--skip_bad_files):\n  {images[0]}: unreadable" in caplog.text


@pytest.mark.parametrize(
    ("content", "problem"),
    [(b"", "is empty (0 bytes): not a PyTorch checkpoint"),
     (b"epoch,loss\n1,0.5\n", "is not a readable PyTorch checkpoint (truncated or corrupt?): ")],
    ids=["zero-byte", "text"],
)  # fmt: skip
def test_an_empty_or_text_checkpoint_is_named(tmp_path, content, problem) -> None:
    """tpp_ckpt, backbone_ckpt, model.pt and resume checkpoints are all read through ``load_verified``/``read_file``."""
    from tpp_monai.errors import CheckpointError
    from tpp_monai.io import load_verified

    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_verified(path)
    assert str(err.value).startswith(f"{path} {problem}"), str(err.value)
