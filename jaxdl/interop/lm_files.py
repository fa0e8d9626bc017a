"""The files that travel with a language model, in transformers' own layout.

    tokenizer.json            the `tokenizers` tokenizer
    tokenizer_config.json     chat_template, bos/eos/unk/pad tokens, add_bos_token
    generation_config.json    bos/eos/pad token ids (eos: every id that ends a reply)

An imported workdir holds them exactly as a ``save_pretrained`` folder would, so
`jaxdl.lm.tokenizer.JsonTokenizer` reads them the same way in either place and export-hf
copies them back. `from_hf_folder` collects them from a Hugging Face folder; the GGUF
importer builds them from the file's metadata. A source without a tokenizer imports
weights-only: the workdir's ``data.tokenizer`` is then ``"none"`` and the report says so.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from jaxdl.errors import UserError
from jaxdl.fileio import read_json
from jaxdl.lm.tokenizer import NONE, SPECIAL_TOKENS, hf_tokenizer_json

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclasses.dataclass
class LmFiles:
    """tokenizer: tokenizer.json's bytes (None: weights-only). tokenizer_config and
    generation_config: the JSON objects written beside it."""

    tokenizer: bytes | None
    tokenizer_config: dict[str, Any]
    generation_config: dict[str, Any]

    def assets(self) -> dict[str, bytes]:
        """{file name in the workdir: bytes} (nothing for weights-only)."""
        if self.tokenizer is None:
            return {}
        dump = lambda obj: (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()
        return {
            "tokenizer.json": self.tokenizer,
            "tokenizer_config.json": dump(self.tokenizer_config),
            "generation_config.json": dump(self.generation_config),
        }

    def data_config(self, out: Path, max_len: int) -> dict[str, Any]:
        """The imported workdir's data section: its tokenizer, and English text to measure
        it on (`jaxdl evaluate`: pydoc's topics, val and test held out) until a
        fine-tuning config names its own data."""
        return {
            "source": "text:pydoc",
            "test_fraction": 0.1,
            "seq_len": min(512, max_len),
            "tokenizer": NONE if self.tokenizer is None else str(out / "tokenizer.json"),
        }

    def provenance(self) -> dict[str, Any]:
        """What import_report.json says of the tokenizer (and what is missing)."""
        if self.tokenizer is None:
            return {"tokenizer": None, "missing_pieces": ["tokenizer"]}
        missing = [] if self.tokenizer_config.get("chat_template") else ["chat_template"]
        return {"tokenizer": "tokenizer.json", "missing_pieces": missing}


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object file of a model folder ({} when absent)."""
    data = read_json(path) if path.is_file() else {}
    if not isinstance(data, dict):
        raise UserError(f"--from: {path}: expected a JSON object, found {type(data).__name__}.")
    return data


def _chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    """tokenizer_config.json's chat_template (a string, or named templates: the default),
    else chat_template.jinja / chat_template.json (transformers v5 saves it apart)."""
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template:
        return template
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return _read_json(folder / "chat_template.json").get("chat_template") or None


def from_hf_folder(folder: Path, hf_config: dict[str, Any]) -> LmFiles:
    """The tokenizer files of a save_pretrained folder (ids missing from
    generation_config.json come from config.json, as transformers does)."""
    tokenizer = hf_tokenizer_json(folder)
    config = _read_json(folder / "tokenizer_config.json")
    special_map = _read_json(folder / "special_tokens_map.json")
    tokenizer_config: dict[str, Any] = {}
    for key in SPECIAL_TOKENS:
        value = config.get(key, special_map.get(key))
        if isinstance(value, dict):
            value = value.get("content")
        tokenizer_config[key] = value if isinstance(value, str) else None
    for key in ("add_bos_token", "add_eos_token"):
        if key in config:
            tokenizer_config[key] = bool(config[key])
    tokenizer_config["chat_template"] = _chat_template(folder, config)
    generation = _read_json(folder / "generation_config.json")
    generation_config = {
        key: generation.get(key, hf_config.get(key))
        for key in GENERATION_KEYS
        if generation.get(key, hf_config.get(key)) is not None
    }
    return LmFiles(tokenizer, tokenizer_config, generation_config)


def from_workdir(workdir: Path, tokenizer_path: str) -> LmFiles:
    """An imported or trained workdir's tokenizer files (for export)."""
    if tokenizer_path == NONE:
        return LmFiles(None, {}, {})
    path = Path(tokenizer_path)
    if not path.is_file():
        raise UserError(
            f"data.tokenizer: {path} (named by {workdir / 'config.json'}) does not exist. Fix: "
            "restore the tokenizer.json or the workdir."
        )
    return LmFiles(
        path.read_bytes(),
        _read_json(path.parent / "tokenizer_config.json"),
        _read_json(path.parent / "generation_config.json"),
    )
