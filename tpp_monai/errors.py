"""Errors a user can cause. Each message names the offending thing, what was expected, and what to do."""

from __future__ import annotations

from collections.abc import Iterable


class UserError(ValueError):
    """Bad input from a user (a path, a file, a config value). The CLI prints its message without a traceback."""


class DatasetError(UserError):
    """A dataset folder, file or datalist does not match what the builder or a workflow expects."""


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable, corrupt, or was written for another model, method or backbone."""


class ConfigError(UserError):
    """An unknown or inconsistent option: a method, dataset, pretext or option name, or a value out of range."""


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; usually a learning rate too high or a mixed-precision overflow."""


def unknown_choice(kind: str, value: object, allowed: Iterable[str], where: str = "") -> ConfigError:
    """Build the error for a value that is not one of the allowed names."""
    where = f" (from {where})" if where else ""
    return ConfigError(f"unknown {kind} {value!r}{where}; valid {kind}s: {', '.join(sorted(allowed))}")
