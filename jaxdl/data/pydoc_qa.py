"""A small real instruction set that ships with Python: questions on `pydoc_data.topics`.

Each topic of the language reference that `help()` shows (79 of them: "assert", "with",
"string-methods", ...) is cut at its section headings (a title underlined with * = - ~ ^)
and at its API entries (a line such as ``str.capitalize()`` or ``object.__len__(self)``
followed by an indented description). Each becomes one conversation:

    user:      What does the Python documentation say about the "with" statement?
               What does the Python documentation on Coroutines say about the "async for" statement?
               What does `str.casefold()` do in Python?
    assistant: the first one to three sentences of that section's prose (or the entry's
               description): code, grammar and "Changed in version" notes left out

Rows are {"topic": KEY, "messages": [user, assistant]} ("messages" rows for `jsonl:`), and
the splits are held out BY TOPIC: every question on a topic is in the same split, so val
and test ask about topics the model was not tuned on. Deterministic given the seed (and
the Python version, whose documentation it reads).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

HEADING = re.compile(r"^(\S.*)\n([*=\-~^])\2+\n", re.M)
ENTRY = re.compile(r"^([A-Za-z_][\w.]*(?:\(.*\))?)$")
SENTENCE_END = re.compile(r"(?<=[.!?])(?<!\be\.g\.)(?<!\bi\.e\.)\s+(?=[A-Z\"'(*])")
SKIP = (
    "Added in version",
    "Changed in version",
    "New in version",
    "Deprecated",
    "See also",
    "Note:",
)
MAX_SENTENCES, MAX_CHARS = 3, 300


def first_sentences(paragraphs: list[str]) -> str:
    """The first 1-3 sentences (about MAX_CHARS at most) of prose paragraphs. A sentence that
    ends in ':' introduced a code block: it ends the answer, left out (or, alone, with '.')."""
    out: list[str] = []
    for paragraph in paragraphs:
        for sentence in SENTENCE_END.split(" ".join(paragraph.split())):
            if out and (len(out) == MAX_SENTENCES or len(" ".join(out + [sentence])) > MAX_CHARS):
                return " ".join(out)
            if sentence.endswith(":"):
                return " ".join(out or [sentence[:-1] + "."])
            out.append(sentence)
    return " ".join(out)


def _prose(block: str, indent: int) -> list[str]:
    """Paragraphs of `block` indented by exactly `indent` spaces (deeper: code, grammar),
    stopping at a note (SKIP)."""
    out = []
    for paragraph in re.split(r"\n\s*\n", block):
        lines = paragraph.strip("\n").splitlines()
        if not lines or len(lines[0]) - len(lines[0].lstrip(" ")) != indent:
            continue
        text = " ".join(line.strip() for line in lines)
        if text.startswith(SKIP) or "::=" in text or (indent == 0 and ENTRY.match(text)):
            continue
        out.append(text)
    return out


def topic_questions(key: str, text: str) -> list[dict]:
    """The (question, answer) rows of one topic: its sections, then its API entries."""
    heads = list(HEADING.finditer(text))
    if not heads:
        return []
    topic_title, rows = re.sub(r"^The ", "the ", heads[0].group(1).strip()), []
    for i, head in enumerate(heads):
        body = text[head.end() : heads[i + 1].start() if i + 1 < len(heads) else len(text)]
        title = re.sub(r"^The ", "the ", head.group(1).strip())
        question = (
            f"What does the Python documentation say about {title}?"
            if i == 0
            else f"What does the Python documentation on {topic_title} say about {title}?"
        )
        rows.append((question, first_sentences(_prose(body, 0))))
        for entry in re.finditer(r"^(\S.*)\n\n((?:   .*\n|\n)+)", body, re.M):
            if ENTRY.match(entry.group(1)):
                answer = first_sentences(_prose(entry.group(2), 3))
                rows.append((f"What does `{entry.group(1)}` do in Python?", answer))
    return [
        {
            "topic": key,
            "messages": [
                {"role": "user", "content": q},
                {"role": "assistant", "content": a},
            ],
        }
        for q, a in rows
        if a
    ]


def pydoc_qa_rows() -> list[dict]:
    """Every row, topics in sorted order, each question and each answer once (topics repeat
    each other: "compound" holds the sections of "if", "while", ...; the first keeps them)."""
    from pydoc_data.topics import topics

    rows, seen = [], set()
    for key in sorted(topics):
        for row in topic_questions(key, topics[key]):
            texts = [m["content"] for m in row["messages"]]
            if not seen & set(texts):
                seen.update(texts)
                rows.append(row)
    return rows


def split_by_topic(
    rows: list[dict], *, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0
) -> dict[str, list[dict]]:
    """Whole topics, in an order drawn from `seed`, each to test while it fits in
    test_fraction of the rows, else to val while it fits in val_fraction, else to train.
    Rows keep their order."""
    topics = sorted({r["topic"] for r in rows})
    counts = {t: sum(r["topic"] == t for r in rows) for t in topics}
    order = [topics[i] for i in np.random.default_rng(seed).permutation(len(topics))]
    room = {"test": test_fraction * len(rows), "val": val_fraction * len(rows)}
    split_of = {}
    for topic in order:
        split_of[topic] = next((s for s in room if counts[topic] <= room[s]), "train")
        room[split_of[topic]] = room.get(split_of[topic], 0) - counts[topic]
    return {s: [r for r in rows if split_of[r["topic"]] == s] for s in ("train", "val", "test")}


def write_pydoc_qa(folder: str | Path, *, seed: int = 0) -> dict[str, int]:
    """FOLDER/train.jsonl, val.jsonl, test.jsonl (`jsonl:FOLDER`) -> rows per split."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    splits = split_by_topic(pydoc_qa_rows(), seed=seed)
    for name, rows in splits.items():
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (folder / f"{name}.jsonl").write_text(lines, encoding="utf-8")
    return {name: len(rows) for name, rows in splits.items()}
