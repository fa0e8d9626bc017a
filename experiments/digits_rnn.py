"""The article's 2.3 recurrent network: an LSTM reads each digit's 8 rows as a sequence.

    jaxdl train --config experiments/digits_rnn.py --workdir runs/digits_rnn

GRU instead: --config.model.cell=gru
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 42
    c.model = {"name": "rnn", "num_classes": 10, "cell": "lstm", "hidden": 128}
    c.data = {"source": "digits", "batch_size": 32}
    c.optimizer = {"name": "adam", "learning_rate": 3e-3}
    c.num_epochs = 25
    c.log_every = 20
    return c
