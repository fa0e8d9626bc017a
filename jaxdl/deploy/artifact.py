"""The exported artifact's on-disk contract, shared by the writer (export) and the reader
(predict): MODEL.jaxexport (jax.export's serialized StableHLO) + MODEL.jaxexport.json."""

from __future__ import annotations

from pathlib import Path

FORMAT = "jaxdl.export"  # the sidecar's "format" value
FORMAT_VERSION = 1
REEXPORT = "Fix: re-export with `jaxdl export`."


def sidecar_path(path: str | Path) -> Path:
    """MODEL.jaxexport -> MODEL.jaxexport.json"""
    return Path(f"{path}.json")
