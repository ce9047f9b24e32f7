"""Checkpoint files that are never half-written and are checked when read.

:func:`atomic_save` writes to a temporary file in the same folder, flushes it to disk and renames it over the
target, so a crash or a full disk leaves the previous file intact. Each file carries a SHA-256 digest of its tensors
and values; :func:`load_verified` recomputes it and refuses a file whose content does not match.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from tpp_monai.backbones.checkpoint import read_file
from tpp_monai.errors import CheckpointError

DIGEST_KEY = "__sha256__"


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


def atomic_save(obj: Mapping, path: str | Path) -> Path:
    """Write ``obj`` (a dict) to ``path`` atomically, with a content digest.

    Raises:
        CheckpointError: the file could not be written (e.g. the disk is full); the previous file is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(obj)
    payload[DIGEST_KEY] = content_digest(obj)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        hint = " (the disk is full)" if err.errno == errno.ENOSPC else ""
        raise CheckpointError(
            f"could not write checkpoint {path}: {err.strerror or err}{hint}; "
            "the previous checkpoint, if any, is intact"
        ) from None
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


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
