"""The article's 3.1 MLP (512-256-128, ReLU) on scikit-learn's digits.

    jaxdl train --config digits_mlp --workdir runs/digits_mlp

Softmax cross-entropy rather than the article's sigmoid + MSE (see NOTES.md); the
article's choice is one override away: --config.loss.name=mse.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 42
    c.model = {"name": "mlp", "num_classes": 10, "hidden": (512, 256, 128), "dropout_rate": 0.1}
    c.data = {"source": "digits", "batch_size": 32}
    c.optimizer = {"name": "adam", "learning_rate": 1e-3}
    c.num_epochs = 20
    c.log_every = 20
    return c
