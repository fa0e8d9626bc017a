"""Text <-> token ids: UTF-8 bytes (vocabulary 256, the default) or a ``tokenizer.json``.

``data.tokenizer`` names the tokenizer of a language-model run: ``"bytes"`` or the path of
a ``tokenizer.json`` written by the Hugging Face ``tokenizers`` library (GPT-2's byte-level
BPE, or one trained with `train_bpe`). Text sources, ``jaxdl generate`` and ``jaxdl
predict`` all go through `load_tokenizer`, so a run encodes and decodes one way.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from jaxdl.errors import UserError

BYTES = "bytes"


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes of `text` as int32 tokens [P]."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def decode(tokens: Any) -> str:
    """Byte tokens (any shape, flattened) -> text; invalid UTF-8 becomes U+FFFD."""
    values = np.asarray(tokens).reshape(-1)
    if values.size and (values.min() < 0 or values.max() > 255):
        raise UserError(
            f"tokens: expected bytes in [0, 255], found values in [{values.min()}, "
            f"{values.max()}]. Fix: decode only tokens of a byte-level (vocab_size=256) model."
        )
    return bytes(values.astype(np.uint8)).decode("utf-8", errors="replace")


class Tokenizer(Protocol):
    name: str  # "bytes" or the tokenizer.json path
    vocab_size: int

    def encode(self, text: str) -> np.ndarray: ...  # int32 [P]

    def decode(self, tokens: Any) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes: ids 0..255."""

    name = BYTES
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return encode(text)

    def decode(self, tokens: Any) -> str:
        return decode(tokens)


class JsonTokenizer:
    """A ``tokenizers`` tokenizer.json (no special tokens added when encoding)."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        self.name = str(path)
        if not Path(path).is_file():
            raise UserError(
                f"data.tokenizer: no file at {path}. Fix: set data.tokenizer to 'bytes' or "
                "to the path of a tokenizer.json."
            )
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises a bare Exception on bad JSON
            raise UserError(
                f"data.tokenizer: {path} is not a tokenizers tokenizer.json ({err}). "
                "Fix: pass the tokenizer.json that came with the model."
            ) from err
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Many texts at once (the library's threads; for corpora)."""
        batch = self._tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in batch]

    def decode(self, tokens: Any) -> str:
        values = np.asarray(tokens).reshape(-1)
        if values.size and (values.min() < 0 or values.max() >= self.vocab_size):
            raise UserError(
                f"tokens: expected ids in [0, {self.vocab_size}), found values in "
                f"[{values.min()}, {values.max()}]. Fix: decode with the model's own tokenizer."
            )
        return self._tok.decode(values.tolist(), skip_special_tokens=False)


def load_tokenizer(spec: str | None) -> ByteTokenizer | JsonTokenizer:
    """``"bytes"`` (or empty) -> bytes; a path -> that tokenizer.json."""
    if not spec or spec == BYTES:
        return ByteTokenizer()
    return JsonTokenizer(spec)


def hf_tokenizer_json(folder: Path) -> bytes | None:
    """The tokenizer.json of a save_pretrained folder: the file itself, or built from GPT-2's
    vocab.json + merges.txt (byte-level BPE, no prefix space). None when neither is there."""
    if (folder / "tokenizer.json").is_file():
        return (folder / "tokenizer.json").read_bytes()
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        return None
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    try:
        tok = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
    except Exception as err:  # the Rust side raises a bare Exception on bad files
        raise UserError(
            f"--from: {vocab} / {merges} do not form a BPE tokenizer ({err}). Fix: restore them."
        ) from err
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str().encode("utf-8")


def train_bpe(texts: Iterable[str], vocab_size: int) -> str:
    """A byte-level BPE tokenizer (GPT-2's scheme) trained on `texts` -> tokenizer.json text.

    Every byte is in the initial alphabet, so any text encodes; no special tokens.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok.to_str()
