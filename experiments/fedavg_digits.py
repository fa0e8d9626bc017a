"""FedAvg on digits: 10 simulated clients, 20 rounds of 10 local Adam steps each.

    jaxdl train --config experiments/fedavg_digits.py --workdir runs/fedavg_iid
    jaxdl train --config experiments/fedavg_digits.py --workdir runs/fedavg_a01 \\
        --config.federated.alpha=0.1

alpha 0 splits the train set IID; alpha > 0 skews each client's labels by Dirichlet(alpha)
(0.1: most clients see two or three digits). The centralized baseline with the same
number of sequential steps (20 x 10) is digits_mlp with --config.num_steps=200.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 42
    c.model = {"name": "mlp", "num_classes": 10, "hidden": (512, 256, 128), "dropout_rate": 0.1}
    c.data = {"source": "digits", "batch_size": 32}
    c.optimizer = {"name": "adam", "learning_rate": 1e-3}
    c.num_steps = 200  # unused by FedAvg (rounds x local_steps), required by the config
    c.federated = {"clients": 10, "rounds": 20, "local_steps": 10, "alpha": 0.0}
    return c
