"""Atomic file writes and JSON reads that name the file: the package's one way to do both.

A reader never sees a half-written file: bytes go to a temporary file unique to the
writer (two writers never share one), are fsynced, and replace the target with one
``os.replace``. The directory is fsynced too, so the new name survives a power cut.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jaxdl.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that opens files by name; on success it
    is fsynced and renamed to ``path``, on any exception removed."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):  # name the file asked for, not the temporary one
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (unique temp file, fsync, rename)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple | set):
        return list(value)
    raise TypeError(f"not JSON-serializable: {type(value).__name__}")


def _non_finite(obj: Any, prefix: str = "") -> str | None:
    """The path of the first NaN/Inf float in ``obj`` (None when all are finite)."""
    if isinstance(obj, float | np.floating) and not math.isfinite(obj):
        return prefix or "<value>"
    if isinstance(obj, dict):
        for k, v in obj.items():
            if (found := _non_finite(v, f"{prefix}.{k}" if prefix else str(k))) is not None:
                return found
    if isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            if (found := _non_finite(v, f"{prefix}[{i}]")) is not None:
                return found
    return None


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as strict JSON, atomically. A NaN or Inf is a bug in the caller (JSON
    has no such values): it raises ValueError naming the key instead of writing ``NaN``."""
    if (key := _non_finite(obj)) is not None:
        raise ValueError(f"{path}: {key} is not finite; JSON cannot hold it")
    text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default, allow_nan=False)
    atomic_write_text(path, text + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """The JSON document at ``path``; a file that is not valid JSON is a one-line UserError
    naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(
            f"{path}: expected a JSON file, found invalid JSON ({err}). Fix: restore or "
            "delete the file (a workdir's JSON files are rewritten by the run that owns them)."
        ) from err


def pid_alive(pid: int) -> bool:
    """Whether process `pid` (of this host and pid namespace) still runs: what tells the
    leftovers of a killed process from the files of a live one."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


# The disk refused: full, over quota, read-only, no permission. The user's disk, not a bug.
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


# How TensorStore (Orbax's writer) reports an OS error: in its message, not as an OSError.
_TENSORSTORE_ERROR = re.compile(r"os_error_code='?(\d+)")
_TENSORSTORE_PATH = re.compile(r'local file "([^"]+)"')


def _os_error(err: BaseException) -> tuple[int, str | None] | None:
    """(errno, path) of an OSError, or of a TensorStore error that wraps one; else None."""
    if isinstance(err, OSError):
        return (err.errno, err.filename) if err.errno is not None else None
    code = _TENSORSTORE_ERROR.search(str(err))
    if code is None:
        return None
    path = _TENSORSTORE_PATH.search(str(err))
    return int(code.group(1)), path.group(1) if path else None


class _DiskEchoes(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" records of disk errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        return err is None or disk_error(err) is None


def quiet_disk_echoes() -> None:
    """After a disk error has been reported: the save's other write tasks (Orbax writes an
    array's fragments in parallel asyncio tasks, and the first failure ends the save) fail
    the same way, and asyncio logs each, with its traceback, when the task is collected at
    exit: after the one line that already said it. Only disk errors are dropped."""
    logging.getLogger("asyncio").addFilter(_DiskEchoes())


def disk_error(err: BaseException) -> UserError | None:
    """The one-line UserError for an exception caused by a disk that refused (DISK_ERRORS),
    naming the path; None for anything else. Follows the exception's chain: libraries that
    write in threads (Orbax) re-raise the error inside their own exception."""
    seen: BaseException | None = err
    while seen is not None:
        found = _os_error(seen)
        if found is not None and found[0] in DISK_ERRORS:
            code, path = found
            return UserError(
                f"{path or 'a file'}: {os.strerror(code)} ({errno.errorcode[code]}); nothing "
                "half-written is kept. Fix: free space there or make it writable, or write "
                "elsewhere (another --workdir or --out)."
            )
        seen = seen.__cause__ or seen.__context__
    return None
