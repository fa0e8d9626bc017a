"""Text classification: the textfolder source, the transformer's classify head, and a
pretrained byte LM (or an imported GPT-2 with its tokenizer) fine-tuned with a new last
layer from the real `jaxdl train`."""

import json
import os
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdl import testing
from jaxdl.checkpoint.read import load_params
from jaxdl.cli import main as cli_main
from jaxdl.core import steps, tree
from jaxdl.data import build_data
from jaxdl.data.textfolder import encode_text
from jaxdl.deploy.predict import predict_files
from jaxdl.errors import UserError
from jaxdl.lm.tokenizer import load_tokenizer
from jaxdl.models import create_model
from jaxdl.training.evaluate import export_workdir, restore_run

# One xdist worker runs this module (--dist loadgroup): its module fixtures are made once.
pytestmark = pytest.mark.xdist_group("test_textclf")

TINY = {"name": "transformer", "size": "tiny", "vocab_size": 256}
GPT2_TINY = Path(__file__).parents[1] / "fixtures" / "hub" / "gpt2_tiny"


def _folder(root, classes=("alpha", "beta"), per_class=15):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            text = f"{name} sample {i} " + ("x" * c * 3) + "\n" * (i % 3)
            (root / name / f"{i}.txt").write_text(text)
    return root


def test_textfolder_source_pads_bytes_and_stratifies(tmp_path):
    root = _folder(tmp_path / "t")
    data = build_data({"source": f"textfolder:{root}", "seq_len": 16}, seed=0)
    assert data.kind == "classification"
    assert data.class_names == ["alpha", "beta"]
    assert data.example_spec["tokens"] == ((16,), np.dtype("int32"))
    assert sum(data.split_sizes.values()) == 30
    test = data.source.splits["test"]
    assert sorted(test.labels.tolist()) == [0, 0, 0, 1, 1, 1]  # 20 % of each class
    row = test.tokens[0]
    text = bytes(row[row > 0].astype(np.uint8).tolist()).decode()
    assert text.startswith(("alpha sample", "beta sample"))
    short = data.source.splits["train"].tokens
    assert (short[:, -1] == 0).any()  # shorter files are right-padded with 0


def test_textfolder_errors_are_one_line(tmp_path):
    one = _folder(tmp_path / "one", classes=("only",))
    with pytest.raises(UserError, match=r"1 class folder\(s\) \['only'\], a classifier needs"):
        build_data({"source": f"textfolder:{one}"}, seed=0)
    root = _folder(tmp_path / "two")
    (root / "beta" / "empty.txt").write_text("  \n")
    with pytest.raises(UserError, match="empty.txt is empty"):
        build_data({"source": f"textfolder:{root}"}, seed=0)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_classify_head_ignores_right_padding(pooling):
    model = create_model({**TINY, "head": "classify", "num_classes": 3, "pooling": pooling})
    tokens = jnp.asarray([[72, 105, 33, 10, 0, 0, 0, 0], [65, 66, 67, 68, 69, 70, 71, 72]])
    variables = model.init(jax.random.PRNGKey(0), tokens)
    full = model.apply(variables, tokens)
    assert full.shape == (2, 3)
    trimmed = model.apply(variables, tokens[:1, :4])
    np.testing.assert_allclose(full[:1], trimmed, atol=1e-5)
    repadded = model.apply(variables, tokens.at[0, 4:].set(0))
    np.testing.assert_allclose(full, repadded, atol=0)
    lm = create_model(TINY).init(jax.random.PRNGKey(0), tokens)
    paths = set(tree.flatten(variables["params"]))
    assert paths - set(tree.flatten(lm["params"])) == {"classifier/kernel", "classifier/bias"}


