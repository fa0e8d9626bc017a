"""Supervised fine-tuning on chat data: LoRA on every projection of an imported model.

    jaxdl import gguf --from SmolLM2-135M-Instruct.Q4_1.gguf --out runs/smollm2
    python experiments/make_pydoc_qa.py runs/pydoc_qa
    jaxdl train --config sft --config.init_from.checkpoint=runs/smollm2 \
        --config.data.source=jsonl:runs/pydoc_qa --workdir runs/sft
    jaxdl chat --workdir runs/sft --prompt "What does the Python documentation say about ..."

The model and tokenizer are the base's (model.name and data.tokenizer "base": see
`jaxdl.interop.base`); the loss is on the assistant's tokens only (data.train_on), examples
are packed into rows of data.seq_len, and the loss is the mean over each batch's loss
tokens. Rank-16 adapters on q/k/v/o and the MLP's gate/up/down; AdamW with a warmup-cosine
schedule. Settings sized for a 135M model on a laptop CPU; raise num_steps for real runs.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = "sft"
    c.model = {"name": "base"}
    c.data = {
        "source": "jsonl:runs/pydoc_qa",
        "tokenizer": "base",
        "seq_len": 256,
        "packing": True,
        "train_on": "assistant",
        "batch_size": 8,
        "eval_batch_size": 8,
    }
    c.init_from = {"checkpoint": ""}
    c.lora = {
        "rank": 16,
        "alpha": 32.0,
        "targets": r"params/.*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel",
    }
    c.optimizer = {
        "name": "adamw",
        "learning_rate": 1e-3,
        "schedule": "warmup_cosine",
        "warmup_steps": 6,
        "weight_decay": 0.0,
        "grad_clip_norm": 1.0,
    }
    c.num_steps = 60
    c.log_every = 10
    c.eval_every = 30
    c.best_metric = "val_loss"
    return c
