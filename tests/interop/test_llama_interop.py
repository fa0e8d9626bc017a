"""Llama-family import/export without torch: Hugging Face folders written here (the parity
against transformers itself is tests/interop/live/test_llama_live.py), GGUF files written
with the `gguf` package, the tokenizer and chat template travelling with the weights, the
weights-only rule, and the chat command."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from _llm import HF_CONFIG, IDS, hf_folder, sentencepiece_workdir
from safetensors.numpy import save_file

import jaxdl
from jaxdl.checkpoint.read import load_params
from jaxdl.errors import UserError
from jaxdl.interop import gguf as gguf_io
from jaxdl.interop import gguf_tokenizer, import_checkpoint
from jaxdl.interop.hf_export import export_hf
from jaxdl.lm.generate import generate
from jaxdl.testing import subprocess_env


def logits(workdir, ids=IDS):
    model, variables = jaxdl.load_model(workdir)
    return np.asarray(jax.jit(model.apply)(variables, ids))


def test_import_export_round_trip_is_exact(tmp_path):
    folder = hf_folder(tmp_path)
    report = import_checkpoint("hf:auto", str(folder), tmp_path / "w")
    assert report["source"]["missing_pieces"] == []
    assert report["missing"] == [] and report["unexpected"] == []
    cfg = json.loads((tmp_path / "w" / "config.json").read_text())
    assert cfg["model"]["qk_norm"] and not cfg["model"]["qkv_bias"]
    assert cfg["model"]["head_dim"] == 12 and cfg["model"]["rope_base"] == 20000.0
    export_hf(tmp_path / "w", tmp_path / "out")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    exported = json.loads((out / "config.json").read_text())
    assert exported["model_type"] == "qwen3" and exported["architectures"] == ["Qwen3ForCausalLM"]
    # re-importing the export gives the same model, bit for bit
    import_checkpoint("hf:auto", str(out), tmp_path / "again")
    a, b = load_params(tmp_path / "w"), load_params(tmp_path / "again")
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_sharded_and_bfloat16_sources(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    hf_folder(tmp_path / "a", shards=3)
    hf_folder(tmp_path / "b", dtype=ml_dtypes.bfloat16)
    report = import_checkpoint("hf:auto", str(tmp_path / "a" / "hf"), tmp_path / "wa")
    assert [f["name"] for f in report["source"]["files"]][1] == "model.safetensors.index.json"
    report = import_checkpoint("hf:auto", str(tmp_path / "b" / "hf"), tmp_path / "wb")
    assert {cast[1] for cast in report["dtype_cast"]} == {"bfloat16"}
    # the bf16 copy is the fp32 one rounded: the same model within bf16's precision
    np.testing.assert_allclose(logits(tmp_path / "wa"), logits(tmp_path / "wb"), atol=0.05)


def test_weights_only_import_says_so_and_text_commands_refuse(tmp_path):
    folder = hf_folder(tmp_path, tokenizer=False)
    cmd = [sys.executable, "-m", "jaxdl.cli", "import", "hf:auto", "--from", str(folder)]
    done = subprocess.run(
        [*cmd, "--out", str(tmp_path / "w")], capture_output=True, text=True, env=subprocess_env()
    )
    assert done.returncode == 0, done.stderr
    assert "MISSING: tokenizer (weights-only" in done.stdout
    report = json.loads((tmp_path / "w" / "import_report.json").read_text())
    assert report["source"]["missing_pieces"] == ["tokenizer"]
    for command in (["generate", "--prompt", "hi"], ["chat", "--prompt", "hi"]):
        done = subprocess.run(
            [sys.executable, "-m", "jaxdl.cli", command[0], "--workdir", str(tmp_path / "w")]
            + command[1:],
            capture_output=True,
            text=True,
            env=subprocess_env(),
        )
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith("jaxdl: error: data.tokenizer: this model was imported")
        assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "falcon"}, r"model_type='falcon'; hf:auto imports \['gpt2', 'llama'"),
        ({"hidden_act": "gelu"}, r"hidden_act='gelu' is not supported"),
        ({"hidden_size": None}, r"expected the field 'hidden_size'"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 2}}, r"rope_type='yarn'"),
        ({"num_attention_heads": 3}, r"num_kv_heads: expected a divisor of num_heads=3"),
    ],
)
def test_bad_configs_are_one_line_errors(tmp_path, change, message):
    config = {**HF_CONFIG, **change}
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file({"x": np.zeros(1, np.float32)}, str(folder / "model.safetensors"))
    with pytest.raises(UserError, match=message):
        import_checkpoint("hf:auto", str(folder), tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_extra_or_missing_weights_are_named(tmp_path):
    folder = hf_folder(tmp_path, tokenizer=False)
    from safetensors.numpy import load_file

    state = load_file(str(folder / "model.safetensors"))
    state["model.layers.0.mlp.extra.weight"] = np.zeros(3, np.float32)
    del state["model.norm.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(UserError, match=r"model\.norm\.weight.*model\.layers\.0\.mlp\.extra"):
        import_checkpoint("hf:auto", str(folder), tmp_path / "w")


def test_a_gguf_that_goes_away_mid_import_is_named_in_one_line(tmp_path):
    """Tensors are read as the checkpoint writes them, after the file was opened and
    planned: a file removed (or replaced by a shorter one) by then is an input error that
    names the tensor and the file, not a traceback."""
    folder = hf_folder(
        tmp_path, config={**HF_CONFIG, "model_type": "llama", "head_dim": 8, "hidden_size": 32}
    )
    import_checkpoint("hf:auto", str(folder), tmp_path / "w")
    gguf_io.export_gguf(tmp_path / "w", tmp_path / "m.gguf")
    f = gguf_io.GgufFile(tmp_path / "m.gguf")
    name = "blk.1.ffn_up.weight"
    assert f.array(name).shape == f.stand_in(name).shape
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "m.gguf").write_bytes(data[: f.tensors[name].data_offset + 10])
    with pytest.raises(UserError, match=rf"^--from: .*m\.gguf ends inside tensor {name}"):
        f.array(name)
    (tmp_path / "m.gguf").unlink()
    with pytest.raises(UserError, match=rf"^--from: reading tensor {name} of .*m\.gguf failed"):
        f.array(name)


def test_a_gguf_type_jaxdl_does_not_dequantize_is_refused_by_name(tmp_path):
    import gguf

    qtype = gguf.GGMLQuantizationType.TQ2_0  # ternary: no Llama-family checkpoint uses it
    _, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((4, nbytes), np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = gguf_io.GgufFile(tmp_path / "t.gguf")
    with pytest.raises(UserError, match=r"^--from: .*ffn_up\.weight is stored as TQ2_0, which"):
        f.stand_in("blk.0.ffn_up.weight")


def test_llama_cpp_permutation_is_undone():
    """permute_rows is llama.cpp's LlamaModel.permute: per head, rows (i, i + d/2) -> (2i, 2i+1)."""
    w = np.arange(2 * 8 * 3).reshape(16, 3)  # 2 heads of head_dim 8
    p = gguf_io.permute_rows(w, 2)
    np.testing.assert_array_equal(p[:8:2], w[:4])  # head 0: first halves at even rows
    np.testing.assert_array_equal(p[1:8:2], w[4:8])  # second halves at odd rows
    np.testing.assert_array_equal(gguf_io.unpermute_rows(p, 2), w)


