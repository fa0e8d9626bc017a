"""GGUF tokenizers (``tokenizer.ggml.*``) <-> tokenizer.json, both ways.

Reading builds the ``tokenizer.json`` (with tokenizer_config.json and
generation_config.json beside it) that transformers' GGUF loader builds from the same
metadata: a byte-level BPE (``tokenizer.ggml.model`` 'gpt2': Llama 3, Qwen, SmolLM, Mistral
Nemo), split by the pre-tokenizer family ``tokenizer.ggml.pre`` names, or a SentencePiece
BPE ('llama': Llama 2, Mistral, TinyLlama). Writing turns a workdir's tokenizer.json back
into those lists (`gguf_vocab`, `add_tokenizer`), as llama.cpp's converter writes them.
Weights, config and the file itself are `jaxdl.interop.gguf`'s.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any, Protocol

from jaxdl.errors import UserError
from jaxdl.interop import lm_files


class Metadata(Protocol):
    """What reading a tokenizer needs of an open `jaxdl.interop.gguf.GgufFile`."""

    path: Any

    def get(self, key: str, default: Any = None, arch: bool = True) -> Any: ...


def gguf_package():
    """The ``gguf`` package (gguf-py, llama.cpp's own reader and writer), imported on use."""
    try:
        import gguf
    except ImportError as err:  # a declared dependency; only a broken install lacks it
        raise UserError("gguf: the `gguf` package is not installed. Fix: pip install gguf") from err
    return gguf


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE spells tokens in it)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


# llama.cpp's pre-tokenizer regexes (src/llama-vocab.cpp), by tokenizer.ggml.pre
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEKKEN_SPLIT = (  # Mistral's tekken (Mistral Nemo, Small 3), as transformers' GGUF loader splits
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_FAMILIES = {
    "gpt2": ("gpt2", "default"),
    "digits+gpt2": ("smollm", "starcoder", "refact", "codeshell", "command-r"),
    "llama3": ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "falcon3", "dbrx"),
    "qwen2": ("qwen2", "deepseek-r1-qwen"),
    "tekken": ("tekken",),
}
SPLITS = {"llama3": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT, "tekken": TEKKEN_SPLIT}


def pre_tokenizer(family: str):
    """The `tokenizers` pre-tokenizer of a PRE_FAMILIES family."""
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if family == "gpt2":
        return byte_level
    if family == "digits+gpt2":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    split = SPLITS[family]
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def tokenizer_files(f: Metadata) -> lm_files.LmFiles:
    """tokenizer.json + tokenizer_config.json + generation_config.json from the metadata:
    a byte-level BPE (``tokenizer.ggml.model`` 'gpt2': Llama 3, Qwen, SmolLM) or a
    SentencePiece BPE ('llama': Llama 2, Mistral, TinyLlama), each built as transformers'
    GGUF loader builds it."""
    keys = gguf_package().Keys.Tokenizer
    tokens = f.get(keys.LIST, arch=False)
    if not tokens:
        return lm_files.LmFiles(None, {}, {})
    kind, pre = f.get(keys.MODEL, arch=False), f.get(keys.PRE, "default", arch=False)
    types = _per_token(f, keys.TOKEN_TYPE, tokens) or [1] * len(tokens)  # absent: all normal
    ids = {
        "bos_token": f.get(keys.BOS_ID, arch=False),
        "eos_token": f.get(keys.EOS_ID, arch=False),
        "unk_token": f.get(keys.UNK_ID, arch=False),
        "pad_token": f.get(keys.PAD_ID, arch=False),
    }
    specials = {k: None if i is None else tokens[i] for k, i in ids.items()}
    merges = [tuple(m.split(" ", 1)) for m in f.get(keys.MERGES, [], arch=False)]
    if kind == "gpt2":
        tok = _byte_level_tokenizer(f, tokens, types, merges, pre)
        add_bos = bool(f.get(keys.ADD_BOS, False, arch=False))
    elif kind == "llama":
        # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise
        add_bos = bool(f.get(keys.ADD_BOS, True, arch=False))
        scores = _per_token(f, keys.SCORES, tokens)
        if not merges and not scores:
            raise UserError(
                f"--from: {f.path}: a SentencePiece vocabulary with neither "
                f"{keys.MERGES} nor {keys.SCORES}, so its merge order is unknown. Fix: import "
                "the model's Hugging Face folder, or convert it again with llama.cpp."
            )
        tok = _sentencepiece_tokenizer(tokens, scores, types, merges, specials, add_bos)
    else:
        raise UserError(
            f"--from: {f.path}: tokenizer model {kind!r}; jaxdl converts GGUF byte-level BPE "
            "('gpt2': Llama 3, Qwen, SmolLM) and SentencePiece BPE ('llama': Llama 2, Mistral, "
            "TinyLlama) tokenizers. Fix: import the model's Hugging Face folder, whose "
            "tokenizer.json jaxdl reads as it is."
        )
    tokenizer_config = dict(specials)
    tokenizer_config["chat_template"] = f.get(keys.CHAT_TEMPLATE, arch=False)
    tokenizer_config["add_bos_token"] = add_bos
    tokenizer_config["add_eos_token"] = bool(f.get(keys.ADD_EOS, False, arch=False))
    tokenizer_config["gguf_pre"] = pre  # export-gguf writes it back
    eos = [i for i in (ids["eos_token"], f.get(keys.EOT_ID, arch=False)) if i is not None]
    generation = {"bos_token_id": ids["bos_token"], "eos_token_id": list(dict.fromkeys(eos))}
    if ids["pad_token"] is not None:
        generation["pad_token_id"] = ids["pad_token"]
    generation = {k: v for k, v in generation.items() if v not in (None, [])}
    return lm_files.LmFiles(tok.to_str().encode("utf-8"), tokenizer_config, generation)


