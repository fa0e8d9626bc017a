"""The "textfolder:PATH" source: one folder of .txt files per class -> token sequences.

    PATH/<class name>/*.txt      classes in sorted folder-name order, ids 0..C-1

Each file becomes one example, {"tokens": int32 [seq_len], "label": int32 []}: its first
`data.seq_len` tokens, right-padded. `data.tokenizer` picks the tokens: "bytes" (the
default: UTF-8 bytes, padded with `PAD_ID` 0, the byte-level transformer's vocabulary) or
a tokenizer.json, e.g. the one `jaxdl import hf:gpt2` writes next to the imported weights
(BPE ids, padded with the tokenizer's vocab_size, an id it never emits). The pad id goes to
the model (`model.pad_id`), whose classify head pools over the other tokens. Files are
split train/val/test by `data.val_fraction` / `data.test_fraction`, stratified by class,
seeded by the run seed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from jaxdl.data.records import Identity, Source, folder_fingerprint, opt, split_rows
from jaxdl.errors import UserError
from jaxdl.lm.tokenizer import BYTES, ByteTokenizer, JsonTokenizer, load_tokenizer

PAD_ID = 0  # = jaxdl.models.transformer.PAD_ID: bytes' padding (NUL never occurs in text)


class TokenRecords:
    """{"tokens": int32 [T], "label": int32 []} rows of a split."""

    def __init__(self, tokens: np.ndarray, labels: np.ndarray):
        self.tokens, self.labels = tokens, labels

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {"tokens": self.tokens[i], "label": self.labels[i]}


def pad_id(tokenizer: ByteTokenizer | JsonTokenizer) -> int:
    """The id that right-pads a sequence: 0 for bytes, else the tokenizer's vocab_size (every
    id a tokenizer emits is below it, so padding is never mistaken for text)."""
    return PAD_ID if tokenizer.name == BYTES else int(tokenizer.vocab_size)


def encode_text(
    data: bytes,
    seq_len: int,
    where: str,
    tokenizer: ByteTokenizer | JsonTokenizer | None = None,
) -> np.ndarray:
    """The first seq_len tokens of a text (bytes by default), right-padded with
    `pad_id(tokenizer)`: int32 [seq_len]."""
    if not data.strip():
        raise UserError(
            f"data.source: {where} is empty (or only whitespace). Fix: delete it or add text."
        )
    if tokenizer is not None and tokenizer.name != BYTES:
        ids = tokenizer.encode(data.decode("utf-8", errors="replace"))[:seq_len]
        out = np.full(seq_len, pad_id(tokenizer), np.int32)
        out[: len(ids)] = ids
        return out
    if PAD_ID in data:
        raise UserError(
            f"data.source: {where} holds NUL bytes, the padding id. Fix: remove them (is it a "
            "binary file?)."
        )
    out = np.full(seq_len, PAD_ID, np.int32)
    head = np.frombuffer(data[:seq_len], np.uint8)
    out[: len(head)] = head
    return out


def textfolder_source(path: str, cfg: Mapping, *, seed: int) -> Source:
    """ "textfolder:PATH" -> Source of `TokenRecords` (classification of byte sequences)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(
            f"data.source: textfolder:{path} is not a folder. Fix: give a folder holding one "
            "sub-folder of .txt files per class."
        )
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if len(classes) < 2:
        raise UserError(
            f"data.source: textfolder:{path} has {len(classes)} class folder(s) {classes}, a "
            "classifier needs at least 2. Fix: add one sub-folder of .txt files per class."
        )
    seq_len = int(opt(cfg, "seq_len", 128))
    tokenizer = load_tokenizer(opt(cfg, "tokenizer", BYTES))
    tokens, labels, read = [], [], []
    for label, name in enumerate(classes):
        files = sorted((root / name).glob("*.txt"))
        read += files
        if not files:
            raise UserError(
                f"data.source: class folder {root / name} has no .txt files. Fix: add some or "
                "remove the folder."
            )
        for file in files:
            tokens.append(encode_text(file.read_bytes(), seq_len, str(file), tokenizer))
            labels.append(label)
    tokens_array, label_array = np.stack(tokens), np.asarray(labels, np.int32)
    rows = split_rows(
        len(label_array),
        label_array,
        val_fraction=float(opt(cfg, "val_fraction", 0.1)),
        test_fraction=float(opt(cfg, "test_fraction", 0.2)),
        seed=seed,
    )
    splits = {k: TokenRecords(tokens_array[idx], label_array[idx]) for k, idx in rows.items()}
    counts = np.bincount(label_array[rows["train"]], minlength=len(classes)).tolist()
    return Source(
        "classification",
        splits,
        Identity(),
        len(classes),
        classes,
        {
            "source": f"textfolder:{path}",
            "input": "tokens",
            "tokenizer": tokenizer.name,
            "seq_len": seq_len,
            "pad_id": pad_id(tokenizer),
            "fingerprint": folder_fingerprint(root, read),
        },
        split_names={k: f"{k} files of {root} (seed {seed})" for k in rows},
        task_fields={
            "model": {"num_classes": len(classes), "pad_id": pad_id(tokenizer)},
            "head": {"input_key": "tokens", "class_counts": counts},
        },
    )
