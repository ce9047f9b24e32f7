"""The TPP stage's product: a folder of target parameters (``tpp_target/``) in safetensors, nothing to unpickle.

* built-in methods: ``target_state.safetensors``, the target tensors under the model's own parameter names;
* ``peft.*`` methods: a peft adapter folder, ``adapter_config.json`` + ``adapter_model.safetensors`` in peft's own
  layout, which ``peft.PeftModel.from_pretrained(backbone, folder)`` loads as any peft adapter.

The safetensors file carries in its metadata the record (method, options, backbone, and what the stage adds: pretext,
dataset, epoch) and a SHA-256 content digest over its tensors, the record and the adapter config; reading checks it.
Both files are written atomically (:func:`tpp_monai.io.atomic_write`), the config first; the config of a run never
changes between its epochs (a resume must use the same settings), so the pair is always consistent. One ``tpp_ckpt``
setting names the folder for either layout. Target files of earlier versions (``tpp_target.pt``, a weights-only torch
file of :func:`tpp_monai.peft.target_state`) are still read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from tpp_monai.compat import import_peft
from tpp_monai.errors import CheckpointError
from tpp_monai.io import atomic_write, content_digest, load_verified
from tpp_monai.peft.hf_tuners import ADAPTER, first_line, peft_model, quiet
from tpp_monai.peft.targets import TARGET_FORMAT, method_of, target_parameter_names, target_state

TARGET_DIR = "tpp_target"
STATE_FILE = "target_state.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
RECORD_KEY, DIGEST_KEY = "tpp_monai", "tpp_monai_sha256"
LAYOUTS = ("tpp_monai", "peft")


def is_wrapped(model: nn.Module) -> bool:
    """Whether the model's method is a huggingface peft tuner (saved as a peft adapter folder)."""

    return method_of(model).name.startswith("peft.")


def _digest(state: dict, record: dict, config: str | None) -> str:

    return content_digest({"state": state, "record": json.dumps(record, sort_keys=True), "config": config})


def write_target_folder(model: nn.Module, folder: str | Path, info: dict | None = None) -> Path:
    """Write the model's target parameters to ``folder`` in its method's layout (see the module docstring)."""
    from safetensors.torch import save

    folder = Path(folder)
    saved = target_state(model)
    record = {k: v for k, v in saved.items() if k != "state"} | dict(info or {}) | {"version": 2}
    if is_wrapped(model):
        config, state, name = adapter_config_text(model), adapter_tensors(model), ADAPTER_WEIGHTS
        atomic_write(config.encode(), folder / ADAPTER_CONFIG)
    else:
        config, state, name = None, {k: v.contiguous() for k, v in saved["state"].items()}, STATE_FILE
    metadata = {
        "format": "pt",
        RECORD_KEY: json.dumps(record, sort_keys=True),
        DIGEST_KEY: _digest(state, record, config),
    }
    atomic_write(save(state, metadata=metadata), folder / name)
    return folder


def target_file(path: str | Path) -> Path | None:
    """The file holding the target tensors at ``path`` (a target folder of either layout, or a file), or ``None``."""
    path = Path(path)
    if path.is_file():
        return path
    for name in (STATE_FILE, ADAPTER_WEIGHTS):
        if (path / name).is_file():
            return path / name
    return None


def exists(path: str | Path) -> bool:
    """Whether ``path`` holds target parameters (a complete target folder, or a file)."""
    return target_file(path) is not None


def read_record(path: str | Path) -> dict:
    """The target parameters at ``path`` with their record: ``format``, ``method``, ``options``, ``backbone``, what
    the stage added (``pretext``, ``epoch``...), ``state`` (the tensors, in the layout's names) and ``layout``
    (``"tpp_monai"``: model parameter names; ``"peft"``: peft's adapter layout). Digests are checked."""

    file = target_file(path)
    if file is None:
        raise CheckpointError(
            f"{path} holds no target parameters: expected the folder a pretrain_tpp run writes ({TARGET_DIR}/ with "
            f"{STATE_FILE}, or a peft adapter folder with {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})"
        )
    if file.suffix != ".safetensors":  # a target file of an earlier version, or a TPP training checkpoint
        source = load_verified(file)
        if "target_state" in source and "format" not in source:
            source = source["target_state"]
        return {**source, "layout": "tpp_monai"}
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
        state: dict[str, Tensor] = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupt?): {err}") from None
    if RECORD_KEY not in metadata:
        raise CheckpointError(
            f"{file} has no {RECORD_KEY!r} record: it was not written by a pretrain_tpp run "
            "(a peft adapter saved elsewhere lacks the method, options and backbone to check)"
        )
    record = json.loads(metadata[RECORD_KEY])
    layout = "peft" if file.name == ADAPTER_WEIGHTS else "tpp_monai"
    config = None
    if layout == "peft":
        config_file = file.with_name(ADAPTER_CONFIG)
        if not config_file.is_file():
            raise CheckpointError(f"{file.parent} lacks {ADAPTER_CONFIG} next to {file.name}")
        config = config_file.read_text()
    if metadata.get(DIGEST_KEY) != _digest(state, record, config):
        raise CheckpointError(
            f"{file.parent if layout == 'peft' else file} is corrupt: its content does not match the digest written "
            "with it; re-run the pretrain_tpp stage that wrote it"
        )
    if record.get("format") != TARGET_FORMAT:
        raise CheckpointError(f"{file} is not a target-parameter file (format {record.get('format')!r})")
    return {**record, "state": state, "layout": layout}


def record_info(path: str | Path) -> dict:
    """The record of the target parameters at ``path`` without their tensors (pretext, epoch, method...)."""
    return {k: v for k, v in read_record(path).items() if k != "state"}


# ----- peft adapter folders --------------------------------------------------------------------------------------
def adapter_config_text(model: nn.Module) -> str:
    """``adapter_config.json`` as peft's ``save_pretrained`` writes it (sets as sorted lists)."""
    pm = peft_model(model)
    config = pm.peft_config[ADAPTER].to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    return json.dumps(config, indent=2, sort_keys=True, default=str)


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors in peft's checkpoint layout (``base_model.model.<layer>.lora_A.weight``...)."""
    peft = import_peft()
    state = peft.get_peft_model_state_dict(peft_model(model), adapter_name=ADAPTER)
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def load_adapter_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor], where: str) -> list[str]:
    """Load adapter tensors in peft's checkpoint layout into ``model``; returns the target parameters loaded."""
    peft = import_peft()
    try:
        with quiet():
            result = peft.set_peft_model_state_dict(peft_model(model), dict(tensors), adapter_name=ADAPTER)
    except RuntimeError as err:  # size mismatches
        raise CheckpointError(f"the adapter tensors in {where} do not fit the model: {first_line(err)}") from None
    missing = set(result.missing_keys)
    names = target_parameter_names(model)
    absent = [n for n in names if f"base_model.model.{n}" in missing]
    if result.unexpected_keys or absent:
        raise CheckpointError(f"the adapter tensors in {where} do not match the model: missing {absent[:5]}, "
                              f"unexpected {list(result.unexpected_keys)[:5]}")  # fmt: skip
    return names
