"""A tiny Vision Transformer (patch 2, class token) on scikit-learn's digits.

jaxdl train --config experiments/digits_vit.py --workdir runs/digits_vit
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 42
    c.model = {"name": "vit", "num_classes": 10, "size": "tiny", "patch_size": 2}
    c.data = {"source": "digits", "batch_size": 32}
    c.optimizer = {
        "name": "adamw",
        "learning_rate": 2e-3,
        "weight_decay": 0.01,
        "schedule": "warmup_cosine",
        "warmup_steps": 100,
    }
    c.num_epochs = 30
    c.log_every = 20
    return c
