"""A tiny Llama-family checkpoint as save_pretrained writes it (config.json, safetensors,
tokenizer files with a ChatML template), for tests that import one."""

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer

from jaxdl.interop import llama

BPE = Path(__file__).parent / "fixtures" / "hub" / "bpe_stdlib.json"
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
VOCAB = 514  # the fixture's 512 BPE tokens + <|im_start|>, <|im_end|>
HF_CONFIG = {
    "model_type": "qwen3",
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 12,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 20000.0},
    "tie_word_embeddings": False,
    "attention_bias": False,
}
IDS = np.random.default_rng(0).integers(0, VOCAB, size=(2, 9))


def hf_folder(tmp_path: Path, config=HF_CONFIG, tokenizer=True, **write) -> Path:
    """A save_pretrained-shaped folder: config.json, random weights, tokenizer files."""
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    spec = llama.llama_spec(llama.model_config(config))
    rng = np.random.default_rng(1)
    state = {}
    for path, key, _ in llama.table_for(spec):
        for i in range(spec.num_layers) if "{i}" in path else [None]:
            shape = llama.target_shapes(llama.model_config(config))
            leaf = shape["params"]
            for part in path.format(i=i).split("/"):
                leaf = leaf[part]
            dims = leaf.shape[::-1] if len(leaf.shape) == 2 and "embed" not in path else leaf.shape
            state[key.format(i=i)] = (0.2 * rng.standard_normal(dims)).astype(np.float32)
    write_weights(folder, state, **write)
    if tokenizer:
        tok = Tokenizer.from_file(str(BPE))
        tok.add_special_tokens(
            [AddedToken(t, special=True) for t in ("<|im_start|>", "<|im_end|>")]
        )
        tok.save(str(folder / "tokenizer.json"))
        tok_config = {"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": None}
        (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 513}))
    return folder


def write_weights(folder: Path, state, shards: int = 1, dtype=np.float32) -> None:
    state = {k: v.astype(dtype) for k, v in state.items()}
    if shards == 1:
        save_file(state, str(folder / "model.safetensors"))
        return
    keys = sorted(state)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[s::shards]}
        save_file(part, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
