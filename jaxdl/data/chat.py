"""Chat data for supervised fine-tuning (task "sft"): "jsonl:PATH", and "parquet:PATH" with
task="sft" (without it, parquet: is a table).

PATH is a .jsonl / .parquet file, split into train / val / test by data.val_fraction and
data.test_fraction (seeded by the run seed, as tables are), or a folder holding train.jsonl,
val.jsonl and, optionally, test.jsonl (or the .parquet ones; no test file: test is val).
Rows come in three shapes, detected from the first row's keys or set by data.format:

    messages           {"messages": [{"role": str, "content": str}, ...]}
                       roles "system", "user", "assistant"; several turns
    prompt_completion  {"prompt": str, "completion": str}  -> user, assistant
    alpaca             {"instruction": str, "input": str (optional), "output": str}
                       -> user: instruction, + "\\n\\n" + input when input is not empty;
                          assistant: output

Each conversation is rendered with the model's own chat template (data.tokenizer's
tokenizer_config.json) and tokenized once. data.train_on="assistant" (the default) puts the
loss on the assistant's tokens only: each assistant turn's text and the end-of-turn token the
template writes after it, not the role headers, the system prompt or the user's turns. The
turns are found by rendering prefixes of the conversation, so no template needs
{% generation %} tags: assistant turn k spans the characters from the end of
render(messages[:k], add_generation_prompt=True) to the end of render(messages[:k + 1]),
cut after the span's last end-of-turn token (an id of `tokenizer.eos_ids`; what a template
writes after it, such as ChatML's newline, is never generated, so never trained). Character
spans become tokens through the tokenizer's offsets of the one full rendering: a token is an
assistant token when its characters overlap a span. Offsets, not comparing the token ids of
each prefix with those of the whole, because BPE may merge across the cut, so a prefix's
tokens need not be a prefix of the whole's. A template that renders a prefix as anything
but a prefix of the whole (one that rewrites earlier turns) is refused, naming the row.
data.train_on="all" trains on every token.

A conversation longer than data.seq_len tokens keeps its first seq_len; one with no loss
token left is dropped. Both are counted per split in data_report.json, never silent. The
examples then become rows of data.seq_len, one per row or packed (data.packing), see
`jaxdl.data.packing` for the row layout.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxdl.data.packing import Rows, build_rows
from jaxdl.data.records import Identity, Source, opt
from jaxdl.errors import UserError
from jaxdl.lm.tokenizer import BYTES, JsonTokenizer, load_tokenizer

FORMATS = ("messages", "prompt_completion", "alpaca")
TRAIN_ON = ("assistant", "all")
ROLES = ("system", "user", "assistant")
# The keys that tell a row's shape (alpaca's "input" is optional).
FORMAT_KEYS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
}
SPLITS = ("train", "val", "test")
MAX_LISTED = 10  # dropped rows named in data_report.json, per split


def check_options(cfg: Mapping) -> tuple[str, str, bool]:
    """(data.format, data.train_on, data.packing), each checked: one UserError for a bad one."""
    fmt = str(opt(cfg, "format", ""))
    if fmt and fmt not in FORMATS:
        raise UserError(
            f"data.format: expected one of {list(FORMATS)} or '' (detect from the keys), "
            f"found {fmt!r}. Fix: pick one of them."
        )
    train_on = str(opt(cfg, "train_on", "assistant"))
    if train_on not in TRAIN_ON:
        raise UserError(
            f"data.train_on: expected one of {list(TRAIN_ON)}, found {train_on!r}. Fix: "
            "'assistant' trains on the answers only, 'all' on every token."
        )
    packing = cfg.get("packing", False)
    if not isinstance(packing, bool):
        raise UserError(f"data.packing: expected true or false, found {packing!r}.")
    return fmt, train_on, packing


# ---- rows -> conversations -----------------------------------------------------------------


def read_rows(path: Path) -> list[tuple[str, Any]]:
    """(where, row) of every row of a .jsonl ("PATH:LINE"; blank lines skipped) or .parquet
    ("PATH row I", 0-based) file."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError(
                "data.source: parquet: needs pyarrow, which is not installed. Fix: pip install "
                "pyarrow."
            ) from None
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as err:  # pyarrow raises its own ArrowInvalid on a bad file
            raise UserError(f"{path}: not a readable Parquet file ({err}).") from err
        return [(f"{path} row {i}", row) for i, row in enumerate(rows)]
    out = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                out.append((f"{path}:{number}", json.loads(line.decode("utf-8"))))
            except UnicodeDecodeError as err:
                raise UserError(
                    f"{path}:{number}: expected UTF-8 text, found the byte {line[err.start]:#04x} "
                    f"at column {err.start + 1}. Fix: save the file as UTF-8."
                ) from None
            except json.JSONDecodeError as err:
                raise UserError(
                    f"{path}:{number}: expected one JSON object per line, found invalid JSON "
                    f"({err.msg}, column {err.colno}). Fix: correct or remove that line."
                ) from None
    return out


