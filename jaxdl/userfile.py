"""Running a user's Python file: a config, or a file that registers a model.

Mistakes in the file itself are user errors that name the file and the line; an exception
raised below the file's own code is a bug somewhere else and keeps its traceback.
"""

from __future__ import annotations

import importlib.util
import traceback
from pathlib import Path
from typing import Any

from jaxdl.errors import UserError


def _line_in(path: Path, err: BaseException) -> int | None:
    """The innermost line of `path` in the traceback of `err` (None if it never ran there)."""
    # Frames name the file as Python opened it (absolute); `path` may be relative.
    here = path.resolve()
    frames = [f for f in traceback.extract_tb(err.__traceback__) if Path(f.filename) == here]
    return frames[-1].lineno if frames else None


def run_user_file(path: Path, module_name: str, *, flag: str, then=None) -> Any:
    """Import a user's Python file (a config, a file that registers a model) and return
    ``then(module)``. Mistakes in the file itself (its syntax, its imports, an exception
    raised on one of its lines) are user errors naming `flag`, the file and the line; an
    exception raised deeper keeps its traceback."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        return then(module) if then is not None else None
    except UserError:
        raise
    except SyntaxError as err:
        where = f"line {err.lineno} of {err.filename}" if err.filename else str(path)
        raise UserError(
            f"{flag}: {path} does not parse: {err.msg} at {where}. Fix: correct that line."
        ) from None
    except ImportError as err:
        line = _line_in(path, err)
        raise UserError(
            f"{flag}: {path} line {line}: import failed ({type(err).__name__}: {err}). "
            f"Fix: install the module or correct the import on line {line}."
        ) from None
    except Exception as err:
        line = _line_in(path, err)
        if line is None or traceback.extract_tb(err.__traceback__)[-1].lineno != line:
            raise  # raised below the file's own code: keep the traceback
        raise UserError(
            f"{flag}: {path} line {line} raised {type(err).__name__}: {err}. "
            f"Fix: correct line {line}."
        ) from None
