"""Chat data (jsonl:, parquet: with task sft): row shapes, malformed rows, the assistant-only
loss mask token by token under several chat templates, truncation, the data report."""

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from jaxdl import config as config_lib
from jaxdl.data import build_data
from jaxdl.data.chat import tokenize_conversations
from jaxdl.errors import UserError
from jaxdl.lm.tokenizer import load_tokenizer

BPE = Path(__file__).parents[1] / "fixtures" / "hub" / "bpe_stdlib.json"

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SMOLLM2 = (  # SmolLM2-Instruct's template: a default system prompt when none is given
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (  # Meta-Llama-3-8B-Instruct's template
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
PLAIN = (  # no special token between the prompt and the answer: BPE merges across the cut
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'Assistant: ' + m['content'] "
    "+ eos_token + '\n' }}{% else %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)
TEMPLATES = {
    "chatml": (CHATML, ["<|im_start|>", "<|im_end|>"], "<|im_end|>", None),
    "smollm2": (SMOLLM2, ["<|im_start|>", "<|im_end|>"], "<|im_end|>", None),
    "llama3": (
        LLAMA3,
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|eot_id|>",
        "<|begin_of_text|>",
    ),
    "plain": (PLAIN, ["</s>"], "</s>", None),
}

TWO_TURNS = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And héllo ✓?"},
    {"role": "assistant", "content": "Bonjour, ça va ✓"},
]
WITH_SYSTEM = [{"role": "system", "content": "Answer briefly."}, *TWO_TURNS]


def make_tokenizer(folder: Path, name: str) -> str:
    """The stdlib BPE with the template's special tokens, and its tokenizer_config.json."""
    template, specials, eos, bos = TEMPLATES[name]
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_file(str(BPE))
    tok.add_special_tokens(specials)
    tok.save(str(folder / "tokenizer.json"))
    config = {"chat_template": template, "eos_token": eos, "bos_token": bos}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return str(folder / "tokenizer.json")


def expected_segments(name: str, messages: list[dict]) -> list[tuple[str, bool]]:
    """The template's text as (piece, trained) pieces, written out by hand per template."""
    out: list[tuple[str, bool]] = []
    if name in ("chatml", "smollm2"):
        if name == "smollm2" and messages[0]["role"] != "system":
            out.append((f"<|im_start|>system\n{SMOLLM2_SYSTEM}<|im_end|>\n", False))
        for m in messages:
            if m["role"] == "assistant":
                out += [("<|im_start|>assistant\n", False), (f"{m['content']}<|im_end|>", True)]
                out.append(("\n", False))
            else:
                out.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
    elif name == "llama3":
        out.append(("<|begin_of_text|>", False))
        for m in messages:
            out.append((f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n", False))
            out.append((f"{m['content'].strip()}<|eot_id|>", m["role"] == "assistant"))
    return out


def tokens_and_mask(path: str, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    tok = load_tokenizer(path)
    [(ids, mask)] = tokenize_conversations(tok, [messages], ["row"], "assistant")
    return ids, mask


@pytest.mark.parametrize("name", ["chatml", "smollm2", "llama3"])
@pytest.mark.parametrize("messages", [TWO_TURNS, WITH_SYSTEM], ids=["two_turns", "system"])
def test_assistant_mask_token_by_token(tmp_path, name, messages):
    """Each assistant turn's tokens and its end-of-turn token are trained; headers, system
    prompts (given or the template's default), user turns and ChatML's newline are not."""
    path = make_tokenizer(tmp_path / name, name)
    tok = load_tokenizer(path)
    ids, mask = tokens_and_mask(path, messages)
    segments = expected_segments(name, messages)
    assert "".join(text for text, _ in segments) == tok.render_chat(messages)
    pieces = [tok.encode(text) for text, _ in segments]
    np.testing.assert_array_equal(ids, np.concatenate(pieces))  # the pieces tokenize alone
    want = np.concatenate([np.full(len(p), t) for p, (_, t) in zip(pieces, segments, strict=True)])
    np.testing.assert_array_equal(mask, want)
    trained = tok.decode(ids[mask])
    eot = TEMPLATES[name][2]
    assert trained == f"It is 4.{eot}Bonjour, ça va ✓{eot}"


def test_a_token_merged_across_the_cut_is_trained(tmp_path):
    """The prompt ends 'Assistant: ', the answer starts 'It': BPE writes ' I' as one token
    that starts in the prompt; it carries the loss (it is what the model must write first),
    and the newline after the end-of-turn token does not."""
    path = make_tokenizer(tmp_path / "plain", "plain")
    tok = load_tokenizer(path)
    ids, mask = tokens_and_mask(path, TWO_TURNS[:2])
    text = tok.render_chat(TWO_TURNS[:2])
    assert text == "user: What is 2 + 2?\nAssistant: It is 4.</s>\n"
    pieces = [tok.decode([i]) for i in ids]
    trained = [p for p, m in zip(pieces, mask, strict=True) if m]
    assert trained[0] == " I" and "".join(trained) == " It is 4.</s>"
    assert pieces[-1] == "\n" and not mask[-1]
    assert not mask[: pieces.index(" I")].any()


def write_jsonl(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def chat_folder(folder: Path, rows: list, val: list | None = None) -> str:
    write_jsonl(folder / "train.jsonl", rows)
    write_jsonl(folder / "val.jsonl", val or rows[:1])
    return str(folder)


def test_three_row_shapes_give_the_same_conversation(tmp_path):
    path = make_tokenizer(tmp_path / "tok", "chatml")
    shapes = {
        "messages": {"messages": [{"role": "user", "content": "Hi\n\nthere"}, TWO_TURNS[1]]},
        "prompt_completion": {"prompt": "Hi\n\nthere", "completion": "It is 4."},
        "alpaca": {"instruction": "Hi", "input": "there", "output": "It is 4."},
    }
    rows = {}
    for fmt, row in shapes.items():
        data = build_data(
            {"source": f"jsonl:{chat_folder(tmp_path / fmt, [row])}", "tokenizer": path},
            seed=0,
        )
        assert data.kind == "sft" and data.report["format"] == fmt
        rows[fmt] = next(iter(data.eval_iter("val", 1)))
    for key in ("inputs", "targets", "weights", "segment_ids", "positions"):
        np.testing.assert_array_equal(rows["messages"][key], rows["alpaca"][key])
        np.testing.assert_array_equal(rows["messages"][key], rows["prompt_completion"][key])
    # alpaca without input: the instruction alone
    alone = {"instruction": "Hi", "input": "", "output": "It is 4."}
    src = f"jsonl:{chat_folder(tmp_path / 'alone', [alone])}"
    row = next(iter(build_data({"source": src, "tokenizer": path}, seed=0).eval_iter("val", 1)))
    tok = load_tokenizer(path)
    text = tok.decode(row["inputs"][0][row["segment_ids"][0] > 0])
    assert text == tok.render_chat([{"role": "user", "content": "Hi"}, TWO_TURNS[1]])


def test_rows_become_the_example_contract(tmp_path):
    """One unpacked row: inputs = the rendered ids, targets = the next id, weights on the
    assistant's targets only, one segment, positions 0.., padding zero."""
    path = make_tokenizer(tmp_path / "tok", "chatml")
    folder = chat_folder(tmp_path / "d", [{"messages": WITH_SYSTEM}])
    data = build_data({"source": f"jsonl:{folder}", "tokenizer": path, "seq_len": 128}, seed=0)
    row = next(iter(data.eval_iter("val", 1)))
    ids, mask = tokens_and_mask(path, WITH_SYSTEM)
    n = len(ids)
    assert data.example_spec == {
        "inputs": ((128,), np.dtype(np.int32)),
        "targets": ((128,), np.dtype(np.int32)),
        "weights": ((128,), np.dtype(np.float32)),
        "segment_ids": ((128,), np.dtype(np.int32)),
        "positions": ((128,), np.dtype(np.int32)),
    }
    np.testing.assert_array_equal(row["inputs"][0], np.pad(ids, (0, 128 - n)))
    np.testing.assert_array_equal(row["targets"][0], np.pad(ids[1:], (0, 129 - n)))
    np.testing.assert_array_equal(row["weights"][0], np.pad(mask[1:], (0, 129 - n)))
    np.testing.assert_array_equal(row["segment_ids"][0], np.pad(np.ones(n, int), (0, 128 - n)))
    np.testing.assert_array_equal(row["positions"][0], np.pad(np.arange(n), (0, 128 - n)))
    assert data.num_classes == 514  # the vocabulary with the two special tokens
    report = data.report["splits"]["val"]
    assert report["loss_tokens"] == int(mask[1:].sum()) == int(row["weights"].sum())
    assert report["tokens"] == n and report["rows"] == 1


def test_truncation_is_reported_never_silent(tmp_path):
    """seq_len 24: the long answer is cut, the row whose answer starts past 24 tokens dropped."""
    path = make_tokenizer(tmp_path / "tok", "chatml")
    tok = load_tokenizer(path)
    short = {"prompt": "Hi", "completion": "Yes."}
    cut = {"prompt": "Hi", "completion": "word " * 40}
    dropped = {"prompt": "word " * 40, "completion": "Yes."}
    folder = chat_folder(tmp_path / "d", [short, cut, dropped, short], val=[short])
    data = build_data({"source": f"jsonl:{folder}", "tokenizer": path, "seq_len": 24}, seed=0)
    train = data.report["splits"]["train"]
    assert (train["rows"], train["rows_cut"], train["rows_dropped"]) == (4, 2, 1)
    assert train["dropped"] == [f"{folder}/train.jsonl:3"]
    assert data.split_sizes == {"train": 3, "val": 1, "test": 1}
    short_len = len(tok.apply_chat_template(to_chat(short)))
    assert short_len < 24 and train["tokens"] == 2 * short_len + 24
    assert "first 24 kept" in data.report["rows_cut"]
    assert data.report["format_from"] == f"the keys of {folder}/train.jsonl:1"
    from jaxdl.data.pipeline import format_report

    assert format_report(data.report).splitlines()[0] == (
        f"data: train: 3 examples from 4 rows, {train['loss_tokens']} loss tokens; "
        "2 rows cut, 1 dropped"
    )
    with pytest.raises(UserError, match="data.seq_len: every one of the 4 train rows"):
        build_data({"source": f"jsonl:{folder}", "tokenizer": path, "seq_len": 8}, seed=0)


def to_chat(row: dict) -> list[dict]:
    return [
        {"role": "user", "content": row["prompt"]},
        {"role": "assistant", "content": row["completion"]},
    ]


def test_train_on_all_weights_every_target(tmp_path):
    path = make_tokenizer(tmp_path / "tok", "llama3")
    folder = chat_folder(tmp_path / "d", [{"messages": TWO_TURNS}])
    cfg = {"source": f"jsonl:{folder}", "tokenizer": path, "seq_len": 64, "train_on": "all"}
    row = next(iter(build_data(cfg, seed=0).eval_iter("val", 1)))
    n = int((row["segment_ids"] > 0).sum())
    np.testing.assert_array_equal(row["weights"][0], (np.arange(64) < n - 1).astype(np.float32))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"messages": [', "train.jsonl:2: expected one JSON object per line, found invalid JSON"),
        ('{"question": "a"}', "train.jsonl:2: a messages row needs the keys ['messages']"),
        (
            '{"messages": [{"role": "bot", "content": "a"}]}',
            "train.jsonl:2: messages[0] has the unknown role 'bot'",
        ),
        (
            '{"messages": [{"role": "user", "content": 3}]}',
            "train.jsonl:2: expected 'content' to be a string, found int",
        ),
        (
            '{"messages": [{"role": "user", "content": "a"}]}',
            "train.jsonl:2: the conversation has no assistant turn",
        ),
        ('{"messages": [{"role": "user"}]}', "train.jsonl:2: expected messages[0] to be an"),
        ("[1, 2]", "train.jsonl:2: a messages row needs the keys"),
        ('{"messages": "caf\xe9"}', "train.jsonl:2: expected UTF-8 text, found the byte 0xe9"),
    ],
)
def test_a_malformed_row_is_one_line_naming_file_and_line(tmp_path, line, message):
    path = make_tokenizer(tmp_path / "tok", "chatml")
    folder = tmp_path / "d"
    write_jsonl(folder / "val.jsonl", [{"messages": TWO_TURNS}])
    good = json.dumps({"messages": TWO_TURNS})
    (folder / "train.jsonl").write_bytes(f"{good}\n{line}\n".encode("latin-1"))
    with pytest.raises(UserError) as err:
        build_data({"source": f"jsonl:{folder}", "tokenizer": path}, seed=0)
    assert message in str(err.value) and "Fix:" in str(err.value)
    assert "\n" not in str(err.value) and str(folder) in str(err.value)


def test_unknown_shapes_and_bad_options_are_refused(tmp_path):
    path = make_tokenizer(tmp_path / "tok", "chatml")
    folder = chat_folder(tmp_path / "d", [{"question": "a", "answer": "b"}])
    with pytest.raises(UserError, match=r"train.jsonl:1: cannot tell the row's shape"):
        build_data({"source": f"jsonl:{folder}", "tokenizer": path}, seed=0)
    folder = chat_folder(tmp_path / "e", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(UserError, match=r"train.jsonl:1: a alpaca row needs the keys"):
        build_data({"source": f"jsonl:{folder}", "tokenizer": path, "format": "alpaca"}, seed=0)
    with pytest.raises(UserError, match="data.tokenizer: task sft renders each conversation"):
        build_data({"source": f"jsonl:{folder}", "tokenizer": str(BPE)}, seed=0)
    with pytest.raises(UserError, match="needs train.jsonl and val.jsonl"):
        build_data({"source": f"jsonl:{tmp_path / 'tok'}", "tokenizer": path}, seed=0)
    for key, value, want in [
        ("format", "sharegpt", "data.format: expected one of"),
        ("train_on", "prompt", "data.train_on: expected one of"),
    ]:
        cfg = config_lib.merge_config(config_lib.default_config(), {"num_steps": 1})
        cfg.data[key] = value
        with pytest.raises(UserError, match=want):
            config_lib.validate(cfg)
    cfg = config_lib.merge_config(
        config_lib.default_config(),
        {"num_steps": 1, "task": "sft", "data": {"format": "alpaca", "packing": True}},
    )
    config_lib.validate(cfg)  # accepted


def test_one_file_is_split_by_the_fractions(tmp_path):
    path = make_tokenizer(tmp_path / "tok", "chatml")
    rows = [{"prompt": f"Question {i}", "completion": f"Answer {i}."} for i in range(20)]
    write_jsonl(tmp_path / "all.jsonl", rows)
    cfg = {"source": f"jsonl:{tmp_path / 'all.jsonl'}", "tokenizer": path}
    data = build_data({**cfg, "val_fraction": 0.1, "test_fraction": 0.2}, seed=3)
    assert data.split_sizes == {"train": 14, "val": 2, "test": 4}
    assert data.split_names["val"] == f"2 of the 20 rows of {tmp_path / 'all.jsonl'}"
    again = build_data({**cfg, "val_fraction": 0.1, "test_fraction": 0.2}, seed=3)
    np.testing.assert_array_equal(
        data.source.splits["test"].arrays["inputs"], again.source.splits["test"].arrays["inputs"]
    )


def test_parquet_with_task_sft_reads_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = make_tokenizer(tmp_path / "tok", "smollm2")
    rows = [{"messages": TWO_TURNS}, {"messages": WITH_SYSTEM}]
    for ext in ("jsonl", "parquet"):
        (tmp_path / ext).mkdir()
    for split in ("train", "val"):
        write_jsonl(tmp_path / "jsonl" / f"{split}.jsonl", rows)
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "parquet" / f"{split}.parquet")
    got = {}
    for ext in ("jsonl", "parquet"):
        cfg = {"source": f"{ext}:{tmp_path / ext}", "tokenizer": path, "seq_len": 96}
        got[ext] = build_data(cfg, seed=0, task="sft")
    for key in ("inputs", "weights"):
        np.testing.assert_array_equal(
            got["jsonl"].source.splits["train"].arrays[key],
            got["parquet"].source.splits["train"].arrays[key],
        )
    assert got["parquet"].split_names["test"].endswith("val.parquet (no test.parquet)")
    bad = [{"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": 2}]}]
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "parquet" / "val.parquet")
    with pytest.raises(UserError, match=r"val.parquet row 0: expected 'content' to be a string"):
        build_data(
            {"source": f"parquet:{tmp_path / 'parquet'}", "tokenizer": path}, task="sft", seed=0
        )
