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
