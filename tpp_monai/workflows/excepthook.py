"""Errors a user can cause, printed as one message without a traceback, inside ``monai.bundle run``."""

from __future__ import annotations

import logging
import sys
from types import TracebackType

from tpp_monai.errors import UserError


def user_error_in(exc: BaseException | None) -> UserError | None:
    """The :class:`UserError` behind ``exc`` (MONAI wraps errors raised while it evaluates a config), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _log_user_errors_without_traceback() -> None:
    """Log records about a :class:`UserError` keep their message but lose the traceback: MONAI's ``StatsHandler``
    logs every exception an engine raises with ``logger.exception`` (on loggers made later, with handlers of their
    own), before the error reaches the excepthook. Set once, on the record factory every logger uses."""
    make_record = logging.getLogRecordFactory()
    if getattr(make_record, "_tpp_monai", False):
        return

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        if record.exc_info and user_error_in(record.exc_info[1]) is not None:
            record.exc_info = None
        return record

    factory._tpp_monai = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


def install_excepthook() -> None:
    """Print errors a user can cause (a :class:`UserError` anywhere in the chain) as one message, no traceback.

    MONAI wraps exceptions raised while it evaluates a config item in ``RuntimeError("Failed to evaluate ...")``;
    the hook finds the user error behind it. Other exceptions keep Python's normal traceback. Log records
    carry the user errors without their traceback too.
    """
    _log_user_errors_without_traceback()
    previous = sys.excepthook
    if getattr(previous, "_tpp_monai", False):
        return

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        err = user_error_in(value)
        if err is None:
            previous(kind, value, tb)
            return
        print(f"error: {err}", file=sys.stderr)

    hook._tpp_monai = True  # type: ignore[attr-defined]
    sys.excepthook = hook
