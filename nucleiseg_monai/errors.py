"""One line for an error that reaches a user of a bundle workflow: its cause, not MONAI's wrapping of it.

MONAI wraps what a config expression or component raises in a RuntimeError ("Failed to evaluate ConfigExpression",
"Failed to instantiate component"), once per reference on the way, and what a transform raises ("applying
transform"), and ignite handlers log the traceback, so a bad tile surfaces as 60-120 lines that end far from its
name. Our own errors (DataError, SettingError, ...) already name the file or setting and the fix: they are shown as
they are; the OS errors of writing (disk full, permission denied) get the fix added; anything else is shown with its
type and where in the config it happened.
"""

from __future__ import annotations

import errno
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager

WRAPPERS = ("Failed to evaluate", "Failed to instantiate", "applying transform")  # the last: monai.transforms

OS_FIXES = {
    errno.ENOSPC: "free space on that disk or write elsewhere",
    errno.EDQUOT: "free space within your quota or write elsewhere",
    errno.EACCES: "choose a place you can write to, or change its permissions",
    errno.EPERM: "choose a place you can write to, or change its permissions",
    errno.EROFS: "choose a place on a writable disk",
    errno.ENOENT: "check the path (or the setting that names it)",
}


def _is_wrapper(err: BaseException) -> bool:
    return type(err) is RuntimeError and str(err).startswith(WRAPPERS) and err.__cause__ is not None


def root_cause(err: BaseException) -> BaseException:
    """The exception MONAI's config wrappers were raised from (``err`` itself when it is no wrapper)."""
    while _is_wrapper(err):
        err = err.__cause__
    return err


def _flat(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _innermost_config(err: BaseException) -> str | None:
    """The config text (expression or component) whose evaluation raised the root cause, shortened."""
    text = None
    while _is_wrapper(err):
        message = str(err)
        component = re.match(r"Failed to instantiate (component '[^']*')", message)
        text = component[1] if component else _flat(message.split(":", 1)[-1])
        err = err.__cause__
    return text if text is None or len(text) <= 100 else text[:97] + "..."


def one_line(err: BaseException) -> str:
    cause = root_cause(err)
    if isinstance(cause, OSError) and cause.errno in OS_FIXES and cause.filename:
        return f"{cause.filename}: {cause.strerror}; {OS_FIXES[cause.errno]}"
    if isinstance(cause, (ValueError, OSError)):
        return _flat(str(cause))
    where = _innermost_config(err)
    line = f"{type(cause).__name__}: {_flat(str(cause))}"
    return line + (f" (in {where})" if where else "") + "; --debug shows the full traceback"


@contextmanager
def tracebacks_out_of_logs() -> Iterator[None]:
    """Log records lose their tracebacks for the duration: MONAI's StatsHandler logs the whole traceback of any
    exception in a run, before the one line that says what went wrong."""
    make_record = logging.getLogRecordFactory()

    def without_traceback(*args, **kwargs):
        record = make_record(*args, **kwargs)
        record.exc_info, record.exc_text = None, None
        return record

    logging.setLogRecordFactory(without_traceback)
    try:
        yield
    finally:
        logging.setLogRecordFactory(make_record)
