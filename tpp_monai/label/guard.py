"""What the MONAI Label app accepts from the network, checked before anything runs.

MONAI Label passes request parameters into bundle configs, where MONAI evaluates strings starting with ``$``
(Python expressions), resolves ``@`` (references) and ``%`` (macros reading other config files); it joins image ids,
label tags and model file names to folders without checking where the result lands. This module holds the rules
the app applies instead (no ``monailabel`` import, so they are testable in the main environment):

* :func:`refuse_expressions`: no string anywhere in a request starts with ``$``, ``@`` or ``%``;
* :class:`Param` and :func:`check_params`: each endpoint accepts a fixed set of parameters, each with a type and a
  range, and names every bad one in a single message;
* :func:`check_name`: an image id, label tag, session or client id is a plain name, never a path;
* :func:`confined`: a path given by a request resolves inside one of the folders the app allows;
* :func:`stratified_split` and :func:`check_scores`: a trained model is published only when its training set held
  every class and every validation score it recorded is finite.

Every refusal is a :class:`RequestRefused` carrying the HTTP status to answer with.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXPRESSION_PREFIXES = ("$", "@", "%")  # MONAI ConfigParser: expression, reference, macro
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+ -]{0,199}")  # an id or tag: no separator, no leading dot
DEVICE = re.compile(r"cpu|cuda(:\d{1,2})?")
DEFAULT_MAX_UPLOAD_MB = 256  # --conf max_upload_mb


class RequestRefused(ValueError):
    """A request the app will not run; ``status`` is the HTTP status to answer with (4xx)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def refuse_expressions(value: Any, where: str) -> None:
    """Refuse any string (at any depth of dicts and lists) that MONAI's config parser would evaluate or resolve."""
    bad = sorted(set(_expressions(value, where)))
    if bad:
        raise RequestRefused(
            f"{', '.join(bad)}: a value may not start with {' '.join(EXPRESSION_PREFIXES)} (the bundle config would "
            "evaluate it as code, a reference or a file macro); pass plain values"
        )


def _expressions(value: Any, where: str) -> Iterable[str]:
    if isinstance(value, str):
        if value.lstrip().startswith(EXPRESSION_PREFIXES):
            yield where
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _expressions(str(key), f"{where} key {key!r}")
            yield from _expressions(item, f"{where}[{key!r}]" if where else repr(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _expressions(item, f"{where}[{i}]")


def check_name(kind: str, value: Any) -> str:
    """``value`` as a plain name (letters, digits, ``_ . + - space``; no path separator, no leading dot)."""
    if not isinstance(value, str) or not NAME.fullmatch(value) or ".." in value:
        raise RequestRefused(
            f"{kind} {value!r} is not a plain name: use the id of an image in the studies folder (letters, digits, "
            "'_', '.', '-', no '/', '\\\\' or '..'), not a path"
        )
    return value


def confined(kind: str, path: str, roots: Sequence[str]) -> str:
    """``path`` resolved; refused unless it lies inside one of ``roots`` (symbolic links resolved on both sides)."""
    resolved = os.path.realpath(path)
    for root in roots:
        root = os.path.realpath(root)
        if resolved == root or resolved.startswith(root.rstrip(os.sep) + os.sep):
            return resolved
    raise RequestRefused(f"{kind} {path!r} is outside the folders this server may use ({', '.join(roots)})")


@dataclass(frozen=True)
class Param:
    """One accepted request parameter: its types and a check of its value, described for the error message."""

    types: tuple[type, ...]
    allowed: str
    valid: Callable[[Any], bool] = lambda _: True

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) and bool not in self.types:  # bool is an int, but never a valid number here
            return False
        return isinstance(value, self.types) and self.valid(value)


def choice(values: Collection[Any], describe: str | None = None) -> Param:
    """A parameter that must be one of ``values``; of a list (an option list sent back unchanged) MONAI Label uses
    the first item, so that one is checked (every item is checked for expressions anyway)."""
    return Param((str, list), describe or f"one of {sorted(map(str, values))}", lambda v: _first(v) in values)


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, list) and value else value


def number(kind: type, low: float, high: float, *, high_open: bool = False) -> Param:
    types: tuple[type, ...] = (int,) if kind is int else (int, float)
    bound = "<" if high_open else "<="
    return Param(types, f"a{'n integer' if kind is int else ' number'} with {low} <= value {bound} {high}",
                 lambda v: math.isfinite(v) and low <= v and (v < high if high_open else v <= high))  # fmt: skip


