"""The TPP stage's settings that depend on the pretext (MAE, DINO, MIM), resolved for the configs."""

from __future__ import annotations

_UNSET = object()


def pretext_setting(pretext: str, mae: object, dino: object, mim: object = _UNSET) -> object:
    """The value of a TPP-stage setting for ``pretext`` (the paper's MAE recipe, DINO's own, MIM's); for an unknown
    pretext an :class:`~tpp_monai.checks.Unresolved`, so the preflight names the pretext with the other problems."""
    from tpp_monai.checks import Unresolved
    from tpp_monai.errors import ConfigError
    from tpp_monai.pretext import check_pretext

    try:
        value = {"mae": mae, "dino": dino, "mim": mim}[check_pretext(pretext)]
    except ConfigError as err:
        return Unresolved(err)
    if value is _UNSET:
        raise ConfigError(f"this config sets no TPP value for pretext {pretext!r}; use --pretext mae or dino")
    return value


def pretext_lr(pretext: str, batch_size: int, mae: float, dino_base: float, mim: float | None = None) -> float:
    """The TPP stage's learning rate: MAE's ``mae`` and MIM's ``mim`` as given (paper §4.2: the rate it tuned for
    target parameters); DINO's linear scaling rule ``dino_base * batch_size / 256``."""
    from tpp_monai.checks import Unresolved

    value = pretext_setting(pretext, mae, dino_base * int(batch_size) / 256, _UNSET if mim is None else mim)
    return value if isinstance(value, Unresolved) else float(value)
