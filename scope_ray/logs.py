"""Progress lines through the standard ``logging`` module.

Every stage, the demo, ``doctor`` and ``browse`` write their progress lines as INFO
records of the ``scope_ray`` logger (``info`` below is the default ``log`` of each of them). The
line already names its stage (``[extract] ...``), so one logger is enough and the message is the
whole line.

- From Python (a notebook): nothing is printed until logging is configured, as with any library;
  ``logging.basicConfig(level=logging.INFO)`` or ``scope_ray.logs.setup()`` shows the lines.
- The command line calls ``setup()``: the lines go to stdout as written, with terminal control
  codes (colours, cursor moves) removed, so that a log saved from stdout is plain text.
- A caller that wants the lines itself (a test, the demo's summary) still passes ``log=...``.
"""

from __future__ import annotations

import logging
import re
import sys

LOGGER = "scope_ray"
# OSC sequences with their payload (window titles, hyperlinks), CSI sequences (colours, cursor
# moves), other two-byte escapes, and the C0 controls except tab and newline.
_CONTROL = re.compile(r"\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]|[\x00-\x08\x0b-\x1f\x7f]")


def plain(text: str) -> str:
    """``text`` without terminal control codes; carriage returns go too (a saved log has no cursor)."""
    return _CONTROL.sub("", text)


def info(message: str) -> None:
    """One progress line: an INFO record of the ``scope_ray`` logger."""
    logging.getLogger(LOGGER).info(message)


class _Plain(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return plain(super().format(record))


class _CurrentStdout(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when the record is emitted (pytest's capture, a
    redirect made after set-up), not the stream that was current when the handler was made."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:  # StreamHandler.__init__ assigns it; the property decides
        pass


def setup(level: int | str = logging.INFO) -> logging.Logger:
    """Print ``scope_ray`` records on stdout, message only, control codes removed. Idempotent:
    calling it again (each CLI command, a worker process) adds no second handler, so no line is
    printed twice."""
    logger = logging.getLogger(LOGGER)
    if not any(isinstance(h, _CurrentStdout) for h in logger.handlers):
        handler = _CurrentStdout()
        handler.setFormatter(_Plain("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # a root handler the user configured would print each line again
    return logger


def worker_info(message: str) -> None:
    """A progress line from inside a Ray worker (a Train worker's step lines): the worker process
    has no set-up of its own, so its stdout handler is made on first use; Ray forwards that stdout
    to the driver, which prints it once, prefixed with the worker."""
    if not logging.getLogger(LOGGER).handlers:
        setup()
    info(message)