def detect_format(row: Any, where: str) -> str:
    """The shape of a row from its keys: "messages", "prompt_completion" or "alpaca"."""
    if isinstance(row, Mapping):
        for fmt, keys in FORMAT_KEYS.items():
            if all(k in row for k in keys):
                return fmt
    found = sorted(row) if isinstance(row, Mapping) else type(row).__name__
    raise UserError(
        f"{where}: cannot tell the row's shape: expected the key 'messages', or 'prompt' and "
        f"'completion', or 'instruction' and 'output'; found {found}. Fix: give rows one of "
        "these shapes, or set data.format."
    )


def _text(row: Mapping, key: str, where: str, *, optional: bool = False) -> str:
    value = row.get(key)
    if optional and value is None:
        return ""
    if not isinstance(value, str):
        raise UserError(
            f"{where}: expected {key!r} to be a string, found {type(value).__name__}. Fix: "
            f"give {key!r} as text."
        )
    return value


def to_messages(row: Any, fmt: str, where: str) -> list[dict[str, str]]:
    """A row of shape `fmt` as [{"role", "content"}, ...], or one UserError naming `where`."""
    keys = FORMAT_KEYS[fmt]
    if not isinstance(row, Mapping) or not all(k in row for k in keys):
        found = sorted(row) if isinstance(row, Mapping) else type(row).__name__
        raise UserError(
            f"{where}: a {fmt} row needs the keys {list(keys)}, found {found}. Fix: add them, "
            "or set data.format to the shape of the rows."
        )
    if fmt == "prompt_completion":
        messages = [
            {"role": "user", "content": _text(row, "prompt", where)},
            {"role": "assistant", "content": _text(row, "completion", where)},
        ]
    elif fmt == "alpaca":
        prompt, extra = _text(row, "instruction", where), _text(row, "input", where, optional=True)
        messages = [
            {"role": "user", "content": f"{prompt}\n\n{extra}" if extra else prompt},
            {"role": "assistant", "content": _text(row, "output", where)},
        ]
    else:
        messages = _checked_messages(row["messages"], where)
    return messages


def _checked_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise UserError(
            f"{where}: expected 'messages' to be a non-empty list of {{'role', 'content'}} "
            f"objects, found {messages!r:.60}. Fix: give the conversation's turns in a list."
        )
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not {"role", "content"} <= set(message):
            raise UserError(
                f"{where}: expected messages[{i}] to be an object with 'role' and 'content', "
                f"found {message!r:.60}. Fix: give every turn both keys."
            )
        if message["role"] not in ROLES:
            raise UserError(
                f"{where}: messages[{i}] has the unknown role {message['role']!r}, expected one "
                f"of {list(ROLES)}. Fix: use system, user or assistant."
            )
        out.append({"role": message["role"], "content": _text(message, "content", where)})
    if not any(m["role"] == "assistant" for m in out):
        raise UserError(
            f"{where}: the conversation has no assistant turn, so nothing to learn. Fix: add "
            "an assistant message or remove the row."
        )
    if out[0]["role"] == "assistant":
        raise UserError(
            f"{where}: the conversation opens with the assistant; expected a user (or system) "
            "turn before it. Fix: add the prompt that the first answer replies to."
        )
    return out


# ---- conversations -> tokens and loss masks ------------------------------------------------


