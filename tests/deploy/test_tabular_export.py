"""Tables export and predict: `jaxdl predict M.jaxexport rows.csv --json` encodes rows with
the train split's statistics from the sidecar and equals the restored model."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from jaxdl import testing
from jaxdl.core import steps
from jaxdl.data.tabular import encode_features, read_csv
from jaxdl.deploy.predict import predict_files
from jaxdl.training.evaluate import export_workdir, restore_run

SHORT = ["--config.num_epochs=0", "--config.num_steps=20", "--config.log_every=10"]


def _train(workdir, *overrides):
    cmd = testing.train_command("experiments/tabular_csv.py", workdir, [*SHORT, *overrides])
    done = subprocess.run(cmd, capture_output=True, text=True, env=testing.subprocess_env())
    assert done.returncode == 0, done.stderr[-3000:]


def _model_outputs(workdir, csv_path):
    _, setup, data = restore_run(workdir)
    x = encode_features(data.preprocessing["preprocessing"], read_csv(csv_path))
    return np.asarray(steps.make_predict(setup.model)(setup.state, x), np.float64), data


def test_binary_csv_predict_cli_equals_the_model(tmp_path):
    sys.path.insert(0, "experiments")
    try:
        from make_tabular_csv import make_rows
    finally:
        sys.path.pop(0)
    rows = make_rows(400, seed=1)
    train_csv, new_csv = tmp_path / "loans.csv", tmp_path / "new.csv"
    for path, part in ((train_csv, rows), (new_csv, rows[:7])):
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(part[0]))
            writer.writeheader()
            writer.writerows(part)
    workdir = tmp_path / "run"
    _train(workdir, f"--config.data.source=csv:{train_csv}")
    env = testing.subprocess_env()
    artifact = tmp_path / "loans.jaxexport"
    cli = [sys.executable, "-m", "jaxdl.cli"]
    subprocess.run(
        [*cli, "export", "--workdir", str(workdir), "--out", str(artifact)],
        check=True,
        capture_output=True,
        env=env,
    )
    done = subprocess.run(
        [*cli, "predict", str(artifact), str(new_csv), "--json"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout)
    logits, data = _model_outputs(workdir, new_csv)
    expected = 1 / (1 + np.exp(-logits[:, 0]))
    assert [r["row"] for r in results] == list(range(7))
    no, yes = data.class_names
    for r, p in zip(results, expected, strict=True):
        ranked = {c["class"]: c["prob"] for c in r["top_k"]}
        assert ranked == pytest.approx({yes: p, no: 1 - p}, abs=1e-6)
        assert r["class"] == r["top_k"][0]["class"] == (yes if p >= 0.5 else no)
    # The text form names each class beside its own probability, --top-k of them.
    done = subprocess.run(
        [*cli, "predict", str(artifact), str(new_csv), "--top-k", "1"],
        capture_output=True,
        text=True,
        env=env,
    )
    best = [max(p, 1 - p) for p in expected]
    assert done.stdout.splitlines() == [
        f"{new_csv}:{i}: {r['class']} ({best[i]:.4f})" for i, r in enumerate(results)
    ]
    sidecar = json.loads((tmp_path / "loans.jaxexport.json").read_text())
    prep = sidecar["preprocessing"]["source"]["preprocessing"]
    assert prep == data.preprocessing["preprocessing"]  # train statistics travel with it


def test_regression_predict_is_in_original_units(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "r.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["a", "color", "price"])
        for _ in range(200):
            a, color = rng.normal(), rng.choice(["red", "blue"])
            writer.writerow([f"{a:.4f}", color, f"{1000 + 200 * a + 50 * (color == 'red'):.2f}"])
    workdir = tmp_path / "run"
    _train(workdir, f"--config.data.source=csv:{path}", "--config.data.label_column=price")
    export_workdir(workdir, tmp_path / "r.jaxexport")
    results = predict_files(tmp_path / "r.jaxexport", [path])
    z, data = _model_outputs(workdir, path)
    head = data.task_fields["head"]
    expected = z[:, 0] * head["target_std"][0] + head["target_mean"][0]
    assert data.kind == "regression"
    got = np.asarray([r["prediction"] for r in results])
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert 500 < np.median(got) < 1500  # original units


def test_predict_rows_missing_a_feature_column_is_one_line(tmp_path):
    from jaxdl.deploy import predict

    class Fake:
        metadata = {
            "preprocessing": {
                "source": {
                    "preprocessing": {
                        "numeric": {"columns": ["a"], "mean": [0.0], "std": [1.0]},
                        "categorical": {"columns": [], "vocab": {}},
                    }
                }
            }
        }
        labels = ["y"]

    path = tmp_path / "x.csv"
    path.write_text("b\n1\n")
    with pytest.raises(predict.UserError, match=r"lacks the feature columns \['a'\]"):
        predict.predict_table_files(Fake(), [path])
