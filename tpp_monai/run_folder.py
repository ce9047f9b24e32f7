"""A run folder owned by one run at a time, resumed only with the settings that started it.

* :func:`claim_folders`: an exclusive ``flock`` on ``<folder>/.lock`` (held until the process ends, so ``kill -9``
  frees it) refuses a second run on the same output or model folder, naming the folder and the holder's pid; the
  temporary files of writes killed before their rename are deleted once the folder is ours.
* :func:`check_resume_settings`: a resumed run must use the settings recorded in ``settings.json`` by the run that
  wrote the checkpoints, except those that cannot change the result (loader workers, device, more epochs...).
* the rows of ``history.csv`` written after the checkpoint a run resumes from are dropped by
  :class:`tpp_monai.handlers.HistoryWriter`, so a kill and resume never leaves duplicate epochs.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Mapping
from pathlib import Path

from tpp_monai.errors import ConfigError

LOCK_NAME = ".lock"
_HELD: dict[str, int] = {}  # resolved folder -> open file descriptor holding its lock (for this process's lifetime)

# Settings a resumed run may change: they select hardware, logging or paths of this invocation, not the numbers.
RESUME_FREE = {"resume", "num_workers", "device", "amp", "distributed", "activation_checkpointing", "cache_rate",
               "run_name", "tracking_uri", "experiment_name", "bundle_root", "runs_dir", "output_dir",
               "ckpt_dir"}  # fmt: skip
# Settings a resumed run may raise (never lower): the run continues further from where it stopped.
RESUME_RAISABLE = {"epochs", "tpp_epochs", "iterations"}


def _is_rank0() -> bool:
    from tpp_monai.handlers import is_rank0

    return is_rank0()


def claim_folder(folder: str | Path) -> None:
    """Lock ``folder`` for this process (rank 0), or raise a :class:`ConfigError` naming the run that holds it."""
    if not _is_rank0():
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    if key in _HELD:
        return
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ConfigError(
            f"{folder} is in use by another run (pid {holder}, lock file {path}); wait for that run to end, or "
            "choose another --output_dir (and --ckpt_dir) for this one"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = fd


def claim_folders(*folders: str | Path | None) -> None:
    """:func:`claim_folder` for each folder given, then delete stale temporary files in them and their
    ``checkpoints`` sub-folder."""
    from tpp_monai.io import remove_stale_temp_files

    given = [Path(f) for f in folders if f]
    for folder in given:
        claim_folder(folder)
    if _is_rank0():
        remove_stale_temp_files(*given, *(f / "checkpoints" for f in given))


def _plain(value: object) -> object:
    return json.loads(json.dumps(value, default=str))


def check_resume_settings(output_dir: str | Path, settings: Mapping, resume: object = True) -> None:
    """Refuse to resume (``resume``) the run in ``output_dir`` with settings that change its result (one message for
    all); settings missing from either record are not compared."""
    if not resume:
        return
    recorded_file = Path(output_dir) / "settings.json"
    if not recorded_file.is_file():
        return
    try:
        recorded = json.loads(recorded_file.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{recorded_file} is unreadable ({err}); start a new run with another --output_dir") from None
    new = _plain(dict(settings))
    changed = []
    for key, old in sorted(recorded.items()):
        if key not in new or key in RESUME_FREE or new[key] == old:
            continue
        if key in RESUME_RAISABLE and _at_least(new[key], old):
            continue
        changed.append(f"{key} was {old!r} and is {new[key]!r} now")
    if changed:
        raise ConfigError(
            f"cannot resume the run in {output_dir} with other settings: {'; '.join(changed)}. These change the "
            f"result; resume with the values recorded in {recorded_file} (only {', '.join(sorted(RESUME_RAISABLE))} "
            "may be raised), or start a new run with another --output_dir"
        )


def _at_least(new: object, old: object) -> bool:
    try:
        return float(new) >= float(old)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