def _per_token(f: Metadata, key: str, tokens: list) -> list:
    """A per-token metadata list (token types, scores): [] when absent, else one a token."""
    values = f.get(key, [], arch=False)
    if values and len(values) != len(tokens):
        raise UserError(
            f"--from: {f.path}: {key} has {len(values)} entries for {len(tokens)} tokens. "
            "Fix: the file's tokenizer is inconsistent; convert it again with llama.cpp."
        )
    return values


def _byte_level_tokenizer(f: Metadata, tokens, types, merges, pre: str):
    """GPT-2 style byte-level BPE, split by the pre-tokenizer family llama.cpp names."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    family = next((name for name, pres in PRE_FAMILIES.items() if pre in pres), None)
    if family is None:
        known = sorted(p for pres in PRE_FAMILIES.values() for p in pres)
        raise UserError(
            f"--from: {f.path}: pre-tokenizer {pre!r} is not one jaxdl knows ({', '.join(known)}),"
            " and guessing it would split text differently from the model's training. Fix: "
            "import the model's Hugging Face folder (its tokenizer.json says how)."
        )
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8")): i
        for i, tok in enumerate(tokens)
    }
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizer(family)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # control tokens spelled outside the byte alphabet are llama.cpp mislabels (transformers
    # skips them too): adding them would grow the vocabulary past the model's
    control = [t for t, k in zip(tokens, types, strict=True) if k == 3 and set(t) <= alphabet]
    user = [t for t, k in zip(tokens, types, strict=True) if k == 4 and t in vocab]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    return tok


def _sentencepiece_tokenizer(tokens, scores, types, merges, specials, add_bos: bool):
    """A SentencePiece BPE vocabulary (pieces spelled with U+2581 for spaces, <0xXX> byte
    tokens) as transformers' LlamaTokenizer builds it from a GGUF: byte-fallback BPE, a
    Metaspace pre-tokenizer that prepends U+2581 to the first word (transformers does so
    whatever ``tokenizer.ggml.add_space_prefix`` says), merges from the file or else
    derived from the pieces' scores (`merges_from_scores`)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(tokens)}
    if not merges:
        merges = merges_from_scores(vocab, dict(zip(tokens, scores, strict=True)))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first", split=False
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1),
        ]
    )
    bos = specials["bos_token"]
    if add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, vocab[bos])]
        )
    named = [t for t in (specials[k] for k in ("unk_token", "bos_token", "eos_token")) if t]
    control = [t for t, k in zip(tokens, types, strict=True) if k == 3]
    user = [t for t, k in zip(tokens, types, strict=True) if k == 4]
    added = list(dict.fromkeys([*named, *control]))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    return tok


