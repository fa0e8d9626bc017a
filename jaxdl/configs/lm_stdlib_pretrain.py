"""Pretrain the small byte-level GPT on the Python standard library's own sources.

    jaxdl train --config lm_stdlib_pretrain --workdir runs/lm_pretrain

Byte-level (vocabulary 256), so any text is in-vocabulary. The `small` size has 4 layers,
4 heads and width 128 (0.84M parameters); `--config.model.size=gpt2-124m` with
`--config.model.vocab_size=256` scales the same code up on a GPU.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = {"name": "transformer", "size": "small", "vocab_size": 256, "dropout_rate": 0.0}
    c.data = {
        "source": "text:stdlib",
        "seq_len": 128,
        "batch_size": 16,
        "eval_batch_size": 64,
        "max_bytes": 4_000_000,
    }
    c.optimizer = {
        "name": "adamw",
        "learning_rate": 3e-3,
        "weight_decay": 0.01,
        "schedule": "warmup_cosine",
        "warmup_steps": 50,
        "grad_clip_norm": 1.0,
        "end_lr_fraction": 0.1,
    }
    c.num_steps = 1500
    c.log_every = 50
    c.eval_every = 250
    c.best_metric = "val_bits_per_byte"
    return c
