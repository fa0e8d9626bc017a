"""Import pretrained weights from other ecosystems into an ordinary jaxdl workdir.

    jaxdl import KIND --from PATH_OR_HUB_NAME --out WORKDIR

`IMPORTERS` maps each KIND to ``importer(kind, path, out) -> workdir.Imported``: `path` is
a local file or folder, `out` the absolute final workdir (for paths the config names, such
as the tokenizer). `import_checkpoint` resolves the source (a hub name is downloaded when
``huggingface_hub`` is installed and online), runs the importer and writes the workdir
(`jaxdl.interop.workdir`). Each family's mapping table lives in its own module.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxdl.errors import UserError
from jaxdl.interop import gguf, gpt2, hf, resnet, vit
from jaxdl.interop.readers import return_freed_memory_promptly
from jaxdl.interop.workdir import Imported, check_out, write_workdir

Importer = Callable[[str, Path, Path], Imported]

IMPORTERS: dict[str, Importer] = {
    "hf:gpt2": gpt2.import_gpt2,
    "hf:auto": hf.import_auto,
    **dict.fromkeys(hf.KINDS[1:], hf.import_llama),
    "gguf": gguf.import_gguf,
    **dict.fromkeys(resnet.KINDS, resnet.import_resnet),
    **dict.fromkeys(vit.KINDS, vit.import_vit),
}


def resolve_source(source: str) -> Path:
    """A local path as it is; else a Hugging Face hub repo id, downloaded to the hub cache."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    looks_like_repo = source.count("/") <= 1 and not source.startswith((".", "/", "~"))
    if not looks_like_repo:
        raise UserError(f"--from: no file or folder at {source}. Fix: check the path.")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise UserError(
            f"--from: {source!r} is not a local path and huggingface_hub is not installed. "
            "Fix: pass a local folder (save_pretrained's output) or `pip install huggingface_hub`."
        ) from err
    try:
        return Path(snapshot_download(source))
    except Exception as err:  # offline, unknown repo, auth: all end the same way for the user
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(
            f"--from: could not download {source!r} from the Hugging Face hub ({reason}). "
            "Fix: pass a local path to the model's folder or weights file instead."
        ) from err


def import_checkpoint(kind: str, source: str, out: str | os.PathLike) -> dict[str, Any]:
    """Import `source` as `kind` into the new workdir `out`; returns the import report."""
    if kind not in IMPORTERS:
        raise UserError(
            f"KIND: expected one of {sorted(IMPORTERS)}, found {kind!r}. "
            "Fix: pick a supported model kind."
        )
    out = Path(out).absolute()
    check_out(out)
    return_freed_memory_promptly()  # before the first leaf is read
    imported = IMPORTERS[kind](kind, resolve_source(source), out)
    return write_workdir(out, kind, imported)