def merges_from_scores(vocab: Mapping[str, int], scores: Mapping[str, float]) -> list:
    """BPE merges implied by a SentencePiece vocabulary, as transformers'
    ``generate_merges`` derives them: every split of a piece into two pieces of the
    vocabulary, ordered by the merged piece's score (best first), then by the parts'
    lengths; ties keep the vocabulary's order (both sorts are stable)."""
    merges = []
    for piece, score in scores.items():
        local = [
            (piece[:i], piece[i:], score)
            for i in range(1, len(piece))
            if piece[:i] in vocab and piece[i:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


@dataclasses.dataclass(frozen=True)
class GgufVocab:
    """A tokenizer.json as GGUF's ``tokenizer.ggml.*`` lists: `model` 'gpt2' (byte-level BPE,
    split by `pre`) or 'llama' (SentencePiece BPE, with `scores`)."""

    model: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    add_bos: bool
    add_eos: bool
    pre: str | None = None  # a PRE_FAMILIES family ('gpt2' vocabularies)
    scores: list[float] | None = None  # ('llama' vocabularies)


def gguf_vocab(
    tokenizer_json: bytes, tokenizer_config: Mapping[str, Any], vocab_size: int | None = None
) -> GgufVocab:
    """The GGUF lists of a workdir's tokenizer.json: a byte-level BPE (Llama 3, Qwen, SmolLM)
    or a SentencePiece-style byte-fallback BPE (Llama 2, Mistral, TinyLlama); refuses other
    kinds in one line. `vocab_size`: the model's embedding rows, which GGUF readers expect
    one token for each of: ids the tokenizer lacks (Qwen2.5 pads its embedding to a multiple
    of 128) become unused [PADn] tokens, as llama.cpp's converter writes them."""
    from tokenizers import Tokenizer

    spec = json.loads(tokenizer_json)
    model = spec.get("model", {})
    decoder = (spec.get("decoder") or {}).get("type")
    sentencepiece = _is_sentencepiece(spec)
    if model.get("type") != "BPE" or not (decoder == "ByteLevel" or sentencepiece):
        raise UserError(
            f"--workdir: its tokenizer.json is a {model.get('type')!r} model with a "
            f"{decoder!r} decoder, neither a byte-level BPE nor a SentencePiece-style "
            "byte-fallback BPE with U+2581 spaces, the two GGUF vocabularies export-gguf "
            "writes. Fix: export with `jaxdl export-hf` and convert with llama.cpp's "
            "convert_hf_to_gguf.py."
        )
    tok = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
    size = tok.get_vocab_size(with_added_tokens=True)
    if vocab_size is not None and size > vocab_size:
        raise UserError(
            f"--workdir: its tokenizer has {size} tokens, more than the model's vocab_size "
            f"{vocab_size}, so ids past {vocab_size - 1} have no embedding. Fix: export the "
            "tokenizer the model was trained with."
        )
    by_id = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    size = size if vocab_size is None else vocab_size
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
    added = {a["content"]: a.get("special", False) for a in spec.get("added_tokens", [])}
    types = [(3 if added[t] else 4) if t in added else 1 for t in tokens]
    types = [5 if i not in by_id else k for i, k in enumerate(types)]  # UNUSED
    pairs = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges", [])]
    # llama.cpp adds BOS / EOS to a raw prompt by these flags: tokenizer_config.json's, or
    # else whether the post-processor puts those tokens around a text (Llama 3's BOS)
    first, last = _template_ends(spec)
    flags = {}
    for end, token in (("bos", first), ("eos", last)):
        around = token is not None and token == tokenizer_config.get(f"{end}_token")
        flags[f"add_{end}"] = bool(tokenizer_config.get(f"add_{end}_token", around))
    if sentencepiece:
        if spaced := next((m for m in pairs if " " in m[0] or " " in m[1]), None):
            raise UserError(
                f"--workdir: its tokenizer merges {spaced} holds a literal space, which "
                "GGUF's 'left right' merge strings cannot spell. Fix: export with `jaxdl "
                "export-hf` and convert with llama.cpp's convert_hf_to_gguf.py."
            )
        ids = {t: i for i, t in enumerate(tokens)}
        unk = tokenizer_config.get("unk_token") or model.get("unk_token")
        for i, t in enumerate(tokens):
            if t == unk:
                types[i] = 2  # UNKNOWN
            elif BYTE_TOKEN.fullmatch(t):
                types[i] = 6  # BYTE
        # llama.cpp merges SentencePiece pieces by their score, best first: a piece scores
        # minus the rank of the first merge that makes it, so its order is the merges'
        scores = [0.0] * size
        made = set()
        for rank, (left, right) in enumerate(pairs):
            piece = left + right
            if piece in ids and piece not in made:
                made.add(piece)
                scores[ids[piece]] = -float(rank + 1)
        merges = [f"{left} {right}" for left, right in pairs]
        return GgufVocab("llama", tokens, types, merges, **flags, scores=scores)
    merges = [" ".join(m) for m in pairs]
    pre = _split_key(spec.get("pre_tokenizer"))
    family = next((name for name in PRE_FAMILIES if _pre_json(name) == pre), None)
    if family is None:
        names = ", ".join(pres[0] for pres in PRE_FAMILIES.values())
        raise UserError(
            "--workdir: its tokenizer's pre-tokenizer matches none of the llama.cpp ones "
            f"jaxdl writes ({names}). Fix: export with `jaxdl export-hf` and convert with "
            "llama.cpp's convert_hf_to_gguf.py, which identifies it by hash."
        )
    return GgufVocab("gpt2", tokens, types, merges, **flags, pre=family)


BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _is_sentencepiece(spec: Mapping[str, Any]) -> bool:
    """Whether a tokenizer.json is a SentencePiece BPE as GGUF's 'llama' vocabulary means
    it: byte fallback, spaces spelled U+2581 with one prepended to the text, by a Metaspace
    pre-tokenizer (transformers' current form) or a Prepend + Replace normalizer (the
    legacy one, TinyLlama's). GGUF readers prepend by their own rule (transformers: at the
    start of the text), so a 'legacy' prefix after each special token is not kept."""
    model, pre, norm = spec.get("model", {}), spec.get("pre_tokenizer"), spec.get("normalizer")
    decoders = [d.get("type") for d in (spec.get("decoder") or {}).get("decoders", [])]
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return False
    if "ByteFallback" not in decoders:
        return False
    if pre and pre.get("type") == "Metaspace":
        prepends = pre.get("prepend_scheme") in ("first", "always")
        return pre.get("replacement") == "\u2581" and prepends
    steps = (norm or {}).get("normalizers", [norm] if norm else [])
    return pre is None and steps == [
        {"type": "Prepend", "prepend": "\u2581"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
    ]


def _pre_json(family: str) -> str:
    """The pre-tokenizer of `family` as `_split_key` spells it."""
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer(family)
    return _split_key(json.loads(tok.to_str())["pre_tokenizer"])


def _split_key(pre: Any) -> str:
    """A tokenizer.json pre-tokenizer as JSON with sorted keys, without ByteLevel's
    trim_offsets: it changes the offsets, not the tokens (Llama 3's and SmolLM's are true,
    Qwen2's false, and their GGUF families say nothing of it)."""

    def tokens_only(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: tokens_only(v) for k, v in value.items() if k != "trim_offsets"}
        if isinstance(value, list):
            return [tokens_only(v) for v in value]
        return value

    return json.dumps(tokens_only(pre), sort_keys=True)


def add_tokenizer(w: Any, vocab: GgufVocab, lm: lm_files.LmFiles) -> None:
    """Write `vocab` and the special ids, flags and chat template of `lm` to GGUFWriter `w`."""
    w.add_tokenizer_model(vocab.model)
    if vocab.model == "gpt2":
        w.add_tokenizer_pre(lm.tokenizer_config.get("gguf_pre") or PRE_FAMILIES[vocab.pre][0])
    else:
        w.add_add_space_prefix(True)
        w.add_token_scores(vocab.scores)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    _add_special_ids(w, lm, vocab.tokens)
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(vocab.add_eos)
    if lm.tokenizer_config.get("chat_template"):
        w.add_chat_template(lm.tokenizer_config["chat_template"])


def _add_special_ids(w: Any, lm: lm_files.LmFiles, tokens: list[str]) -> None:
    ids = {t: i for i, t in enumerate(tokens)}
    config, generation = lm.tokenizer_config, lm.generation_config
    for key, add in (("bos_token", w.add_bos_token_id), ("unk_token", w.add_unk_token_id)):
        if config.get(key) in ids:
            add(ids[config[key]])
    eos = generation.get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if config.get("eos_token") in ids:
        eos.insert(0, ids[config["eos_token"]])
    if eos:
        w.add_eos_token_id(eos[0])
        if len(eos) > 1 and eos[1] != eos[0]:
            w.add_eot_token_id(eos[1])
    pad = generation.get("pad_token_id", ids.get(config.get("pad_token")))
    if pad is not None:
        w.add_pad_token_id(int(pad))


def _template_ends(spec: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """The special tokens a tokenizer.json's post-processor puts before and after a single
    text (Llama 3's adds <|begin_of_text|> so), which a tokenizer_config.json without
    add_bos_token / add_eos_token leaves in charge, as transformers and llama.cpp's
    converter read it."""
    post = spec.get("post_processor") or {}
    for step in post.get("processors", [post]):
        if step.get("type") == "TemplateProcessing" and len(step.get("single", [])) > 1:
            ends = [step["single"][i].get("SpecialToken", {}).get("id") for i in (0, -1)]
            return ends[0], ends[1]
    return None, None
