"""Each table task trains from the real `jaxdl train` command; its summary metrics equal
scikit-learn's on the restored model's own test predictions; resume after SIGKILL is
bitwise; bad tables exit 2 with one line."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from sklearn import metrics as skm

from jaxdl import testing
from jaxdl.cli import main as cli_main
from jaxdl.core import steps
from jaxdl.training.evaluate import restore_run
from jaxdl.training.runlog import read_metrics

SHORT = ["--config.num_epochs=0", "--config.num_steps=24", "--config.log_every=8"]


def _train(config, workdir, *overrides):
    cmd = testing.train_command(config, workdir, [*SHORT, *overrides])
    done = subprocess.run(cmd, capture_output=True, text=True, env=testing.subprocess_env())
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((workdir / "summary.json").read_text()), done.stdout


def _test_outputs(workdir):
    """(restored model outputs [N, K], labels) on the run's test split."""
    _, setup, data = restore_run(workdir)
    split = data.source.splits["test"]
    outputs = steps.make_predict(setup.model, setup.lora_cfg)(setup.state, split.features)
    return np.asarray(outputs, np.float64), split.labels


def _loans(path, rows=600):
    sys.path.insert(0, "experiments")
    try:
        from make_tabular_csv import make_rows
    finally:
        sys.path.pop(0)
    table = make_rows(rows, seed=0)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    return path


def test_binary_run_metrics_equal_sklearn_on_its_predictions(tmp_path):
    summary, _ = _train("experiments/breast_cancer.py", tmp_path / "bc")
    logits, y = _test_outputs(tmp_path / "bc")
    p = 1 / (1 + np.exp(-logits[:, 0]))
    assert summary["test_roc_auc"] == pytest.approx(skm.roc_auc_score(y, p), abs=1e-6)
    assert summary["test_pr_auc"] == pytest.approx(skm.average_precision_score(y, p), abs=1e-6)
    assert summary["test_f1"] == pytest.approx(skm.f1_score(y, p >= 0.5), abs=1e-6)
    assert 0 < summary["val_best_threshold"] < 1
    val = [r for r in read_metrics(tmp_path / "bc" / "metrics.jsonl") if r["split"] == "val"]
    assert {"roc_auc", "pr_auc", "f1", "precision", "recall", "accuracy"} <= set(val[-1])
    assert (tmp_path / "bc" / "confusion.png").stat().st_size > 0


def test_regression_run_reports_original_units(tmp_path):
    summary, _ = _train("experiments/diabetes.py", tmp_path / "diab")
    z, y = _test_outputs(tmp_path / "diab")
    from jaxdl.data import build_data

    stats = build_data({"source": "sklearn:diabetes"}, seed=42, task="regression")
    head = stats.task_fields["head"]
    pred = z * np.asarray(head["target_std"]) + np.asarray(head["target_mean"])
    assert summary["test_r2"] == pytest.approx(skm.r2_score(y, pred), abs=1e-6)
    assert summary["test_mae"] == pytest.approx(skm.mean_absolute_error(y, pred), rel=1e-6)
    assert summary["test_mae"] > 20  # diabetes targets span 25..346: original units, not z


def test_classification_run_has_macro_f1_and_confusion(tmp_path):
    summary, _ = _train("experiments/wine.py", tmp_path / "wine")
    logits, y = _test_outputs(tmp_path / "wine")
    pred = logits.argmax(1)
    assert summary["test_macro_f1"] == pytest.approx(
        skm.f1_score(y, pred, average="macro"), abs=1e-6
    )
    assert summary["test_confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    assert len(summary["test_per_class_recall"]) == 3
    assert (tmp_path / "wine" / "confusion.png").exists()


def test_multilabel_csv_task_is_inferred_and_printed(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 3))
    path = tmp_path / "ml.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["a", "b", "c", "up", "big"])
        for row in x:
            writer.writerow([*np.round(row, 4), int(row[0] > 0), int(row[1] + row[2] > 0.5)])
    overrides = [f"--config.data.source=csv:{path}", "--config.data.label_column=up,big"]
    summary, stdout = _train("experiments/tabular_csv.py", tmp_path / "ml", *overrides)
    assert "task: multilabel (2 label columns)" in stdout
    scores, y = _test_outputs(tmp_path / "ml")
    pred = (scores > 0).astype(int)
    assert summary["test_micro_f1"] == pytest.approx(
        skm.f1_score(y, pred, average="micro"), abs=1e-6
    )
    assert len(summary["test_per_label_roc_auc"]) == 2


def test_csv_run_resumes_bitwise_after_sigkill(tmp_path):
    path = _loans(tmp_path / "loans.csv")
    args = [
        f"--config.data.source=csv:{path}",
        "--config.num_epochs=0",
        "--config.num_steps=60",
        "--config.log_every=5",
        "--config.checkpoint_every=5",
        "--config.eval_every=30",
    ]
    env = testing.subprocess_env()
    straight = tmp_path / "straight"
    subprocess.run(
        testing.train_command("experiments/tabular_csv.py", straight, args),
        check=True,
        capture_output=True,
        env=env,
    )
    killed = tmp_path / "killed"
    cmd = testing.train_command("experiments/tabular_csv.py", killed, args)
    testing.kill_mid_run(cmd, killed, after_step=15, env=env, timeout=120)
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    a, b = (json.loads((w / "summary.json").read_text()) for w in (straight, killed))
    assert a["params_sha256"] == b["params_sha256"]
    assert a["test_roc_auc"] == b["test_roc_auc"]


def test_regression_resume_is_exact(tmp_path):
    testing.assert_resume_exact(
        "experiments/diabetes.py",
        tmp_path,
        steps=12,
        overrides=["--config.eval_every=6", "--config.early_stopping.patience=0"],
    )


@pytest.mark.parametrize(
    ("rows", "overrides", "message"),
    [
        ([["1", "0"]] * 20, ["--config.data.label_column=nope"], "data.label_column: expected"),
        (
            [[str(i), str(i % 2)] for i in range(20)] + [["x1", "1"]],
            [],
            "column 'x' is numeric but holds 'x1'",
        ),
        (
            [[str(i), f"{i / 3:.3f}"] for i in range(20)] + [["1", ""]],
            ["--config.task=regression"],
            "regression target 'y' is missing/NaN",
        ),
        ([[str(i), str(i % 2)] for i in range(20)] + [["1", "7"]], [], "3 rows per class"),
        ([["1", "0"], ["2", "1", "5"]], [], "line 3 has 3 fields"),
    ],
)
def test_bad_tables_exit_2_with_one_line(tmp_path, capsys, rows, overrides, message):
    path = tmp_path / "bad.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([["x", "y"], *rows])
    argv = ["train", "--config", "experiments/tabular_csv.py", "--workdir", str(tmp_path / "w")]
    argv += [f"--config.data.source=csv:{path}", "--config.data.label_column=y", *overrides]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "w").exists()