@pytest.mark.parametrize("kind, tol", [("f16", 2e-3), ("q8_0", 3e-2)])
def test_gguf_export_imports_back(tmp_path, kind, tol):
    folder = hf_folder(
        tmp_path, config={**HF_CONFIG, "model_type": "llama", "head_dim": 8, "hidden_size": 32}
    )
    import_checkpoint("hf:auto", str(folder), tmp_path / "w")
    gguf_io.export_gguf(tmp_path / "w", tmp_path / "m.gguf", kind)
    report = import_checkpoint("gguf", str(tmp_path / "m.gguf"), tmp_path / "back")
    types = report["source_types"]
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.0.attn_q.weight"] == kind.upper()
    assert types["blk.0.ffn_down.weight"] == "F16"  # rows of 48: no whole Q8_0 blocks
    ours, back = logits(tmp_path / "w"), logits(tmp_path / "back")
    assert np.abs(ours - back).max() / np.abs(ours).max() < tol
    assert (ours.argmax(-1) == back.argmax(-1)).mean() >= 0.9
    # the tokenizer travels: the GGUF's metadata rebuilds the same ids and chat template
    original, rebuilt = (
        jaxdl.load_tokenizer(tmp_path / "w"),
        jaxdl.load_tokenizer(tmp_path / "back"),
    )
    text = Path(gguf_io.__file__).read_text()[:4000] + " 123 héllo ✓ <|im_end|>"
    assert rebuilt.encode(text).tolist() == original.encode(text).tolist()
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert (
        rebuilt.apply_chat_template(messages).tolist()
        == original.apply_chat_template(messages).tolist()
    )
    assert rebuilt.eos_ids == original.eos_ids == (513,)


