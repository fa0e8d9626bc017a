"""The "textfolder:PATH" source: one folder of .txt files per class -> byte sequences.

    PATH/<class name>/*.txt      classes in sorted folder-name order, ids 0..C-1

Each file becomes one example: its first `data.seq_len` UTF-8 bytes, right-padded with
`PAD_ID` (0) to seq_len, {"tokens": int32 [seq_len], "label": int32 []}; the byte
vocabulary matches the byte-level transformer, so a pretrained byte LM reads them
directly (`model.head="classify"`). Files are split train/val/test by
`data.val_fraction` / `data.test_fraction`, stratified by class, seeded by the run seed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from jaxdl.data.sources import Identity, Source, opt
from jaxdl.data.tabular import split_rows
from jaxdl.errors import UserError

PAD_ID = 0  # = jaxdl.models.transformer.PAD_ID


class TokenRecords:
    """{"tokens": int32 [T], "label": int32 []} rows of a split."""

    def __init__(self, tokens: np.ndarray, labels: np.ndarray):
        self.tokens, self.labels = tokens, labels

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {"tokens": self.tokens[i], "label": self.labels[i]}


def encode_text(data: bytes, seq_len: int, where: str) -> np.ndarray:
    """The first seq_len bytes, right-padded with PAD_ID: int32 [seq_len]."""
    if not data.strip():
        raise UserError(
            f"data.source: {where} is empty (or only whitespace). Fix: delete it or add text."
        )
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
    tokens, labels = [], []
    for label, name in enumerate(classes):
        files = sorted((root / name).glob("*.txt"))
        if not files:
            raise UserError(
                f"data.source: class folder {root / name} has no .txt files. Fix: add some or "
                "remove the folder."
            )
        for file in files:
            tokens.append(encode_text(file.read_bytes(), seq_len, str(file)))
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
            "tokenizer": "bytes",
            "seq_len": seq_len,
            "pad_id": PAD_ID,
        },
        split_names={k: f"{k} files of {root} (seed {seed})" for k in rows},
        task_fields={
            "model": {"num_classes": len(classes)},
            "head": {"input_key": "tokens", "class_counts": counts},
        },
    )
