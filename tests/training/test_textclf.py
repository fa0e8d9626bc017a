"""Text classification: the textfolder source, the transformer's classify head, and a
pretrained byte LM fine-tuned with a new last layer from the real `jaxdl train`."""

import json
import subprocess

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
from jaxdl.models import create_model
from jaxdl.training.evaluate import export_workdir, restore_run

TINY = {"name": "transformer", "size": "tiny", "vocab_size": 256}


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
        "model": {"num_classes": 1},
        "head": {"input_key": "tokens", "class_counts": [10, 11]},
    }
    row = data.source.splits["train"].tokens[0]
    assert bytes(row[row > 0].astype(np.uint8).tolist()).decode().startswith("note ")
    path.write_text("text,label\n" + "\n".join(rows) + '\n"",1\n')
    with pytest.raises(UserError, match=r"'text' at line 32 of .* is empty"):
        build_data(cfg, seed=0)