def test_pretrained_lm_gets_a_new_last_layer_frozen_body(tmp_path):
    env = testing.subprocess_env()
    lm_dir = tmp_path / "lm"
    pretrain = testing.train_command(
        "experiments/lm_stdlib_pretrain.py",
        lm_dir,
        [
            "--config.model.size=tiny",
            "--config.data.source=text:pydoc",
            "--config.data.seq_len=32",
            "--config.data.max_bytes=60000",
            "--config.num_steps=6",
            "--config.log_every=3",
            "--config.eval_every=6",
        ],
    )
    subprocess.run(pretrain, check=True, capture_output=True, env=env)
    root = _folder(tmp_path / "texts", classes=("alpha", "beta", "gamma"))
    clf_dir = tmp_path / "clf"
    finetune = testing.train_command(
        "experiments/text_classify_stdlib.py",
        clf_dir,
        [
            f"--config.data.source=textfolder:{root}",
            "--config.data.seq_len=32",
            "--config.data.batch_size=8",
            "--config.model.size=tiny",
            "--config.model.num_classes=3",
            "--config.num_epochs=0",
            "--config.num_steps=8",
            "--config.optimizer.warmup_steps=2",
            f"--config.init_from.checkpoint={lm_dir}",
            '--config.init_from.reinit=["params/classifier/.*"]',
            '--config.partition=[["params/classifier/.*", {}], [".*", {"trainable": False}]]',
        ],
    )
    done = subprocess.run(finetune, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((clf_dir / "init_report.json").read_text())
    assert report["reinitialized"] == ["params/classifier/bias", "params/classifier/kernel"]
    assert not report["missing"]
    summary = json.loads((clf_dir / "summary.json").read_text())
    assert summary["trainable_params"] == 32 * 3 + 3  # the new layer only
    assert "test_macro_f1" in summary and len(summary["test_confusion_matrix"]) == 3
    before = tree.flatten(load_params(lm_dir))
    after = tree.flatten(load_params(clf_dir))
    assert set(after) - set(before) == {"classifier/kernel", "classifier/bias"}
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value)  # the body stayed frozen

    # Export, then predict text files: the artifact equals the restored model.
    export_workdir(clf_dir, tmp_path / "clf.jaxexport")
    files = sorted((root / "gamma").glob("*.txt"))[:2] + sorted((root / "alpha").glob("*.txt"))[:1]
    results = predict_files(tmp_path / "clf.jaxexport", files, top_k=3)
    _, setup, _ = restore_run(clf_dir)
    tokens = np.stack([encode_text(f.read_bytes(), 32, str(f)) for f in files])
    probs = jax.nn.softmax(steps.make_predict(setup.model)(setup.state, tokens), axis=-1)
    for result, row in zip(results, np.asarray(probs), strict=True):
        best = result["top_k"][0]
        assert best["class"] == ["alpha", "beta", "gamma"][int(row.argmax())]
        assert best["prob"] == pytest.approx(float(row.max()), abs=1e-6)


