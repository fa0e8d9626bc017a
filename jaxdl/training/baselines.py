"""scikit-learn baselines on exactly the split and features a jaxdl table run uses.

    python experiments/breast_cancer.py --baselines [--config.KEY=VALUE ...]

The rows come from `build_data` of the experiment's config (same seed, same train/val/
test rows, numeric columns standardized on train). Linear models and the MLP see
categorical columns one-hot encoded; HistGradientBoosting takes their indices as native
categorical features. Each model trains on the train rows and is scored on the test rows
by `jaxdl.training.scores.exact_metrics`, the same code that scores jaxdl runs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from jaxdl import config as config_lib
from jaxdl.data import build_data
from jaxdl.training import scores

# The figure each task's table is sorted by, and the columns it shows.
COLUMNS = {
    "binary": ("roc_auc", "pr_auc", "f1", "accuracy"),
    "classification": ("accuracy", "macro_f1"),
    "multilabel": ("micro_f1", "macro_f1", "macro_roc_auc"),
    "regression": ("r2", "mae", "rmse"),
}


def _arrays(split: Any) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(split.features), np.asarray(split.labels)


def _one_hot(x: np.ndarray, num_numeric: int, vocab_sizes: Sequence[int]) -> np.ndarray:
    parts = [x[:, :num_numeric]]
    for j, size in enumerate(vocab_sizes):
        ids = x[:, num_numeric + j].astype(np.int64)
        parts.append(np.eye(size, dtype=np.float32)[ids])
    return np.concatenate(parts, axis=1)


def models(task: str, seed: int, categorical: np.ndarray) -> dict[str, Any]:
    """name -> unfitted estimator; ``categorical`` is a bool mask over the raw columns."""
    from sklearn.compose import TransformedTargetRegressor
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.multioutput import MultiOutputClassifier
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.preprocessing import StandardScaler

    cat = categorical if categorical.any() else None
    if task == "regression":
        mlp = MLPRegressor(
            hidden_layer_sizes=(64, 32), max_iter=2000, early_stopping=True, random_state=seed
        )
        return {
            "Ridge": Ridge(alpha=1.0),
            "HistGradientBoosting": HistGradientBoostingRegressor(
                categorical_features=cat, random_state=seed
            ),
            "MLPRegressor": TransformedTargetRegressor(mlp, transformer=StandardScaler()),
        }
    out = {
        "LogisticRegression": LogisticRegression(max_iter=5000),
        "HistGradientBoosting": HistGradientBoostingClassifier(
            categorical_features=cat, random_state=seed
        ),
        "MLPClassifier": MLPClassifier(
            hidden_layer_sizes=(64, 32), max_iter=2000, early_stopping=True, random_state=seed
        ),
    }
    if task == "multilabel":
        out = {k: MultiOutputClassifier(v) for k, v in out.items()}
    return out


def _predictions(task: str, model: Any, x: np.ndarray) -> dict[str, np.ndarray]:
    if task == "binary":
        return {"score": model.predict_proba(x)[:, 1]}
    if task == "multilabel":
        return {"score": np.stack([p[:, 1] for p in model.predict_proba(x)], axis=1)}
    if task == "classification":
        return {"pred": model.predict(x)}
    pred = model.predict(x)
    return {"pred": pred.reshape(len(x), -1)}


def run_baselines(cfg: ml_collections.ConfigDict) -> tuple[str, dict[str, dict[str, float]]]:
    """(task, {model name: test metrics}) for the table source of ``cfg``."""
    data = build_data(cfg.data, seed=cfg.seed, task=cfg.get("task") or None)
    task, fields = data.kind, data.task_fields["model"]
    num_numeric, vocab_sizes = fields["num_numeric"], fields["vocab_sizes"]
    x_train, y_train = _arrays(data.source.splits["train"])
    x_test, y_test = _arrays(data.source.splits["test"])
    categorical = np.arange(x_train.shape[1]) >= num_numeric
    results = {}
    for name, model in models(task, cfg.seed, categorical).items():
        native = name == "HistGradientBoosting"
        fit_x = x_train if native else _one_hot(x_train, num_numeric, vocab_sizes)
        test_x = x_test if native else _one_hot(x_test, num_numeric, vocab_sizes)
        target = y_train.ravel() if task == "regression" and y_train.shape[1] == 1 else y_train
        model.fit(fit_x, target)
        arrays = {"label": y_test, **_predictions(task, model, test_x)}
        metrics = scores.exact_metrics(task, arrays)
        if task in ("binary", "classification"):
            pred = arrays["pred"] if task == "classification" else arrays["score"] >= 0.5
            metrics["accuracy"] = float(np.mean(pred == y_test))
        results[name] = metrics
    return task, results


def format_table(task: str, rows: dict[str, dict[str, float]]) -> str:
    """A Markdown table: one row per model, the task's columns."""
    columns = [c for c in COLUMNS[task] if any(c in r for r in rows.values())]
    lines = [
        "| model | " + " | ".join(f"test {c}" for c in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for name, metrics in rows.items():
        cells = [f"{metrics[c]:.4f}" if c in metrics else "-" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(cfg: ml_collections.ConfigDict, argv: Sequence[str]) -> int:
    """An experiment's ``__main__``: ``--baselines [--json] [--config.KEY=VALUE ...]``."""
    if "--baselines" not in argv:
        print("usage: python experiments/NAME.py --baselines [--json] [--config.KEY=VALUE ...]")
        return 2
    overrides = [a for a in argv if a.startswith("--config.")]
    cfg = config_lib.merge_config(config_lib.default_config(), cfg)
    for item in overrides:
        config_lib.apply_override(cfg, item)
    task, rows = run_baselines(cfg)
    print(json.dumps(rows, indent=2) if "--json" in argv else format_table(task, rows))
    return 0
