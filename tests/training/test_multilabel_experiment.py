"""experiments/multilabel_csv.py: its generated CSV trains as a multilabel task from the
`jaxdl` command, and summary.json's micro/macro F1 and per-label ROC AUC equal
scikit-learn's on the restored model's own test predictions."""

import csv
import json
import sys

import numpy as np
import pytest
from sklearn import metrics as skm

from jaxdl.cli import main as cli_main
from jaxdl.core import steps
from jaxdl.training.evaluate import restore_run

# One xdist worker runs this module (--dist loadgroup): its module fixtures are made once.
pytestmark = pytest.mark.xdist_group("test_multilabel_experiment")


@pytest.fixture(scope="module")
def experiment():
    sys.path.insert(0, "experiments")
    try:
        import multilabel_csv
    finally:
        sys.path.pop(0)
    return multilabel_csv


def test_make_data_is_seeded_and_multilabel(tmp_path, experiment, capsys):
    experiment.make_data(str(tmp_path / "a.csv"), rows=200)
    experiment.make_data(str(tmp_path / "b.csv"), rows=200)
    capsys.readouterr()
    text = (tmp_path / "a.csv").read_text()
    assert text == (tmp_path / "b.csv").read_text()
    rows = list(csv.reader(text.splitlines()))
    assert rows[0][-5:] == experiment.LABELS.split(",") and len(rows) == 201
    y = np.asarray([r[-5:] for r in rows[1:]], int)
    assert set(np.unique(y)) == {0, 1} and (y.sum(axis=1) > 1).mean() > 0.3  # label subsets


def test_summary_metrics_equal_sklearn_on_the_run_predictions(tmp_path, experiment, capsys):
    data = tmp_path / "ml.csv"
    experiment.make_data(str(data), rows=600)
    workdir = tmp_path / "run"
    argv = ["train", "--config", "experiments/multilabel_csv.py", "--workdir", str(workdir)]
    argv += [f"--config.data.source=csv:{data}", "--config.num_epochs=0"]
    argv += ["--config.num_steps=60", "--config.log_every=20"]
    assert cli_main(argv) == 0
    assert "task: multilabel" in capsys.readouterr().out
    summary = json.loads((workdir / "summary.json").read_text())

    _, setup, built = restore_run(workdir)
    split = built.source.splits["test"]
    logits = steps.make_predict(setup.model, setup.lora_cfg)(setup.state, split.features)
    scores = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
    y = split.labels.astype(int)
    pred = (scores >= 0.5).astype(int)
    assert y.shape == (120, 5)  # 20 % of 600 rows, 5 labels
    for average in ("micro", "macro"):
        want = skm.f1_score(y, pred, average=average, zero_division=0)
        assert summary[f"test_{average}_f1"] == pytest.approx(want, abs=1e-6)
    want_auc = [skm.roc_auc_score(y[:, j], scores[:, j]) for j in range(5)]
    np.testing.assert_allclose(summary["test_per_label_roc_auc"], want_auc, atol=1e-6)
    assert summary["test_macro_roc_auc"] == pytest.approx(np.mean(want_auc), abs=1e-6)
    assert 0.6 < summary["test_macro_roc_auc"] < 1.0  # it learned something, not everything
