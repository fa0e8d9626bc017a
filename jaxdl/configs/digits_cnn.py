"""The article's 5.2.2 SimpleCNN (conv 64 -> conv 128 -> fc 128 -> 10) on digits.

jaxdl train --config digits_cnn --workdir runs/digits_cnn
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 42
    c.model = {"name": "simple_cnn", "num_classes": 10}
    c.data = {"source": "digits", "batch_size": 32}
    c.optimizer = {"name": "adam", "learning_rate": 1e-3}
    c.num_epochs = 12
    c.log_every = 20
    return c
