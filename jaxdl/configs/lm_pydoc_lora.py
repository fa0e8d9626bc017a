"""LoRA fine-tuning of the stdlib-pretrained GPT on English text (`pydoc_data.topics`).

    jaxdl train --config lm_stdlib_pretrain --workdir runs/lm_pretrain
    jaxdl train --config lm_pydoc_lora \
        --config.init_from.checkpoint=runs/lm_pretrain --workdir runs/lm_pydoc_lora
    jaxdl generate --workdir runs/lm_pydoc_lora --prompt "The with statement"

Rank-8 adapters on every attention and MLP projection; the base model stays frozen, and
the run's checkpoints hold only the adapters plus a reference to the base checkpoint.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = {"name": "transformer", "size": "small", "vocab_size": 256, "dropout_rate": 0.0}
    c.data = {"source": "text:pydoc", "seq_len": 128, "batch_size": 16, "eval_batch_size": 64}
    c.init_from = {"checkpoint": "runs/lm_pretrain"}
    c.lora = {
        "rank": 8,
        "alpha": 16.0,
        "targets": r"params/.*/(query|key|value|out|fc1|fc2)/kernel",
    }
    c.optimizer = {"name": "adam", "learning_rate": 3e-3, "grad_clip_norm": 1.0}
    c.num_steps = 200
    c.log_every = 25
    c.eval_every = 100
    c.best_metric = "val_bits_per_byte"
    return c
