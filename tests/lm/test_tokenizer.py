"""data.tokenizer: the committed stdlib BPE, text sources, generate and predict with it."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer

from jaxdl.data import build_data
from jaxdl.errors import UserError
from jaxdl.interop import import_checkpoint
from jaxdl.lm.generate import generate_text
from jaxdl.lm.tokenizer import ByteTokenizer, hf_tokenizer_json, load_tokenizer, train_bpe
from jaxdl.testing import subprocess_env

# One xdist worker runs this module (--dist loadgroup): its module fixtures are made once.
pytestmark = pytest.mark.xdist_group("test_tokenizer")

FIXTURES = Path(__file__).parents[1] / "fixtures" / "hub"
BPE = FIXTURES / "bpe_stdlib.json"
CODE = "import os\n\ndef main(argv=None):\n    return os.path.join('a', 'b')  # héllo ✓\n"


def test_bpe_fixture_round_trips_and_compresses_python():
    tok = load_tokenizer(str(BPE))
    assert tok.vocab_size == 512
    ids = tok.encode(CODE)
    assert ids.dtype == np.int32 and ids.max() < 512
    assert tok.decode(ids) == CODE
    assert len(CODE.encode()) / len(ids) > 1.5  # 256 merges learned from stdlib code
    with pytest.raises(UserError, match=r"tokens: expected ids in \[0, 512\)"):
        tok.decode([600])


def test_bytes_is_the_default_and_bad_paths_fail_in_one_line(tmp_path):
    assert isinstance(load_tokenizer("bytes"), ByteTokenizer)
    assert isinstance(load_tokenizer(""), ByteTokenizer)
    with pytest.raises(UserError, match="data.tokenizer: no file at"):
        load_tokenizer(str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="is not a tokenizers tokenizer.json") as err:
        load_tokenizer(str(tmp_path / "bad.json"))
    assert "\n" not in str(err.value)


def test_train_bpe_is_deterministic_and_byte_complete():
    texts = ["def f(x):\n    return x + 1\n"] * 50
    first, second = train_bpe(texts, 300), train_bpe(texts, 300)
    assert first == second
    tok = Tokenizer.from_str(first)
    assert tok.decode(tok.encode("ü€😀").ids) == "ü€😀"  # bytes never seen in training


def test_vocab_and_merges_become_a_tokenizer_json(tmp_path):
    """A save_pretrained folder with only GPT-2's vocab.json + merges.txt still imports."""
    Tokenizer.from_file(str(BPE)).model.save(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merges.txt", "vocab.json"]
    built = Tokenizer.from_str(hf_tokenizer_json(tmp_path).decode())
    assert built.encode(CODE).ids == load_tokenizer(str(BPE)).encode(CODE).tolist()
    assert hf_tokenizer_json(tmp_path / "missing") is None


def test_text_source_with_a_tokenizer():
    data = build_data({"source": "text:pydoc", "tokenizer": str(BPE), "seq_len": 32}, seed=0)
    assert data.kind == "lm" and data.num_classes == 512
    assert data.preprocessing["tokenizer"] == str(BPE)
    by_bytes = build_data({"source": "text:pydoc", "seq_len": 32}, seed=0)
    assert by_bytes.num_classes == 256 and by_bytes.preprocessing["tokenizer"] == "bytes"
    assert by_bytes.preprocessing["bytes_per_token"] == 1.0
    assert data.preprocessing["bytes_per_token"] > 1.5
    # the LM head reports bits per byte of text, not per token
    assert data.task_fields["head"]["bytes_per_token"] == data.preprocessing["bytes_per_token"]
    # tokens: fewer windows than bytes, and the first window decodes to the corpus's start
    assert data.split_sizes["train"] < by_bytes.split_sizes["train"] / 1.5
    batch = next(iter(data.eval_iter("val", 4)))
    assert batch["inputs"].shape == (4, 32) and batch["inputs"].max() < 512
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    from pydoc_data.topics import topics

    first = load_tokenizer(str(BPE)).decode(next(iter(data.eval_iter("train", 1)))["inputs"][0])
    assert "\n".join(topics[k] for k in sorted(topics)).startswith(first)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    out = tmp_path_factory.mktemp("hub") / "gpt2"
    import_checkpoint("hf:gpt2", str(FIXTURES / "gpt2_tiny"), out)
    return out


def test_generate_uses_the_workdir_tokenizer(imported):
    """Greedy generation = argmax of the full-sequence logits, token by token, in BPE ids."""
    from jaxdl.checkpoint.read import load_params
    from jaxdl.models import create_model

    cfg = json.loads((imported / "config.json").read_text())
    model, params = create_model(cfg["model"]), {"params": load_params(imported)}
    tok = load_tokenizer(cfg["data"]["tokenizer"])
    forward = jax.jit(model.apply)  # causal: padding after position i leaves logits[i] as is
    ids = list(tok.encode("def main("))
    for _ in range(8):
        padded = np.zeros((1, 16), np.int32)
        padded[0, : len(ids)] = ids
        ids.append(int(np.argmax(forward(params, padded)[0, len(ids) - 1])))
    text = generate_text(str(imported), "def main(", max_new_tokens=8, greedy=True)
    assert text == tok.decode(ids)


def test_export_and_predict_use_the_tokenizer(imported, tmp_path):
    model = tmp_path / "m.jaxexport"
    env = subprocess_env()
    cli = [sys.executable, "-m", "jaxdl.cli"]
    done = subprocess.run(
        [*cli, "export", "--workdir", str(imported), "--out", str(model)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    meta = json.loads(Path(f"{model}.json").read_text())
    assert meta["vocabulary"] == {"tokenizer": str(imported / "tokenizer.json"), "vocab_size": 512}
    (tmp_path / "prompt.txt").write_text("def main(")
    done = subprocess.run(
        [
            *cli,
            "predict",
            str(model),
            str(tmp_path / "prompt.txt"),
            "--json",
            "--max-new-tokens",
            "16",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)[0]
    want = generate_text(str(imported), "def main(", max_new_tokens=16, greedy=True)
    assert "def main(" + result["continuation"] == want