@pytest.mark.parametrize(
    "rope_theta, low, high, original",
    [
        (20000.0, 1.0, 8.0, 64),  # three factors between 1 and 8: the band is solved for
        (500000.0, 1.0, 4.0, 8192),  # Llama 3's values, one factor inside the band
    ],
)
def test_llama3_rope_travels_through_gguf_as_rope_freqs(tmp_path, rope_theta, low, high, original):
    """export-gguf writes llama3 rope scaling as llama.cpp's converter does, per-dimension
    factors in rope_freqs.weight (Llama 3.1 and later GGUFs); importing that file recovers
    the config fields, so the model, export-hf and export-gguf are the source's again."""
    rope = {
        "rope_type": "llama3",
        "rope_theta": rope_theta,
        "factor": 8.0,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original,
    }
    config = {**HF_CONFIG, "model_type": "llama", "head_dim": 32, "rope_parameters": rope}
    import_checkpoint("hf:auto", str(hf_folder(tmp_path, config=config)), tmp_path / "w")
    gguf_io.export_gguf(tmp_path / "w", tmp_path / "m.gguf")
    f = gguf_io.GgufFile(tmp_path / "m.gguf")
    source = json.loads((tmp_path / "w" / "config.json").read_text())["model"]
    np.testing.assert_allclose(f.array(gguf_io.ROPE_FREQS), gguf_io.rope_factors(source))
    assert f.array(gguf_io.ROPE_FREQS).max() == 8.0
    report = import_checkpoint("gguf", str(tmp_path / "m.gguf"), tmp_path / "back")
    assert report["unexpected"] == [] and report["source_types"][gguf_io.ROPE_FREQS] == "F32"
    back = json.loads((tmp_path / "back" / "config.json").read_text())["model"]
    rope_keys = [k for k in source if k.startswith("rope_")]
    assert {k: back[k] for k in rope_keys} == {k: source[k] for k in rope_keys}
    ours, theirs = logits(tmp_path / "w"), logits(tmp_path / "back")
    assert np.abs(ours - theirs).max() / np.abs(ours).max() < 2e-3  # f16 in the file


def test_rope_factors_no_llama3_setting_gives_are_refused():
    cfg = {"name": "llama", **{k: v for k, v in _tiny_llama().items()}}
    half = cfg["head_dim"] // 2
    factors = np.linspace(1.0, 3.0, half)[::-1]  # falling: no llama3 band does that
    for bad in (factors, np.full(half, 0.5)):  # falling; and every dimension sped up
        with pytest.raises(UserError, match=r"^W: per-dimension rope factors that no llama3 "):
            gguf_io.llama3_rope(bad, cfg, "W")
    with pytest.raises(UserError, match=rf"^W: expected {half} factors .*found {half + 1}"):
        gguf_io.llama3_rope(np.ones(half + 1), cfg, "W")
    assert gguf_io.llama3_rope(np.ones(half), cfg, "W") == {}