BOOL = Param((bool,), "true or false")
NAME_PARAM = Param((str,), "a plain name", lambda v: v == "" or bool(NAME.fullmatch(v)))
# MONAILabelClient sends client_id=null unless given one (3D Slicer and OHIF send their user's id): the default client
CLIENT_ID_PARAM = Param((str, type(None)), "a plain name or null", lambda v: v is None or NAME_PARAM.valid(v))
DEVICE_PARAM = Param((str, list), "'cpu', 'cuda' or 'cuda:<n>'",
                     lambda v: isinstance(_first(v), str) and bool(DEVICE.fullmatch(_first(v))))  # fmt: skip


def check_params(params: Mapping[str, Any], accepted: Mapping[str, Param], where: str) -> None:
    """Refuse unknown parameters, expressions and values of the wrong type or range, all named in one message."""
    refuse_expressions(params, where)
    problems = []
    for key, value in params.items():
        spec = accepted.get(key)
        if spec is None:
            problems.append(f"unknown parameter {key!r} (accepted: {', '.join(sorted(accepted))})")
        elif not spec.accepts(value):
            problems.append(f"{key}={json.dumps(value)[:80]} is not {spec.allowed}")
    if problems:
        raise RequestRefused(f"{where}: " + "; ".join(problems))


def parse_params(text: str | bytes | None, where: str) -> dict[str, Any]:
    """A request's JSON parameters as a dict, refused when they are not a JSON object."""
    if not text:
        return {}
    try:
        params = json.loads(text)
    except ValueError as err:
        raise RequestRefused(f"{where}: the parameters are not valid JSON ({err})") from None
    if not isinstance(params, dict):
        raise RequestRefused(f"{where}: the parameters must be a JSON object, not {type(params).__name__}")
    return params


# --------------------------------------------------------------------------------------------------------------
# Publishing a trained model


def stratified_split(records: Sequence[Mapping[str, Any]], classes: Sequence[str], val_split: float,
                     seed: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:  # fmt: skip
    """Training and validation records of a classification datalist (``label``: class index), split per class.

    Refused when a class has no image at all: a model trained without it cannot be validated for it (its AUC is
    NaN). Each class keeps at least one training image; a class with two or more images gets at least one
    validation image when ``val_split > 0``.
    """
    by_class: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(classes))}
    for rec in records:
        by_class[int(rec["label"])].append(dict(rec))
    missing = [classes[i] for i, recs in by_class.items() if not recs]
    if missing:
        counts = ", ".join(f"{classes[i]}: {len(r)}" for i, r in by_class.items())
        raise RequestRefused(
            f"the training set must hold every class; no image has class {', '.join(missing)} ({counts}); set "
            "classes with PUT /datastore/image/info"
        )
    rng = random.Random(seed)
    train: list[dict[str, Any]] = []
    val: list[dict[str, Any]] = []
    for recs in by_class.values():
        rng.shuffle(recs)
        n_val = 0 if val_split <= 0 or len(recs) < 2 else min(len(recs) - 1, max(1, round(len(recs) * val_split)))
        val += recs[:n_val]
        train += recs[n_val:]
    return train, val


def missing_classes(present: Iterable[int], classes: Sequence[str]) -> list[str]:
    """Names of the classes (index = position) not among ``present``."""
    seen = set(present)
    return [name for i, name in enumerate(classes) if i not in seen]


def check_scores(history: str | Path, key: str) -> float:
    """The best of the validation scores ``key`` recorded in a run's ``history.csv``; refused when none was
    recorded or any is not finite (a NaN AUC means the validation set lacked a class)."""
    path = Path(history)
    rows = []
    if path.is_file():
        with path.open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get(key) not in (None, "")]
    if not rows:
        raise RequestRefused(f"{path}: no validation score {key!r} was recorded, so the model is not published", 422)
    bad = [f"epoch {r['epoch']}: {r[key]}" for r in rows if not math.isfinite(float(r[key]))]
    if bad:
        raise RequestRefused(
            f"validation score {key} is not finite ({'; '.join(bad)}), so the model is not published; the "
            "validation images probably lack a class: label more images of each class",
            422,
        )
    return max(float(r[key]) for r in rows)
