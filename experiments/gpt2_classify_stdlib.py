"""Text classification from an imported GPT-2 (the article's 3.2): which standard-library
package does a 128-byte snippet of source come from? The GPT-2 body is restored, its LM
head replaced by a new classifier over the mean of its final hidden states, and the
snippets are read with the imported tokenizer.json (BPE ids, not bytes).

    python experiments/make_tiny_gpt2.py runs/gpt2_tiny_hf        # or a real GPT-2 folder
    jaxdl import hf:gpt2 --from runs/gpt2_tiny_hf --out runs/gpt2_imported
    python experiments/text_classify_stdlib.py --make-data runs/stdlib_snippets
    jaxdl train --config experiments/gpt2_classify_stdlib.py --workdir runs/gpt2_clf
    # frozen but the head:   add --config.partition='[["params/classifier/.*", {}],
    #                              [".*", {"trainable": False}]]'
    # LoRA:                  add --config.lora='{"rank": 8, "alpha": 16,
    #                              "targets": "params/.*/(query|value)/kernel"}'
    #                          --config.partition='[["lora/.*", {}],
    #                              ["params/classifier/.*", {}], [".*", {"trainable": False}]]'

The model section and the tokenizer come from the imported workdir's config.json
(runs/gpt2_imported, or $JAXDL_GPT2_WORKDIR), so any GPT-2 size works with this file.
Padding uses the tokenizer's vocab_size as its id (`jaxdl.data.textfolder.pad_id`).
"""

import os
from pathlib import Path

import ml_collections

from jaxdl.interop.workdir import imported_config

IMPORTED = Path(os.environ.get("JAXDL_GPT2_WORKDIR", "runs/gpt2_imported"))
NUM_PACKAGES = 5  # experiments/text_classify_stdlib.py's PACKAGES


def get_config() -> ml_collections.ConfigDict:
    imported = imported_config(IMPORTED)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = {
        **imported["model"],
        "dropout_rate": 0.0,
        "head": "classify",
        "pooling": "mean",
        "num_classes": NUM_PACKAGES,
    }
    c.data = {
        "source": "textfolder:runs/stdlib_snippets",
        "tokenizer": imported["data"]["tokenizer"],
        # a 128-byte snippet of code is ~40-60 GPT-2 tokens
        "seq_len": min(64, imported["model"]["max_len"]),
        "batch_size": 32,
    }
    c.init_from = {"checkpoint": str(IMPORTED), "reinit": ["params/classifier/.*"]}
    c.optimizer = {
        "name": "adamw",
        "learning_rate": 3e-4,
        "weight_decay": 0.01,
        "schedule": "warmup_cosine",
        "warmup_steps": 30,
        "grad_clip_norm": 1.0,
    }
    c.num_epochs = 4
    c.log_every = 20
    c.best_metric = "val_accuracy"
    return c