def test_one_class_text_folder_exits_2(tmp_path, capsys):
    root = _folder(tmp_path / "one", classes=("only",))
    argv = ["train", "--config", "experiments/text_classify_stdlib.py"]
    argv += ["--workdir", str(tmp_path / "w"), f"--config.data.source=textfolder:{root}"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "a classifier needs at least 2" in err and len(err.splitlines()) == 1


def test_csv_text_column_gives_byte_tokens(tmp_path):
    path = tmp_path / "t.csv"
    rows = [f'"note {i}, {"spam" if i % 2 else "ham"}",{i % 2}' for i in range(30)]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    cfg = {"source": f"csv:{path}", "label_column": "label", "text_column": "text"}
    data = build_data({**cfg, "seq_len": 24}, seed=0)
    assert data.kind == "binary"
    assert data.example_spec["tokens"] == ((24,), np.dtype("int32"))
    assert data.task_fields == {
        "model": {"num_classes": 1, "pad_id": 0},
        "head": {"input_key": "tokens", "class_counts": [10, 11]},
    }
    row = data.source.splits["train"].tokens[0]
    assert bytes(row[row > 0].astype(np.uint8).tolist()).decode().startswith("note ")
    path.write_text("text,label\n" + "\n".join(rows) + '\n"",1\n')
    with pytest.raises(UserError, match=r"'text' at line 32 of .* is empty"):
        build_data(cfg, seed=0)


def _code_folder(root):
    """Three classes of short Python-ish texts, so BPE ids (not bytes) carry the signal."""
    words = {"defs": "def f(x):\n    return x", "imports": "import os, sys", "loops": "for i in"}
    for c, (name, text) in enumerate(words.items()):
        (root / name).mkdir(parents=True)
        for i in range(12):
            (root / name / f"{i}.txt").write_text(f"{text} {i} # {'!' * c}\n")
    return root


@pytest.fixture(scope="module")
def gpt2_imported(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt2") / "imported"
    assert cli_main(["import", "hf:gpt2", "--from", str(GPT2_TINY), "--out", str(out)]) == 0
    return out


def _gpt2_train(workdir, root, imported, *extra) -> int:
    argv = ["train", "--config", "experiments/gpt2_classify_stdlib.py", "--workdir", str(workdir)]
    argv += [
        f"--config.data.source=textfolder:{root}",
        "--config.data.seq_len=16",
        "--config.data.batch_size=8",
        "--config.model.num_classes=3",
        "--config.num_epochs=0",
        "--config.num_steps=4",
        "--config.log_every=2",
        "--config.optimizer.warmup_steps=1",
        *extra,
    ]
    os.environ["JAXDL_GPT2_WORKDIR"] = str(imported)
    try:
        return cli_main(argv)
    finally:
        del os.environ["JAXDL_GPT2_WORKDIR"]


def test_textfolder_reads_an_imported_tokenizer_and_pads_past_its_vocabulary(
    tmp_path, gpt2_imported
):
    root = _code_folder(tmp_path / "t")
    tokenizer = str(gpt2_imported / "tokenizer.json")
    data = build_data(
        {"source": f"textfolder:{root}", "seq_len": 16, "tokenizer": tokenizer}, seed=0
    )
    assert data.task_fields["model"] == {"num_classes": 3, "pad_id": 512}
    assert data.preprocessing["tokenizer"] == tokenizer
    rows = data.source.splits["train"].tokens
    assert rows.max() == 512 and rows[rows < 512].max() > 255  # BPE ids, padded with 512
    first = rows[0][rows[0] < 512]
    text = load_tokenizer(tokenizer).decode(first)
    assert text.startswith(("def f(x)", "import os", "for i in"))
    np.testing.assert_array_equal(first, load_tokenizer(tokenizer).encode(text))

    table = tmp_path / "t.csv"
    table.write_text("text,label\n" + "".join(f"import os  # {i},{i % 2}\n" for i in range(20)))
    cfg = {"source": f"csv:{table}", "label_column": "label", "text_column": "text"}
    data = build_data({**cfg, "seq_len": 16, "tokenizer": tokenizer}, seed=0)
    assert data.task_fields["model"] == {"num_classes": 1, "pad_id": 512}
    row = data.source.splits["train"].tokens[0]
    assert load_tokenizer(tokenizer).decode(row[row < 512]).startswith("import os  # ")


def test_classify_head_pads_with_an_id_past_the_vocabulary():
    model = create_model({**TINY, "head": "classify", "num_classes": 2, "pad_id": 256})
    tokens = jnp.asarray([[72, 0, 33, 10, 256, 256], [65, 66, 67, 68, 69, 70]])
    variables = model.init(jax.random.PRNGKey(0), tokens)
    full = model.apply(variables, tokens)
    np.testing.assert_allclose(full[:1], model.apply(variables, tokens[:1, :4]), atol=1e-5)
    assert np.isfinite(np.asarray(full)).all()  # token 0 is text here, not padding
    wide = create_model({**TINY, "head": "classify", "num_classes": 2, "pad_id": 300})
    with pytest.raises(UserError, match="its vocabulary has 300 ids, model.vocab_size is 256"):
        wide.init(jax.random.PRNGKey(0), tokens)


def test_imported_gpt2_classifies_text_with_its_tokenizer(tmp_path, gpt2_imported):
    """`jaxdl import hf:gpt2`, then `jaxdl train` with head=classify from that workdir: full
    fine-tune to test metrics and an exported artifact that predicts text files through
    the tokenizer; frozen-but-head and LoRA variants train too."""
    root = _code_folder(tmp_path / "texts")
    full = tmp_path / "full"
    assert _gpt2_train(full, root, gpt2_imported) == 0
    report = json.loads((full / "init_report.json").read_text())
    assert report["reinitialized"] == ["params/classifier/bias", "params/classifier/kernel"]
    assert not report["missing"] and len(report["loaded"]) == 4 + 2 * 16
    summary = json.loads((full / "summary.json").read_text())
    assert summary["steps"] == 4 and len(summary["test_confusion_matrix"]) == 3
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and "test_macro_f1" in summary

    export_workdir(full, tmp_path / "clf.jaxexport")
    files = sorted((root / "loops").glob("*.txt"))[:2] + sorted((root / "defs").glob("*.txt"))[:1]
    results = predict_files(tmp_path / "clf.jaxexport", files, top_k=3)
    _, setup, _ = restore_run(full)
    tokenizer = load_tokenizer(str(gpt2_imported / "tokenizer.json"))
    tokens = np.stack([encode_text(f.read_bytes(), 16, str(f), tokenizer) for f in files])
    probs = np.asarray(jax.nn.softmax(steps.make_predict(setup.model)(setup.state, tokens), -1))
    for result, row in zip(results, probs, strict=True):
        assert result["top_k"][0]["class"] == ["defs", "imports", "loops"][int(row.argmax())]
        assert result["top_k"][0]["prob"] == pytest.approx(float(row.max()), abs=1e-6)

    frozen = tmp_path / "frozen"
    head_only = '--config.partition=[["params/classifier/.*", {}], [".*", {"trainable": False}]]'
    assert _gpt2_train(frozen, root, gpt2_imported, head_only) == 0
    assert json.loads((frozen / "summary.json").read_text())["trainable_params"] == 32 * 3 + 3
    imported = tree.flatten(load_params(gpt2_imported))
    after = tree.flatten(load_params(frozen))
    for path, value in imported.items():
        np.testing.assert_array_equal(after[path], value)  # the body stayed frozen

    lora = tmp_path / "lora"
    adapters = '--config.lora={"rank": 2, "alpha": 4, "targets": "params/.*/(query|value)/kernel"}'
    partition = (
        '--config.partition=[["lora/.*", {}], ["params/classifier/.*", {}], '
        '[".*", {"trainable": False}]]'
    )
    assert _gpt2_train(lora, root, gpt2_imported, adapters, partition) == 0
    # rank-2 A [32, 2] and B [2, 32] on query and value of 2 blocks, plus the new layer
    trainable = 2 * 2 * (32 * 2 + 2 * 32) + 32 * 3 + 3
    assert json.loads((lora / "summary.json").read_text())["trainable_params"] == trainable
