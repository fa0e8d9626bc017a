"""Text <-> token ids: UTF-8 bytes (vocabulary 256, the default) or a ``tokenizer.json``.

``data.tokenizer`` names the tokenizer of a language-model run: ``"bytes"``, the path of
a ``tokenizer.json`` written by the Hugging Face ``tokenizers`` library (GPT-2's byte-level
BPE, an imported model's, or one trained with `train_bpe`), or ``"none"`` for a model
imported without one (every use then refuses, naming the fix: nothing guesses a
tokenizer). Text sources, ``jaxdl generate``/``chat`` and ``jaxdl predict`` all go
through `load_tokenizer`, so a run encodes and decodes one way.

A ``tokenizer.json`` may have Hugging Face's two companions beside it:
``tokenizer_config.json`` (``chat_template``, ``bos_token``, ``eos_token``, ``pad_token``)
and ``generation_config.json`` (``eos_token_id``: the ids that end a reply). An imported
workdir holds all three, written in transformers' own format.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from jaxdl.errors import UserError

BYTES = "bytes"
NONE = "none"  # an imported model without a tokenizer
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


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


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    import json

    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not valid JSON ({err}). Fix: restore the file.") from err
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(data).__name__}.")
    return data


class JsonTokenizer:
    """A ``tokenizers`` tokenizer.json (no special tokens added when encoding), with the chat
    template and special tokens of the ``tokenizer_config.json`` beside it, if any."""

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
        folder = Path(path).parent
        config = _read_json(folder / "tokenizer_config.json")
        self.chat_template: str | None = config.get("chat_template") or None
        if self.chat_template is None and (folder / "chat_template.jinja").is_file():
            self.chat_template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        self.special_tokens = {k: _token_text(config.get(k)) for k in SPECIAL_TOKENS}
        eos = _read_json(folder / "generation_config.json").get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        if (eos_id := self.token_id(self.special_tokens["eos_token"])) is not None:
            eos_ids.append(eos_id)
        self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys(int(i) for i in eos_ids))

    def token_id(self, token: str | None) -> int | None:
        """The id of a (special) token's text, None when absent."""
        return None if token is None else self._tok.token_to_id(token)

    def render_chat(self, messages: Any, add_generation_prompt: bool = False) -> str:
        """The conversation as the model's chat template writes it."""
        from jaxdl.lm.chat_template import render

        if not self.chat_template:
            raise UserError(
                f"tokenizer {self.name}: has no chat template (no chat_template in its "
                "tokenizer_config.json). Fix: chat with an instruction-tuned model's workdir, "
                "or add the template to tokenizer_config.json."
            )
        return render(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens,
        )

    def apply_chat_template(self, messages: Any, add_generation_prompt: bool = False) -> np.ndarray:
        """Ids of the rendered conversation, as transformers' ``apply_chat_template`` gives
        them (the template writes any special tokens itself: none are added). -> int32 [P]"""
        return self.encode(self.render_chat(messages, add_generation_prompt))

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_offsets(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per text: ids int32 [P] and each token's character span in it, int64 [P, 2]
        (start, end; the byte tokens of one character all carry that character's span)."""
        batch = self._tok.encode_batch(texts, add_special_tokens=False)
        return [
            (np.asarray(e.ids, np.int32), np.asarray(e.offsets, np.int64).reshape(-1, 2))
            for e in batch
        ]

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


def load_tokenizer(spec: str | Path | None) -> ByteTokenizer | JsonTokenizer:
    """``"bytes"`` (or empty) -> bytes; a tokenizer.json path -> that tokenizer; a workdir
    (a folder with config.json) -> the tokenizer its run uses (``jaxdl.load_tokenizer``)."""
    if spec is not None and Path(spec).is_dir() and (Path(spec) / "config.json").is_file():
        config = _read_json(Path(spec) / "config.json")  # the run's resolved config
        return load_tokenizer(config.get("data", {}).get("tokenizer", BYTES))
    if not spec or spec == BYTES:
        return ByteTokenizer()
    if spec == NONE:
        raise UserError(
            "data.tokenizer: this model was imported without a tokenizer (its source had no "
            "tokenizer.json), so its text cannot be encoded or decoded. Fix: import it again "
            "from a folder that has the tokenizer files, or set data.tokenizer to the path of "
            "its tokenizer.json."
        )
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
