"""The pydoc question-answer set: real rows, held out by topic, deterministic, loadable."""

import json
import subprocess
import sys
from pathlib import Path

from test_chat import make_tokenizer

from jaxdl.data import build_data
from jaxdl.data.pydoc_qa import first_sentences, pydoc_qa_rows, split_by_topic

EXPERIMENTS = Path(__file__).parents[2] / "experiments"


def test_rows_are_questions_on_the_documentation():
    rows = pydoc_qa_rows()
    assert rows[0] == {
        "topic": "assert",
        "messages": [
            {
                "role": "user",
                "content": 'What does the Python documentation say about the "assert" statement?',
            },
            {
                "role": "assistant",
                "content": "Assert statements are a convenient way to insert debugging "
                "assertions into a program.",
            },
        ],
    }
    by_question = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in rows}
    assert by_question["What does `str.casefold()` do in Python?"] == (
        "Return a casefolded copy of the string. Casefolded strings may be used for caseless "
        "matching. Casefolding is similar to lowercasing but more aggressive because it is "
        "intended to remove all case distinctions in a string."
    )
    assert len(rows) > 250 and len(by_question) == len(rows)
    answers = [r["messages"][1]["content"] for r in rows]
    assert len(set(answers)) == len(answers) and all(0 < len(a) <= 400 for a in answers)


def test_first_sentences_stop_at_three_and_at_a_code_block():
    text = ["One is here.  Two, e.g. this.", "Three. Four.", "Five."]
    assert first_sentences(text) == "One is here. Two, e.g. this. Three."
    assert first_sentences(["Use it so. It looks like:"]) == "Use it so."
    assert first_sentences(["It reads:"]) == "It reads."


def test_splits_hold_out_whole_topics_deterministically():
    rows = pydoc_qa_rows()
    splits = split_by_topic(rows, seed=0)
    assert splits == split_by_topic(pydoc_qa_rows(), seed=0)
    topics = {name: {r["topic"] for r in split} for name, split in splits.items()}
    assert not topics["train"] & topics["val"] and not topics["train"] & topics["test"]
    assert not topics["val"] & topics["test"]
    assert sum(len(s) for s in splits.values()) == len(rows)
    for name in ("val", "test"):
        assert 0.08 * len(rows) <= len(splits[name]) <= 0.1 * len(rows)
    assert split_by_topic(rows, seed=1)["test"] != splits["test"]


def test_the_script_writes_a_jsonl_folder_the_chat_source_reads(tmp_path):
    out = tmp_path / "qa"
    done = subprocess.run(
        [sys.executable, str(EXPERIMENTS / "make_pydoc_qa.py"), str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    counts = {s: len(split) for s, split in split_by_topic(pydoc_qa_rows()).items()}
    assert done.stdout.strip() == (
        f"wrote {out}: {counts['train']} train, {counts['val']} val, {counts['test']} test"
    )
    first = json.loads((out / "train.jsonl").read_text().splitlines()[0])
    assert first["topic"] == "assert"
    path = make_tokenizer(tmp_path / "tok", "chatml")
    data = build_data(
        {"source": f"jsonl:{out}", "tokenizer": path, "seq_len": 512, "packing": True}, seed=0
    )
    report = data.report
    assert report["format"] == "messages"
    assert {s: report["splits"][s]["rows"] for s in counts} == counts
    assert all(report["splits"][s]["rows_cut"] == 0 for s in counts)
    assert data.split_sizes["train"] < counts["train"]  # packed