def _render(tokenizer: JsonTokenizer, messages: list, where: str, prompt: bool = False) -> str:
    try:
        return tokenizer.render_chat(messages, add_generation_prompt=prompt)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None


def assistant_spans(
    tokenizer: JsonTokenizer, messages: list[dict[str, str]], where: str
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span [start, end) of each assistant turn,
    from renderings of its prefixes (see the module docstring)."""
    text = _render(tokenizer, messages, where)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:k], where, prompt=True)
        through = text if k == len(messages) - 1 else _render(tokenizer, messages[: k + 1], where)
        if not (through.startswith(before) and text.startswith(through)):
            raise UserError(
                f"{where}: the chat template does not render this conversation's first {k + 1} "
                "messages as the start of the whole (it rewrites earlier turns), so the "
                "assistant's tokens cannot be found from its prefixes. Fix: set "
                "data.train_on='all', or use a template that writes turns in order."
            )
        spans.append((len(before), len(through)))
    return text, spans


def loss_mask(
    ids: np.ndarray, offsets: np.ndarray, spans: Sequence[tuple[int, int]], eos_ids: Sequence[int]
) -> np.ndarray:
    """bool [P]: tokens (ids [P], character offsets [P, 2]) overlapping a span, each span cut
    after its last end-of-turn token when it has one."""
    starts = offsets[:, 0]
    ends = np.maximum(offsets[:, 1], starts + 1)  # a zero-width token counts at its place
    mask = np.zeros(len(ids), bool)
    for lo, hi in spans:
        inside = np.flatnonzero((starts < hi) & (ends > lo))
        eos = np.flatnonzero(np.isin(ids[inside], list(eos_ids)))
        if eos.size:
            inside = inside[: eos[-1] + 1]
        mask[inside] = True
    return mask


def tokenize_conversations(
    tokenizer: JsonTokenizer,
    conversations: Sequence[list[dict[str, str]]],
    wheres: Sequence[str],
    train_on: str,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each conversation's ids int32 [P] and loss mask bool [P] (before any cut)."""
    rendered = [
        assistant_spans(tokenizer, m, w) for m, w in zip(conversations, wheres, strict=True)
    ]
    encoded = tokenizer.encode_offsets([text for text, _ in rendered])
    out = []
    for (ids, offsets), (_, spans) in zip(encoded, rendered, strict=True):
        if train_on == "all":
            mask = np.ones(len(ids), bool)
        else:
            mask = loss_mask(ids, offsets, spans, tokenizer.eos_ids)
        out.append((ids, mask))
    return out


# ---- the source ----------------------------------------------------------------------------


def chat_tokenizer(cfg: Mapping) -> JsonTokenizer:
    """data.tokenizer, which must carry a chat template."""
    spec = opt(cfg, "tokenizer", BYTES)
    tokenizer = load_tokenizer(spec)
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"data.tokenizer: task sft renders each conversation with the model's chat "
            f"template, and {spec!r} has none. Fix: set data.tokenizer to an imported "
            "instruct model's workdir, or to a tokenizer.json with a tokenizer_config.json "
            "(chat_template) beside it."
        )
    assert isinstance(tokenizer, JsonTokenizer)
    return tokenizer


def _read_splits(path: Path, ext: str, cfg: Mapping, seed: int) -> tuple[dict, dict]:
    """{split: [(where, row)]} and {split: where it comes from}."""
    if path.is_dir():
        files = {s: path / f"{s}{ext}" for s in SPLITS if (path / f"{s}{ext}").is_file()}
        if not {"train", "val"} <= set(files):
            raise UserError(
                f"data.source: folder {path} needs train{ext} and val{ext} (test{ext} is "
                f"optional), found {sorted(p.name for p in path.iterdir())[:10]}. Fix: add "
                f"them, or point data.source at one {ext} file to split."
            )
        splits = {s: read_rows(f) for s, f in files.items()}
        names = {s: str(f) for s, f in files.items()}
        if "test" not in files:
            splits["test"], names["test"] = splits["val"], f"{files['val']} (no test{ext})"
        return splits, names
    if not path.is_file() or path.suffix != ext:
        raise UserError(
            f"data.source: expected a {ext} file or a folder with train{ext} / val{ext}, found "
            f"{'nothing' if not path.exists() else 'another file'} at {path}. Fix: check the path."
        )
    from jaxdl.data.tabular import split_rows

    rows = read_rows(path)
    index = split_rows(
        len(rows),
        None,
        val_fraction=float(opt(cfg, "val_fraction", 0.1)),
        test_fraction=float(opt(cfg, "test_fraction", 0.2)),
        seed=seed,
    )
    splits = {s: [rows[i] for i in index[s]] for s in SPLITS}
    return splits, {s: f"{len(index[s])} of the {len(rows)} rows of {path}" for s in SPLITS}


