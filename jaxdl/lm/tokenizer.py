"""Text <-> token ids. The default tokenizer is UTF-8 bytes (vocabulary 256)."""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxdl.errors import UserError


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
