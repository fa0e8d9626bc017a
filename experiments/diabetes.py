"""Diabetes progression one year on (442 rows, 10 features): regression, the article's MSE.

    jaxdl train --config experiments/diabetes.py --workdir runs/diabetes
    python experiments/diabetes.py --baselines      # scikit-learn on the same split

The target is standardized with the train rows' mean and deviation; test MSE, MAE and
R^2 in summary.json are in the target's original units.
"""

import ml_collections

from jaxdl.configs.tabular import tabular_config


def get_config() -> ml_collections.ConfigDict:
    c = tabular_config("sklearn:diabetes", task="regression")
    c.model.hidden = (32,)
    c.loss = {"name": "mse"}
    c.optimizer.weight_decay = 1e-3
    c.num_epochs = 100
    c.best_metric = "val_r2"
    c.early_stopping = {"patience": 10, "min_delta": 0.0}
    return c


if __name__ == "__main__":
    import sys

    from jaxdl.training.baselines import main

    sys.exit(main(get_config(), sys.argv[1:]))
