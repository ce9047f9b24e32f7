"""Checkpoint files that are never half-written and are checked when read.

:func:`atomic_save` writes to a temporary file in the same folder, flushes it to disk, reads it back and renames it
over the target, so a crash or a full disk leaves the previous file intact. Each file carries a SHA-256 digest of its
tensors and values; :func:`load_verified` recomputes it and refuses a file whose content does not match.
:func:`read_file` reads any checkpoint (the public backbone formats too) with weights-only unpickling;
:func:`check_writable_file` checks an output file argument before any work.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import io
import json
import os
import pickle
import re
import signal
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from tpp_monai.errors import CheckpointError, ConfigError

DIGEST_KEY = "__sha256__"
FAULT_ENV = "TPP_MONAI_FAULT"
_FAULT_PASSES: dict[str, int] = {}


# Which container entry holds the weights, by checkpoint source (for the re-save hint of pickled files).
CONTAINER_SOURCES = (
    ("model", "MedCoSS"), ("state_dict", "nnU-Net v1 / STU-Net, Lightning"), ("network_weights", "nnU-Net v2"),
    ("teacher", "DINO training runs"),
)  # fmt: skip

# Objects found in the public containers next to the weights (MedCoSS stores its argparse namespace, nnU-Net numpy
# scalars); allow-listed so that files load with torch.load(weights_only=True).
_SAFE_GLOBALS = [argparse.Namespace, np.dtype, np.ndarray]
for _name in ("scalar", "_reconstruct"):
    for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        with contextlib.suppress(ImportError, AttributeError):
            # under the name in the file: numpy 1 (the released nnU-Net/STU-Net files) pickles numpy.core.*
            _SAFE_GLOBALS.append((getattr(__import__(_mod, fromlist=[_name]), _name), f"{_mod}.{_name}"))
_SAFE_GLOBALS += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]


def read_file(path: str | Path) -> object:
    """``torch.load`` a checkpoint on the CPU with weights-only unpickling (``.safetensors`` files through
    safetensors); errors name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): not a PyTorch checkpoint; write or download it again")
    if path.suffix == ".safetensors":  # a flat state dict (e.g. a model.safetensors of timm or huggingface)
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:  # safetensors raises its own SafetensorError and OSError for foreign files
            raise CheckpointError(f"{path} is not a readable safetensors file: {_first_line(err)}") from None
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} holds pickled objects that are not plain weights ({_first_line(err)}); "
            "re-save only the state dict: torch.save(ckpt[KEY], 'weights.pt') with KEY the entry that holds the "
            f"weights ({', '.join(f'{k!r} for {src}' for k, src in CONTAINER_SOURCES)})"
        ) from None
    except Exception as err:  # torch.load raises many types for foreign files (EOFError, KeyError, zipfile, ...)
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {_first_line(err)}"
        ) from None


def _first_line(err: BaseException) -> str:
    """The first line of an error's message, or its type when the message is empty (``EOFError()``)."""
    lines = str(err).strip().splitlines()
    if not lines or isinstance(err, KeyError):
        return f"{type(err).__name__} {lines[0] if lines else ''}".strip()
    return lines[0]


def content_digest(obj: object) -> str:
    """SHA-256 over the tensors (dtype, shape, bytes) and plain values of a nested checkpoint, in key order."""
    digest = hashlib.sha256()

    def visit(value: object) -> None:
        if isinstance(value, Tensor):
            t = value.detach().cpu().contiguous()
            digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(value, Mapping):
            for key in sorted(value, key=str):
                if key != DIGEST_KEY:
                    digest.update(f"K{key!s}".encode())
                    visit(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(f"L{len(value)}".encode())
            for item in value:
                visit(item)
        else:
            digest.update(f"V{value!r}".encode())

    visit(obj)
    return digest.hexdigest()


def fault_point(filename: str, point: str) -> None:
    """Test hook for kills inside a save: ``TPP_MONAI_FAULT=<file name>:<point>[:<n>]`` sends this process SIGKILL
    the n-th time (default 1) the save of that file reaches ``point`` (``written``: the temporary file is complete
    and synced, nothing renamed yet; ``replaced``: the new file is in place, the file it replaces not yet removed)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    name, where, *count = spec.split(":")
    if (name, where) != (filename, point):
        return
    _FAULT_PASSES[spec] = _FAULT_PASSES.get(spec, 0) + 1
    if _FAULT_PASSES[spec] == int(count[0] if count else 1):
        os.kill(os.getpid(), signal.SIGKILL)


def atomic_save(obj: Mapping, path: str | Path) -> Path:
    """Write ``obj`` (a dict) to ``path`` atomically, with a content digest (:func:`atomic_write`)."""
    payload = dict(obj)
    payload[DIGEST_KEY] = content_digest(obj)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return atomic_write(buffer.getvalue(), path)


def atomic_write(data: bytes, path: str | Path) -> Path:
    """Write ``data`` to ``path`` atomically.

    The bytes go to a temporary file in the same folder, are synced, read back and compared with what was meant to
    be written, and only then renamed over ``path``; a file ``path`` replaces is untouched until that rename.

    Raises:
        CheckpointError: the file could not be written or verified (e.g. the disk is full); ``path`` is unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    existed = path.is_file()
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fault_point(path.name, "written")
        if hashlib.sha256(tmp.read_bytes()).digest() != hashlib.sha256(data).digest():
            raise OSError(errno.EIO, "the bytes read back differ from the bytes written")
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        hint = " (the disk is full)" if err.errno == errno.ENOSPC else ""
        kept = f"{path.name} keeps its previous content" if existed else f"{path.name} was not created"
        raise CheckpointError(f"could not write checkpoint {path}: {err.strerror or err}{hint}; {kept}") from None
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


_TEMP_NAME = re.compile(r"^\..+\.tmp(\d+)$")


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON so that a reader (or a killed writer) never leaves or sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def remove_stale_temp_files(*folders: str | Path) -> list[Path]:
    """Delete the temporary files that writes killed before their rename left in ``folders`` (``.<name>.tmp<pid>``
    of processes that no longer run); returns what was deleted."""
    removed = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            match = _TEMP_NAME.match(path.name)
            if match and path.is_file() and not _process_alive(int(match.group(1))):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process writes no file before it cleans up
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_verified(path: str | Path) -> dict:
    """Read a checkpoint written by :func:`atomic_save` and check its digest; other dict checkpoints load as is."""
    obj = read_file(path)
    if isinstance(obj, dict) and DIGEST_KEY in obj:
        stored = obj.pop(DIGEST_KEY)
        if content_digest(obj) != stored:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: its content does not match the digest written with it; "
                "delete it and resume from an earlier checkpoint, or re-run the stage that wrote it"
            )
    return obj


def check_writable_file(path: str | Path, option: str = "--out") -> Path:
    """Make sure ``path`` can be written (its folder created if needed) before any work, or raise a
    :class:`ConfigError` naming the option, the path and why."""

    out = Path(path).expanduser()
    if out.is_dir():
        raise ConfigError(f"{option} {path} is a folder; give the path of the file to write")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.parent / f".{out.name}.writable{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"{option} {path}: cannot write there ({err.strerror or err}: {err.filename or out.parent}); "
            "choose a file in a folder you can write"
        ) from None
    return out
