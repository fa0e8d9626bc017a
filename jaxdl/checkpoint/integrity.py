"""Digests of checkpoint steps: recorded when a step is saved, checked before it is read.

Every step directory holds ``jaxdl_digest.json``: the byte count of each file of its items
(``state/``, ``data/``, ``config/``) and the xxh3-64 hash of each 64 MiB chunk of it.
`Checkpointer` writes it from Orbax's post-finalization hook, i.e. inside
``<step>.orbax-checkpoint-tmp`` after every item is final and before Orbax renames the
directory, so a finalized step without a digest file was written before jaxdl recorded
digests. `verify_step` reads every listed file and compares, before Orbax opens a byte of
it: flipped or truncated bytes, deleted items and garbled JSON all stop here as one line
naming the file, instead of being restored as weights or failing deep inside tensorstore.
A step with no digest file at all loads unverified, with one warning line per process.

xxh3 (several GB/s per core, 4-5x zlib's crc32) detects accidental corruption, which is
the threat; it is not a defence against someone forging a checkpoint. Chunks are hashed
from a memory map on a thread pool; benchmarks/checkpoint_verify.py measures the cost
against the restore.

``python -m jaxdl.checkpoint.integrity STEP_DIR`` records the digest of a step written by
an older jaxdl, once you trust it: from then on it is verified like any other.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import xxhash

from jaxdl.errors import UserError, warn
from jaxdl.fileio import write_json

DIGEST_FILE = "jaxdl_digest.json"
_FORMAT = 1
_CHUNK = 64 << 20
_BLOCK = 1 << 20
# Steps without a digest already warned about in this process: one line per step, however
# many of its items a load reads.
_UNVERIFIED_WARNED: set[Path] = set()


class CorruptCheckpointError(UserError):
    """A step whose files do not match the digest recorded when it was saved."""


def _chunk_hash(path: Path, start: int) -> str:
    """xxh3 of the file's _CHUNK bytes from `start`, read _BLOCK at a time: a memory-mapped
    chunk stays resident until unmapped (64 MB per worker on the peak of a save, beside the
    state just saved: +108 MB on SmolLM2's import)."""
    digest, buffer = xxhash.xxh3_64(), bytearray(_BLOCK)
    with open(path, "rb", buffering=0) as f, memoryview(buffer) as view:
        f.seek(start)
        left = _CHUNK
        while left and (n := f.readinto(view[: min(left, _BLOCK)])):
            digest.update(view[:n])
            left -= n
    return digest.hexdigest()


def _item_files(step_dir: Path) -> list[str]:
    """Files of the step's items, relative to the step dir ("state/_METADATA", ...).

    Files directly in the step dir (Orbax's step metadata, updated when the step is
    committed, after the digest is taken) are not items and are not listed.
    """
    out = []
    for item in sorted(p for p in step_dir.iterdir() if p.is_dir()):
        for dirpath, _, filenames in os.walk(item):
            out.extend(str(Path(dirpath, f).relative_to(step_dir)) for f in filenames)
    return sorted(out)


def _hash_all(step_dir: Path, names: Iterable[str]) -> dict[str, tuple[int, list[str]]]:
    """name -> (size, hash of each chunk), the chunks of all files hashed in parallel."""
    sizes = {n: (step_dir / n).stat().st_size for n in names}
    jobs = [(n, start) for n, size in sizes.items() for start in range(0, size, _CHUNK)]
    workers = min(8, os.cpu_count() or 1, max(len(jobs), 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        hashes = list(pool.map(lambda job: _chunk_hash(step_dir / job[0], job[1]), jobs))
    out: dict[str, tuple[int, list[str]]] = {n: (size, []) for n, size in sizes.items()}
    for (name, _), digest in zip(jobs, hashes, strict=True):
        out[name][1].append(digest)
    return out


def write_digest(step_dir: str | os.PathLike) -> dict:
    """Record the byte count and chunk hashes of every item file of ``step_dir``; returns it."""
    step_dir = Path(step_dir)
    files = _hash_all(step_dir, _item_files(step_dir))
    record = {
        "format": _FORMAT,
        "algorithm": f"xxh3_64 per {_CHUNK >> 20} MiB chunk",
        "files": {name: {"bytes": size, "xxh3_64": h} for name, (size, h) in files.items()},
    }
    write_json(step_dir / DIGEST_FILE, record)
    return record


def verify_step(step_dir: str | os.PathLike, items: Iterable[str] | None = None) -> None:
    """Raise `CorruptCheckpointError` unless every recorded file of ``items`` (default: all)
    is present with its recorded size and hashes."""
    step_dir = Path(step_dir)
    fix = corrupt_step_fix(step_dir)
    path = step_dir / DIGEST_FILE
    if not path.is_file():
        # Written before jaxdl recorded digests (every step it writes now has one): refusing
        # it would lock users out of their own runs, so it loads, unverified, with a line.
        key = step_dir.resolve()
        if key not in _UNVERIFIED_WARNED:
            _UNVERIFIED_WARNED.add(key)
            warn(
                f"checkpoint {step_dir}: has no {DIGEST_FILE} (written by an older jaxdl), so "
                "corruption cannot be detected in it; loading it unverified. To record its "
                f"digest once you trust it: python -m jaxdl.checkpoint.integrity {step_dir}"
            )
        return
    try:
        record = json.loads(path.read_text())
        files = {
            name: (int(e["bytes"]), [str(c) for c in e["xxh3_64"]])
            for name, e in record["files"].items()
        }
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CorruptCheckpointError(
            f"checkpoint {step_dir}: {DIGEST_FILE} is corrupt ({type(err).__name__}: {err}). {fix}"
        ) from err
    wanted = set(items) if items is not None else None
    names = [n for n in files if wanted is None or n.split("/", 1)[0] in wanted]
    missing = [n for n in names if not (step_dir / n).is_file()]
    if missing:
        raise CorruptCheckpointError(
            f"checkpoint {step_dir}: {len(missing)} file(s) missing, e.g. {missing[0]}; the "
            f"step is incomplete. {fix}"
        )
    wrong_size = [n for n in names if (step_dir / n).stat().st_size != files[n][0]]
    if wrong_size:
        n = wrong_size[0]
        raise CorruptCheckpointError(
            f"checkpoint {step_dir}: file {n} has {(step_dir / n).stat().st_size} bytes, "
            f"expected {files[n][0]}; it is corrupt or truncated. {fix}"
        )
    try:
        found = _hash_all(step_dir, names)
    except OSError as err:
        raise CorruptCheckpointError(
            f"checkpoint {step_dir}: cannot read {err.filename} ({err.strerror}). {fix}"
        ) from err
    bad = [n for n in names if found[n] != files[n]]
    if bad:
        n = bad[0]
        chunk = next(
            i for i, (a, b) in enumerate(zip(found[n][1], files[n][1], strict=True)) if a != b
        )
        raise CorruptCheckpointError(
            f"checkpoint {step_dir}: file {n} hashes to {found[n][1][chunk]} at bytes "
            f"{chunk * _CHUNK}.., expected {files[n][1][chunk]} ({len(bad)} of {len(names)} "
            f"files differ from what was saved); it is corrupt. {fix}"
        )


def _finalized_steps(ckpt_dir: Path) -> list[int]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit() and p.is_dir())


def corrupt_step_fix(step_dir: Path) -> str:
    """The fix for a corrupt step, true of every command: evaluate, export and resume take
    no step (they use the latest), so the advice is to delete it; a config's
    init_from.step can name another."""
    others = [s for s in _finalized_steps(step_dir.parent) if str(s) != step_dir.name]
    then = f"the latest of {others}" if others else "none: train the run again"
    return (
        f"Fix: delete {step_dir} (evaluate, export and resume then use {then}); "
        "init_from.step can name another step."
    )


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        written = write_digest(arg)
        print(f"wrote {Path(arg) / DIGEST_FILE} ({len(written['files'])} files)")