def _tiny_llama() -> dict:
    return {
        "vocab_size": 16,
        "num_layers": 1,
        "embed_dim": 32,
        "num_heads": 2,
        "head_dim": 32,
        "mlp_dim": 8,
        "max_len": 64,
        "rope_base": 10000.0,
    }


@pytest.mark.parametrize(
    "split, trim_offsets, pre",
    [
        (gguf_tokenizer.LLAMA3_SPLIT, True, "llama-bpe"),
        (gguf_tokenizer.QWEN2_SPLIT, False, "qwen2"),
    ],
)
def test_hub_byte_level_tokenizers_export_to_their_gguf_family(tmp_path, split, trim_offsets, pre):
    """A Hugging Face tokenizer.json as Llama 3 and Qwen2 ship theirs (a Split regex, then
    ByteLevel without its regex; trim_offsets true in one, false in the other, which moves
    offsets only) exports with its llama.cpp pre-tokenizer name, and the GGUF's tokenizer
    gives the same ids; a post-processor that puts BOS before a text sets add_bos_token."""
    folder = hf_folder(tmp_path)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": False},
            {
                "type": "ByteLevel",
                "add_prefix_space": False,
                "trim_offsets": trim_offsets,
                "use_regex": False,
            },
        ],
    }
    adds_bos = pre == "llama-bpe"  # Llama 3's post-processor puts its BOS before a text
    if adds_bos:
        spec["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [],
            "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [512], "tokens": []}},
        }
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["bos_token"] = "<|im_start|>"  # and no add_bos_token: the template decides
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    import_checkpoint("hf:auto", str(folder), tmp_path / "w")
    gguf_io.export_gguf(tmp_path / "w", tmp_path / "m.gguf")
    f = gguf_io.GgufFile(tmp_path / "m.gguf")
    assert f.get("tokenizer.ggml.pre", arch=False) == pre
    assert f.get("tokenizer.ggml.add_bos_token", arch=False) is adds_bos
    import_checkpoint("gguf", str(tmp_path / "m.gguf"), tmp_path / "back")
    original, back = jaxdl.load_tokenizer(tmp_path / "w"), jaxdl.load_tokenizer(tmp_path / "back")
    text = Path(gguf_io.__file__).read_text()[:4000] + " 1234567 héllo\r\n\n  ✓ <|im_end|>"
    assert back.encode(text).tolist() == original.encode(text).tolist()


def test_an_embedding_wider_than_the_tokenizer_exports_padded_token_lists(tmp_path):
    """Qwen2.5 pads its embedding past its tokenizer (151936 rows, 151665 tokens): GGUF
    readers expect a token per row, so the rest are unused [PADn] tokens, as llama.cpp's
    converter writes them, and the file imports back with the same ids and logits."""
    config = {**HF_CONFIG, "model_type": "llama", "head_dim": 8, "vocab_size": 520}
    import_checkpoint("hf:auto", str(hf_folder(tmp_path, config=config)), tmp_path / "w")
    gguf_io.export_gguf(tmp_path / "w", tmp_path / "m.gguf")
    lists = _gguf_lists(tmp_path / "m.gguf")
    assert len(lists["tokens"]) == 520 and lists["tokens"][514:] == [
        f"[PAD{i}]" for i in range(514, 520)
    ]
    assert lists["token_type"][512:] == [3, 3] + [5] * 6  # control, then unused
    import_checkpoint("gguf", str(tmp_path / "m.gguf"), tmp_path / "back")
    ours, back = logits(tmp_path / "w"), logits(tmp_path / "back")
    assert ours.shape[-1] == 520 and np.abs(ours - back).max() / np.abs(ours).max() < 2e-3
    text = Path(gguf_io.__file__).read_text()[:2000] + "<|im_end|>"
    original, rebuilt = (
        jaxdl.load_tokenizer(tmp_path / "w"),
        jaxdl.load_tokenizer(tmp_path / "back"),
    )
    assert rebuilt.encode(text).tolist() == original.encode(text).tolist()


