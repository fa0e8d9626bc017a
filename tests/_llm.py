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


def sft_config(tmp_path: Path, *overrides: str):
    """`--config sft` over the import at ``tmp_path/base`` and the pydoc QA set at
    ``tmp_path/qa``, sized for a tiny model (rows of 64, batches of 4, rank-4 adapters);
    ``overrides`` ("--config.KEY=VALUE") go on top."""
    from jaxdl import config as config_lib

    common = [
        f"--config.init_from.checkpoint={tmp_path / 'base'}",
        f"--config.data.source=jsonl:{tmp_path / 'qa'}",
        "--config.data.seq_len=64",
        "--config.data.batch_size=4",
        "--config.lora.rank=4",
    ]
    return config_lib.load_config("sft", [*common, *overrides])


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


SPM_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}"
    "{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)  # Mistral's, shortened


def sentencepiece_vocab(size: int = VOCAB) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary as Llama 2, Mistral and TinyLlama GGUFs store it
    (tokens, scores, GGUF token types): <unk> <s> </s>, the 256 <0xXX> byte tokens, pieces
    a BPE learned on the standard library's json package with spaces spelled U+2581 (scores
    falling in merge order), then control [INST] [/INST] and user-defined <think>; `size`
    tokens in all."""
    import os

    from tokenizers import models, pre_tokenizers, trainers

    sources = sorted(Path(os.path.dirname(json.__file__)).glob("*.py"))
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=size, show_progress=False)
    tok.train([str(p) for p in sources], trainer)
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    types = [2, 3, 3, *[6] * 256]  # unknown, control, byte
    extra = [("[INST]", 3), ("[/INST]", 3), ("<think>", 4)]
    learned = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    pieces = [t for t, _ in learned][: size - len(tokens) - len(extra)]
    scores = [0.0] * len(tokens) + [-float(i) for i in range(len(pieces))] + [0.0] * len(extra)
    tokens += pieces + [t for t, _ in extra]
    types += [1] * len(pieces) + [k for _, k in extra]
    assert len(tokens) == size, len(tokens)
    return tokens, scores, types


def sentencepiece_gguf(path: Path, model_gguf: Path | None = None, size: int = VOCAB) -> Path:
    """A GGUF whose tokenizer is `sentencepiece_vocab` (tokenizer.ggml.model 'llama', no
    merges: readers derive them from the scores) with Mistral's chat template; with
    `model_gguf`, that file's model metadata and tensors are copied in (its tokenizer keys
    left out), else it holds no tensors (enough for tokenizer loaders)."""
    import gguf

    tokens, scores, types = sentencepiece_vocab(size)
    arch = "llama"
    reader = None if model_gguf is None else gguf.GGUFReader(str(model_gguf))
    w = gguf.GGUFWriter(str(path), arch)
    if reader is not None:
        for name, field in reader.fields.items():
            if name.startswith(("GGUF.", "tokenizer.")) or name == "general.architecture":
                continue
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(name, field.contents(), vtype, sub)
        for tensor in reader.tensors:
            w.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=tensor.tensor_type)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(SPM_TEMPLATE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def sentencepiece_workdir(tmp_path: Path) -> Path:
    """A tiny Llama exported to GGUF (`tmp_path/w` imported from `hf_folder`), its tokenizer
    swapped for `sentencepiece_gguf`'s, imported again: -> that workdir (`tmp_path/spm`)."""
    from jaxdl.interop import gguf as gguf_io
    from jaxdl.interop import import_checkpoint

    config = {**HF_CONFIG, "model_type": "llama", "head_dim": 8, "hidden_size": 32}
    import_checkpoint("hf:auto", str(hf_folder(tmp_path, config=config)), tmp_path / "w")
    gguf_io.export_gguf(tmp_path / "w", tmp_path / "m.gguf", "f16")
    sentencepiece_gguf(tmp_path / "spm.gguf", tmp_path / "m.gguf")
    import_checkpoint("gguf", str(tmp_path / "spm.gguf"), tmp_path / "spm")
    return tmp_path / "spm"
