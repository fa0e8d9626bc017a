"""Diabetes progression one year on (442 rows, 10 features): regression, the article's MSE.

    jaxdl train --config experiments/diabetes.py --workdir runs/diabetes
    python experiments/diabetes.py --baselines      # scikit-learn on the same split

The target is standardized with the train rows' mean and deviation; test MSE, MAE and
R^2 in summary.json are in the target's original units.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 42
    c.task = "regression"
    c.model = {"name": "tabular_mlp", "num_classes": 1, "hidden": (32,), "dropout_rate": 0.1}
    c.data = {"source": "sklearn:diabetes", "batch_size": 32}
    c.loss = {"name": "mse"}
    c.optimizer = {"name": "adamw", "learning_rate": 1e-3, "weight_decay": 1e-3}
    c.num_epochs = 100
    c.log_every = 20
    c.best_metric = "val_r2"
    c.early_stopping = {"patience": 10, "min_delta": 0.0}
    return c


if __name__ == "__main__":
    import sys

    from jaxdl.training.baselines import main

    sys.exit(main(get_config(), sys.argv[1:]))
