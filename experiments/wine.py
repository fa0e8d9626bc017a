"""Wine cultivars (3 classes, 178 rows, 13 numeric features): multiclass on a table.

    jaxdl train --config experiments/wine.py --workdir runs/wine
    python experiments/wine.py --baselines      # scikit-learn on the same split

summary.json gains macro F1, per-class precision/recall and the confusion matrix (also
drawn as confusion.png).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 42
    c.task = "classification"
    c.model = {"name": "tabular_mlp", "num_classes": 3, "hidden": (64, 32), "dropout_rate": 0.1}
    c.data = {"source": "sklearn:wine", "batch_size": 16}
    c.optimizer = {"name": "adamw", "learning_rate": 1e-3, "weight_decay": 1e-4}
    c.num_epochs = 60
    c.log_every = 20
    c.best_metric = "val_loss"
    return c


if __name__ == "__main__":
    import sys

    from jaxdl.training.baselines import main

    sys.exit(main(get_config(), sys.argv[1:]))
