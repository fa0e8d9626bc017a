"""scikit-learn baselines see exactly the run's split and are scored by the same code."""

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.linear_model import LogisticRegression

from jaxdl.config import default_config, merge_config
from jaxdl.data import build_data
from jaxdl.training.baselines import format_table, run_baselines


def test_breast_cancer_baselines_use_the_run_split():
    cfg = merge_config(
        default_config(),
        {"seed": 3, "task": "binary", "data": {"source": "sklearn:breast_cancer"}},
    )
    task, rows = run_baselines(cfg)
    assert task == "binary"
    assert set(rows) == {"LogisticRegression", "HistGradientBoosting", "MLPClassifier"}
    data = build_data(cfg.data, seed=3, task="binary")
    train, test = data.source.splits["train"], data.source.splits["test"]
    model = LogisticRegression(max_iter=5000).fit(train.features, train.labels)
    auc = skm.roc_auc_score(test.labels, model.predict_proba(test.features)[:, 1])
    assert rows["LogisticRegression"]["roc_auc"] == pytest.approx(auc, abs=1e-12)
    assert all(r["roc_auc"] > 0.95 for r in rows.values())
    table = format_table(task, rows)
    assert (
        table.splitlines()[0] == "| model | test roc_auc | test pr_auc | test f1 | test accuracy |"
    )
    assert len(table.splitlines()) == 5
    assert np.isclose(test.labels.mean(), 212 / 569, atol=0.01)
