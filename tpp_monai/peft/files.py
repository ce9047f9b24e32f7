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
from pathlib import Path

from torch import Tensor, nn

from tpp_monai.errors import CheckpointError

TARGET_DIR = "tpp_target"
STATE_FILE = "target_state.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
RECORD_KEY, DIGEST_KEY = "tpp_monai", "tpp_monai_sha256"
LAYOUTS = ("tpp_monai", "peft")


def is_wrapped(model: nn.Module) -> bool:
    """Whether the model's method is a huggingface peft tuner (saved as a peft adapter folder)."""
    from tpp_monai.peft.targets import method_of

    return method_of(model).name.startswith("peft.")


def _digest(state: dict, record: dict, config: str | None) -> str:
    from tpp_monai.io import content_digest

    return content_digest({"state": state, "record": json.dumps(record, sort_keys=True), "config": config})


def write_target_folder(model: nn.Module, folder: str | Path, info: dict | None = None) -> Path:
    """Write the model's target parameters to ``folder`` in its method's layout (see the module docstring)."""
    from safetensors.torch import save

    from tpp_monai.io import atomic_write
    from tpp_monai.peft.targets import target_state

    folder = Path(folder)
    saved = target_state(model)
    record = {k: v for k, v in saved.items() if k != "state"} | dict(info or {}) | {"version": 2}
    if is_wrapped(model):
        from tpp_monai.peft import hf

        config, state, name = hf.adapter_config_text(model), hf.adapter_tensors(model), ADAPTER_WEIGHTS
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
    from tpp_monai.peft.targets import TARGET_FORMAT

    file = target_file(path)
    if file is None:
        raise CheckpointError(
            f"{path} holds no target parameters: expected the folder a pretrain_tpp run writes ({TARGET_DIR}/ with "
            f"{STATE_FILE}, or a peft adapter folder with {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})"
        )
    if file.suffix != ".safetensors":  # a target file of an earlier version, or a TPP training checkpoint
        from tpp_monai.io import load_verified

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
