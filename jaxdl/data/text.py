"""The "text:..." sources: language modelling on UTF-8 bytes or a tokenizer's ids.

    text:PATH_OR_GLOB   a file, a folder (all files below it) or a glob, sorted, concatenated
    text:stdlib         the Python standard library's .py files (no test folders), sorted
    text:pydoc          `pydoc_data.topics.topics` values in sorted key order

The corpus is capped at `data.max_bytes` (default: 8,000,000 for stdlib, none otherwise).
`data.tokenizer` turns it into tokens: "bytes" (the default: UTF-8 bytes, vocabulary 256)
or a tokenizer.json (`jaxdl.lm.tokenizer`; the text is encoded in newline-aligned chunks so
the library's threads share the work). The corpus is cut in order into train | val | test:
the last `data.test_fraction` of the tokens is "test" (default 0: no test split, and a run's
summary says its test figures are val's), the `data.val_fraction` (default 0.1) before it
"val". Each split is cut into non-overlapping windows
of `data.seq_len` + 1 tokens with stride seq_len, so targets cover every token after the
first once: inputs = w[:-1], targets = w[1:]. A tail shorter than a window is dropped.
"""

from __future__ import annotations

import glob
import sysconfig
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from jaxdl.data.records import Identity, Source, opt
from jaxdl.errors import UserError
from jaxdl.lm.tokenizer import BYTES, load_tokenizer

STDLIB_MAX_BYTES = 8_000_000
_STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


class ByteWindows:
    """Windows of a token corpus (uint8 bytes or int32 ids): item i = tokens
    [i*T, i*T + T + 1) as inputs/targets."""

    def __init__(self, corpus: np.ndarray, seq_len: int):
        self.corpus, self.seq_len = corpus, seq_len

    def __len__(self) -> int:
        return max(0, (len(self.corpus) - 1) // self.seq_len)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        start = int(i) * self.seq_len
        w = self.corpus[start : start + self.seq_len + 1].astype(np.int32)
        return {"inputs": w[:-1], "targets": w[1:]}


def stdlib_files() -> list[Path]:
    """The standard library's .py files outside test folders, sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p for p in root.rglob("*.py") if not _STDLIB_SKIP & set(p.relative_to(root).parts[:-1])
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _read_files(files: list[Path], max_bytes: int | None) -> bytes:
    """The files' bytes end to end, reading no more than `max_bytes` in all (a 1 MB cut of
    a 3 GB file reads 1 MB)."""
    chunks, total = [], 0
    for path in files:
        if max_bytes is not None and total >= max_bytes:
            break
        with open(path, "rb") as f:
            data = f.read() if max_bytes is None else f.read(max_bytes - total)
        chunks.append(data)
        total += len(data)
    return b"".join(chunks)


def _glob_files(pattern: str) -> list[Path]:
    path = Path(pattern).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if not files:
        raise UserError(
            f"data.source: text:{pattern} matches no files. Fix: give a "
            "file, a folder or a glob such as 'corpus/*.txt'."
        )
    return files


def read_corpus(spec: str, max_bytes: int | None) -> bytes:
    """The bytes a "text:" spec names (before the val split)."""
    if spec == "stdlib":
        return _read_files(stdlib_files(), max_bytes or STDLIB_MAX_BYTES)
    if spec == "pydoc":
        from pydoc_data.topics import topics

        corpus = "\n".join(topics[k] for k in sorted(topics)).encode("utf-8")
        return corpus if max_bytes is None else corpus[:max_bytes]
    return _read_files(_glob_files(spec), max_bytes)


CHUNK_CHARS = 1 << 16


def tokenize(corpus: bytes, tokenizer) -> np.ndarray:
    """The corpus as token ids: uint8 for bytes, else int32 [N]."""
    if tokenizer.name == BYTES:
        return np.frombuffer(corpus, np.uint8)
    text = corpus.decode("utf-8", errors="replace")
    chunks, start = [], 0
    while start < len(text):
        end = text.find("\n", start + CHUNK_CHARS)
        end = len(text) if end < 0 else end + 1
        chunks.append(text[start:end])
        start = end
    ids = tokenizer.encode_batch(chunks) if chunks else []
    return np.concatenate(ids) if ids else np.zeros(0, np.int32)


def text_source(spec: str, cfg: Mapping) -> Source:
    """ "text:..." -> Source of token windows; splits train, val and (with
    data.test_fraction) test."""
    seq_len = int(opt(cfg, "seq_len", 128))
    fractions = {"val": float(opt(cfg, "val_fraction", 0.1))}
    if opt(cfg, "test_fraction", 0.0):
        fractions["test"] = float(cfg["test_fraction"])
    for name, fraction in fractions.items():
        if not 0.0 < fraction < 1.0:
            raise UserError(f"data.{name}_fraction: expected a number in (0, 1), found {fraction}.")
    if sum(fractions.values()) >= 1.0:
        raise UserError(
            f"data.val_fraction + data.test_fraction: expected < 1, found "
            f"{sum(fractions.values())}. Fix: lower them."
        )
    tokenizer = load_tokenizer(opt(cfg, "tokenizer", BYTES))
    raw = read_corpus(spec, opt(cfg, "max_bytes"))
    corpus = tokenize(raw, tokenizer)
    unit = "bytes" if tokenizer.name == BYTES else "tokens"
    sizes = {name: int(len(corpus) * f) for name, f in fractions.items()}
    bounds = {"train": (0, len(corpus) - sum(sizes.values()))}
    for name in ("val", "test"):
        if name in sizes:
            start = max(end for _, end in bounds.values())
            bounds[name] = (start, start + sizes[name])
    parts = {name: corpus[a:b] for name, (a, b) in bounds.items()}
    if min(map(len, parts.values())) < seq_len + 1:
        counts = ", ".join(f"{len(p)} {name}" for name, p in parts.items())
        raise UserError(
            f"data.seq_len: text:{spec} has {counts} {unit}, each split needs at least "
            f"seq_len + 1 = {seq_len + 1}. Fix: lower data.seq_len or give more text."
        )
    return Source(
        "lm",
        {name: ByteWindows(part, seq_len) for name, part in parts.items()},
        Identity(),
        tokenizer.vocab_size,
        None,
        {
            "source": f"text:{spec}",
            "tokenizer": tokenizer.name,
            "vocab_size": tokenizer.vocab_size,
            "seq_len": seq_len,
            "corpus_bytes": len(raw),
            "corpus_tokens": int(len(corpus)),
            "bytes_per_token": len(raw) / max(len(corpus), 1),
            **{f"{name}_{unit}": n for name, n in sizes.items()},
        },
        # the head reports bits per byte of text, whatever the tokenizer
        task_fields={"head": {"bytes_per_token": len(raw) / max(len(corpus), 1)}},
        split_names={name: f"{unit}[{a}:{b}]" for name, (a, b) in bounds.items()},
    )
