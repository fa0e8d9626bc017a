"""k-fold cross-validation: one run per fold, per-fold figures and mean +/- std."""

import json

import numpy as np
import pytest

from jaxdl import config as config_lib
from jaxdl.errors import UserError
from jaxdl.training.crossval import cross_validate


def test_two_folds_write_per_fold_and_mean_std(tmp_path):
    cfg = config_lib.load_config(
        "experiments/digits_mlp.py",
        [
            "--config.num_epochs=0",
            "--config.num_steps=20",
            "--config.eval_every=20",
            "--config.model.hidden=(32,)",
        ],
    )
    summary = cross_validate(cfg, tmp_path, folds=2, progress=False)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    accs = [f["val_accuracy"] for f in summary["per_fold"]]
    assert len(accs) == 2 and accs[0] != accs[1]  # different held-out folds
    assert summary["mean_std"]["val_accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert summary["mean_std"]["val_accuracy"]["std"] == pytest.approx(np.std(accs))
    for i in range(2):
        assert (tmp_path / f"fold_{i}" / "summary.json").is_file()


def test_folds_below_two_are_refused(tmp_path):
    cfg = config_lib.load_config("experiments/digits_mlp.py")
    with pytest.raises(ValueError, match="--folds: expected at least 2"):
        cross_validate(cfg, tmp_path, folds=1)


def test_more_folds_than_examples_are_refused(tmp_path):
    cfg = config_lib.load_config("experiments/digits_mlp.py")
    with pytest.raises(UserError, match=r"--folds: expected at most 1437 \(the train and val"):
        cross_validate(cfg, tmp_path, folds=5000, progress=False)
    assert not (tmp_path / "fold_0").exists()