def test_a_sentencepiece_gguf_imports_with_its_tokenizer(tmp_path):
    """tokenizer.ggml.model 'llama' becomes a byte-fallback BPE tokenizer.json (the parity
    with transformers' GGUF loader is in tests/interop/live): text round-trips, characters
    outside the vocabulary fall back to their UTF-8 byte tokens, control tokens stay whole,
    the chat template gets <s> and </s>, and the weights are the exported ones."""
    workdir = sentencepiece_workdir(tmp_path)
    tok = jaxdl.load_tokenizer(workdir)
    text = Path(gguf_io.__file__).read_text()[:3000] + "\n\n  héllo 日本 🙂\t\r\n" + "x" * 2000
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("🙂").tolist()[-4:] == [3 + b for b in "🙂".encode()]  # <0xF0>... at 3+
    assert tok.encode("[INST]").tolist() == [tok.token_id("[INST]")]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ids = tok.apply_chat_template(messages).tolist()
    assert (ids[0], ids[-1], tok.eos_ids) == (1, 2, (2,))
    ours, back = logits(tmp_path / "w"), logits(workdir)
    assert np.abs(ours - back).max() / np.abs(ours).max() < 2e-3  # f16 in the file


def _gguf_lists(path: Path) -> dict:
    f = gguf_io.GgufFile(path)
    keys = ("model", "tokens", "token_type", "scores", "merges", "add_space_prefix")
    return {key: f.get(f"tokenizer.ggml.{key}", arch=False) for key in keys}