def _examples(pairs: list[tuple[np.ndarray, np.ndarray]], wheres: Sequence[str], seq_len: int):
    """Cut each example to seq_len, drop those left without a loss target -> kept, stats."""
    tokens, masks, dropped, cut = [], [], [], 0
    for (ids, mask), where in zip(pairs, wheres, strict=True):
        cut += len(ids) > seq_len
        ids, mask = ids[:seq_len], mask[:seq_len]
        if not mask[1:].any():
            dropped.append(where)
            continue
        tokens.append(ids)
        masks.append(mask)
    stats = {
        "rows": len(pairs),
        "rows_cut": int(cut),
        "rows_dropped": len(dropped),
        "dropped": dropped[:MAX_LISTED],
        "tokens": int(sum(len(t) for t in tokens)),
        "loss_tokens": int(sum(int(m[1:].sum()) for m in masks)),
    }
    return tokens, masks, stats


def chat_source(spec: str, cfg: Mapping, *, seed: int) -> Source:
    """ "jsonl:PATH" / "parquet:PATH" (task sft) -> Source of rows (see `jaxdl.data.packing`)."""
    prefix, _, rest = spec.partition(":")
    ext = f".{prefix}"
    forced, train_on, packing = check_options(cfg)
    seq_len = int(opt(cfg, "seq_len", 128))
    if seq_len < 2:
        raise UserError(f"data.seq_len: expected >= 2 for chat data, found {seq_len}.")
    tokenizer = chat_tokenizer(cfg)
    raw, names = _read_splits(Path(rest).expanduser(), ext, cfg, seed)
    first = next((rows[0] for rows in raw.values() if rows), None)
    if first is None:
        raise UserError(f"data.source: {rest} holds no rows. Fix: add conversations.")
    fmt = forced or detect_format(first[1], first[0])
    splits: dict[str, Rows] = {}
    stats: dict[str, dict] = {}
    for name, rows in raw.items():
        if name == "test" and rows is raw["val"]:
            splits[name], stats[name] = splits["val"], stats["val"]
            continue
        wheres = [w for w, _ in rows]
        conversations = [to_messages(row, fmt, where) for where, row in rows]
        pairs = tokenize_conversations(tokenizer, conversations, wheres, train_on)
        tokens, masks, stats[name] = _examples(pairs, wheres, seq_len)
        if rows and not tokens:
            raise UserError(
                f"data.seq_len: every one of the {len(rows)} {name} rows ({names[name]}) has no "
                f"{train_on} token left to predict in its first {seq_len} tokens, found "
                f"seq_len={seq_len}. Fix: raise data.seq_len."
            )
        splits[name] = Rows(build_rows(tokens, masks, seq_len, packing=packing, seed=seed))
    options = {"format": fmt, "train_on": train_on, "packing": packing, "seq_len": seq_len}
    report = {
        **options,
        "format_from": "data.format" if forced else f"the keys of {first[0]}",
        "rows_cut": f"longer than data.seq_len={seq_len} tokens: the first {seq_len} kept",
        "rows_dropped": f"no {train_on} token left to predict in the first {seq_len} tokens",
        "splits": stats,
    }
    return Source(
        "sft",
        splits,
        Identity(),
        tokenizer.vocab_size,
        None,
        {
            "source": spec,
            "tokenizer": tokenizer.name,
            "vocab_size": tokenizer.vocab_size,
            **options,
        },
        split_names=names,
        report=report,
    )
