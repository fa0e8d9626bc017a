"""The one error type for user mistakes.

A `UserError` is bad input: a flag, a config value, a file, a checkpoint that does not fit.
Its message is one line naming the field or file, what was expected, what was found, and
the fix; the CLI prints it and exits with status 2. Every other exception is a bug in jaxdl
(or in a library under it) and keeps its traceback (exit status 1).

It subclasses `ValueError` so code that already catches `ValueError` keeps working.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input, reported in one line (exit status 2 from the CLI)."""


def warn(message: str) -> None:
    """One line on stderr for something the run recovered from but the user should know."""
    import sys

    print(f"jaxdl: warning: {message}", file=sys.stderr, flush=True)


class Stopped(Exception):
    """A run stopped by a signal after saving its state: not an error, not a bug. The CLI
    prints the message and exits with ``status`` (128 + the signal number)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status
