"""Write a small random GPT-2 as `save_pretrained` would, for when no real one is at hand.

    python experiments/make_tiny_gpt2.py runs/gpt2_tiny_hf
    jaxdl import hf:gpt2 --from runs/gpt2_tiny_hf --out runs/gpt2_imported

DIR gets config.json (GPT2Config: 4 layers, width 256, 8 heads, 256 positions),
model.safetensors (GPT-2's init: weights N(0, 0.02), unit LayerNorms) and tokenizer.json,
a byte-level BPE of 4,096 tokens trained on the standard library's sources. No torch: the
weights come from jaxdl's own Transformer, written by the export-hf code.
"""

import json
import sys
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import save_file

from jaxdl.data.text import read_corpus
from jaxdl.interop import gpt2
from jaxdl.lm.tokenizer import train_bpe
from jaxdl.models import create_model

VOCAB = 4096
MODEL = {
    "name": "transformer",
    "vocab_size": VOCAB,
    "num_layers": 4,
    "num_heads": 8,
    "embed_dim": 256,
    "mlp_ratio": 4,
    "max_len": 256,
    "layernorm_eps": 1e-5,
}


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=False)
    text = read_corpus("stdlib", 2_000_000).decode("utf-8", errors="replace")
    (out / "tokenizer.json").write_text(train_bpe(text.split("\n\n"), VOCAB))
    model = create_model(MODEL)
    params = model.init(jax.random.PRNGKey(0), np.zeros((1, 8), np.int32))["params"]
    save_file(gpt2.to_state_dict(params, MODEL), str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(gpt2.hf_config(MODEL), indent=2) + "\n")
    print(f"wrote {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
