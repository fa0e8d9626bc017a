"""LoRA fine-tuning of an imported GPT-2 on English text (`pydoc_data.topics`), BPE tokens.

    python experiments/make_tiny_gpt2.py runs/gpt2_tiny_hf        # or a real GPT-2 folder
    jaxdl import hf:gpt2 --from runs/gpt2_tiny_hf --out runs/gpt2_imported
    jaxdl train --config experiments/gpt2_pydoc_lora.py --workdir runs/gpt2_pydoc_lora
    jaxdl generate --workdir runs/gpt2_pydoc_lora --prompt "The with statement"
    jaxdl export-hf --workdir runs/gpt2_pydoc_lora --out runs/gpt2_pydoc_lora_hf

The model section and the tokenizer come from the imported workdir's config.json
(runs/gpt2_imported, or $JAXDL_GPT2_WORKDIR), so any GPT-2 size imports and fine-tunes
with the same file. Rank-8 adapters on every attention and MLP projection; the imported
weights stay frozen, and the run's checkpoints hold only the adapters plus a reference to
the imported step.
"""

import os
from pathlib import Path

import ml_collections

from jaxdl.interop.workdir import imported_config

IMPORTED = Path(os.environ.get("JAXDL_GPT2_WORKDIR", "runs/gpt2_imported"))


def get_config() -> ml_collections.ConfigDict:
    imported = imported_config(IMPORTED)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = {**imported["model"], "dropout_rate": 0.0}
    c.data = {
        "source": "text:pydoc",
        "tokenizer": imported["data"]["tokenizer"],
        "seq_len": min(128, imported["model"]["max_len"]),
        "batch_size": 16,
        "eval_batch_size": 32,
    }
    c.init_from = {"checkpoint": str(IMPORTED)}
    c.lora = {
        "rank": 8,
        "alpha": 16.0,
        "targets": r"params/.*/(query|key|value|out|fc1|fc2)/kernel",
    }
    c.optimizer = {"name": "adam", "learning_rate": 3e-3, "grad_clip_norm": 1.0}
    c.num_steps = 300
    c.log_every = 50
    c.eval_every = 100
    c.best_metric = "val_loss"
    return c