def test_a_sentencepiece_workdir_exports_to_gguf_and_back(tmp_path):
    """export-gguf writes a SentencePiece BPE as GGUF's 'llama' vocabulary: the file's
    token types are the source file's (unknown, control, byte, user-defined), importing it
    gives back the same tokenizer files, and its scores alone (what llama.cpp merges by)
    imply merges that split text as the merges do. TinyLlama's legacy tokenizer.json (the
    U+2581 prefix from a normalizer, not a Metaspace pre-tokenizer) writes the same lists."""
    from _llm import sentencepiece_vocab
    from tokenizers import Tokenizer

    workdir = sentencepiece_workdir(tmp_path)
    gguf_io.export_gguf(workdir, tmp_path / "back.gguf")
    lists = _gguf_lists(tmp_path / "back.gguf")
    _, _, types = sentencepiece_vocab()
    assert (lists["model"], lists["add_space_prefix"]) == ("llama", True)
    assert lists["token_type"] == types
    import_checkpoint("gguf", str(tmp_path / "back.gguf"), tmp_path / "back")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "back" / name).read_text() == (workdir / name).read_text(), name
    spec = json.loads((workdir / "tokenizer.json").read_text())
    vocab = {t: i for i, t in enumerate(lists["tokens"])}
    scores = dict(zip(lists["tokens"], lists["scores"], strict=True))
    by_score = gguf_tokenizer.merges_from_scores(vocab, scores)
    assert len(by_score) == len(lists["merges"])
    text = Path(gguf_io.__file__).read_text()[:6000] + " héllo 日本 🙂  x"
    ids = Tokenizer.from_str(json.dumps(spec)).encode(text).ids
    spec["model"]["merges"] = [list(m) for m in by_score]
    assert Tokenizer.from_str(json.dumps(spec)).encode(text).ids == ids

    spec = json.loads((workdir / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = None
    spec["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        ],
    }
    (workdir / "tokenizer.json").write_text(json.dumps(spec))
    gguf_io.export_gguf(workdir, tmp_path / "legacy.gguf")
    assert _gguf_lists(tmp_path / "legacy.gguf") == lists


@pytest.mark.parametrize(
    "change, match",
    [
        ({"model": {"type": "Unigram", "vocab": [["<unk>", 0.0]], "unk_id": 0}}, "'Unigram' model"),
        ({"pre_tokenizer": None}, "neither a byte-level BPE nor a SentencePiece"),  # Gemma's
    ],
)
def test_export_gguf_refuses_a_tokenizer_gguf_cannot_spell(tmp_path, change, match):
    workdir = sentencepiece_workdir(tmp_path)
    spec = json.loads((workdir / "tokenizer.json").read_text())
    (workdir / "tokenizer.json").write_text(json.dumps({**spec, **change}))
    with pytest.raises(UserError, match=rf"^--workdir: .*{match}.*Fix: export with"):
        gguf_io.export_gguf(workdir, tmp_path / "back.gguf")
    assert not (tmp_path / "back.gguf").exists()


def _tokenizer_gguf(path: Path, kind: str, tokens, **lists):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(kind)
    w.add_token_list(tokens)
    if "scores" in lists:
        w.add_token_scores(lists["scores"])
    if "types" in lists:
        w.add_token_types(lists["types"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return gguf_io.GgufFile(path)


def test_gguf_tokenizer_lists_missing_or_of_the_wrong_length(tmp_path):
    """No token types: every token is a normal one. A SentencePiece vocabulary without
    merges or scores, or a list of another length than the tokens: one line naming it."""
    tokens = ["<unk>", "<s>", "</s>", "\u2581", "a", "b", "\u2581a", "\u2581ab"]
    scores = [0.0] * 6 + [-1.0, -2.0]
    f = _tokenizer_gguf(tmp_path / "a.gguf", "llama", tokens, scores=scores)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(gguf_tokenizer.tokenizer_files(f).tokenizer.decode())
    assert tok.encode("ab", add_special_tokens=False).tokens == ["\u2581ab"]
    f = _tokenizer_gguf(tmp_path / "b.gguf", "llama", tokens)
    with pytest.raises(UserError, match=r"neither tokenizer\.ggml\.merges nor .*scores"):
        gguf_tokenizer.tokenizer_files(f)
    f = _tokenizer_gguf(tmp_path / "c.gguf", "llama", tokens, scores=scores, types=[1] * 5)
    with pytest.raises(UserError, match=r"token_type has 5 entries for 8 tokens"):
        gguf_tokenizer.tokenizer_files(f)


def test_merges_from_scores_orders_by_score_then_length():
    vocab = {"a": 0, "b": 1, "c": 2, "ab": 3, "bc": 4, "abc": 5}
    scores = {"a": 0.0, "b": 0.0, "c": 0.0, "ab": -1.0, "bc": -2.0, "abc": -3.0}
    merges = gguf_tokenizer.merges_from_scores(vocab, scores)
    assert merges == [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]


def test_chat_prints_the_greedy_reply_alone(tmp_path):
    folder = hf_folder(tmp_path)
    import_checkpoint("hf:auto", str(folder), tmp_path / "w")
    cmd = [sys.executable, "-m", "jaxdl.cli", "chat", "--workdir", str(tmp_path / "w")]
    done = subprocess.run(
        [*cmd, "--prompt", "def f(x):", "--max-new-tokens", "6"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
    )
    assert done.returncode == 0, done.stderr
    tok = jaxdl.load_tokenizer(tmp_path / "w")
    prompt = tok.apply_chat_template([{"role": "user", "content": "def f(x):"}], True)
    cfg = json.loads((tmp_path / "w" / "config.json").read_text())["model"]
    tokens = generate(
        cfg,
        load_params(tmp_path / "w"),
        prompt[None],
        max_new_tokens=6,
        rng=jax.random.key(0),
        greedy=True,
        eos_ids=tok.eos_ids,
    )
    new = np.asarray(tokens)[0, len(prompt) :].tolist()
    new = new[: new.index(513)] if 513 in new else new
    assert done.stdout == tok.decode(new) + "\n"


def test_chat_refuses_a_model_without_a_template(tmp_path):
    folder = hf_folder(tmp_path)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    import_checkpoint("hf:auto", str(folder), tmp_path / "w")
    done = subprocess.run(
        [sys.executable, "-m", "jaxdl.cli", "chat", "--workdir", str(tmp_path / "w")]
        + ["--prompt", "hi"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
    )
    assert done.returncode == 2
    assert "has no chat template" in done.stderr and len(done.stderr.strip().splitlines()) == 1
