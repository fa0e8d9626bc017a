"""One LoRA fine-tuning step of GPT-2 124M or SmolLM2-135M: jaxdl against transformers + peft.

    pip install -e ".[interop]"
    nice -n 5 python benchmarks/lora_vs_peft.py                  # batch 4 x 256, rank 8
    nice -n 5 python benchmarks/lora_vs_peft.py --family llama   # SmolLM2-135M's shape
    python benchmarks/lora_vs_peft.py --trials 3 --batch 2 --seq-len 128   # a quick look
    python benchmarks/lora_vs_peft.py --smoke     # tiny GPT-2 fixture, one trial (CI)

A random GPT-2 124M is written with ``save_pretrained`` and imported with ``jaxdl import
hf:gpt2`` (timed, with its peak RSS, in a subprocess of its own). Then each variant runs in
its own worker process, so each one's peak RSS is its own:

    jaxdl LoRA            the imported workdir, init_from + lora (rank r on query, key, value,
                          out, fc1, fc2), the train step `jaxdl train` runs (factored
                          adapters, the default)
    jaxdl LoRA merged     the same with merged adapters (`factored_lora=False`)
    jaxdl full            full fine-tuning of the same model
    peft LoRA             GPT2LMHeadModel + peft LoRA (rank r on c_attn, c_proj, c_fc)
    jaxdl LoRA bf16       jaxdl LoRA with bf16 compute (``model.dtype = "bfloat16"``: bf16
                          operands, float32 accumulation, float32 params and Adam state)
    peft LoRA bf16        peft LoRA under ``torch.autocast("cpu", torch.bfloat16)``, the same
                          policy
    jaxdl QLoRA           jaxdl LoRA over the frozen projections stored NF4
                          (``lora.quantize = "nf4"``), dequantized inside the step
    jaxdl QLoRA bf16, jaxdl full bf16: those with bf16 compute
                          (the last five are not in the default set; ``--variants`` names them)

`--family llama` does the same for a random model of SmolLM2-135M-Instruct's shape
(LlamaConfig: 30 layers, width 576, 9 heads, 3 KV heads, vocab 49,152, tied), imported
with ``hf:auto``, LoRA on q/k/v/o and gate/up/down on both sides; `--family llama-1b` for
Llama 3.2 1B's shape (16 layers, width 2048, MLP 8192, 32 heads, 8 KV heads, vocab 128,256,
tied), where a step takes tens of seconds here and the peak RSS is the point:

    python benchmarks/lora_vs_peft.py --family llama-1b --batch 1 --trials 1 \
        --steps-per-trial 1 --variants "jaxdl LoRA bf16,jaxdl QLoRA bf16,peft LoRA bf16"

All use Adam (lr 1e-4, no weight decay), no dropout, the same token batch; the workers run
with OMP_WAIT_POLICY=PASSIVE (`--omp-wait-policy`), without which torch's spinning OpenMP
threads lose their cores on a shared CPU and peft looks 2x slower than it is. Trials
interleave the workers (one trial of each per round, the order rotating) and each trial
times K steps back to back; the table gives medians over trials. Writes
benchmarks/results/lora_vs_peft.json and .md.

`--smoke` imports the tiny GPT-2 of tests/fixtures/hub (safetensors: no torch needed), runs
one trial of one step of batch 1 x 8 tokens and writes nothing (unless --out): the jaxdl
variants always, peft LoRA where torch, transformers and peft are installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make `jaxdl` and `benchmarks` importable
    sys.path.insert(0, str(ROOT))

from benchmarks._report import write_record  # noqa: E402
from benchmarks._timing import environment, paired_ratio, peak_rss_of, step_stats  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TINY_GPT2 = ROOT / "tests" / "fixtures" / "hub" / "gpt2_tiny"  # --smoke's model
WORKERS = (
    "jaxdl LoRA",
    "jaxdl LoRA merged",
    "jaxdl full",
    "peft LoRA",
    "jaxdl LoRA bf16",
    "peft LoRA bf16",
    "jaxdl QLoRA",
    "jaxdl QLoRA bf16",
    "jaxdl full bf16",
)
DEFAULT_WORKERS = WORKERS[:4]
# per family: the import KIND, jaxdl's LoRA targets, peft's target modules and layout
FAMILIES = {
    "gpt2": {
        "kind": "hf:gpt2",
        "targets": r"params/.*/(query|key|value|out|fc1|fc2)/kernel",
        "peft_targets": ["c_attn", "c_proj", "c_fc"],
        "fan_in_fan_out": True,  # GPT-2's Conv1D stores [in, out]
        "vocab": 50257,
    },
    "llama": {
        "kind": "hf:auto",
        "targets": r"params/.*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel",
        "peft_targets": [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        "fan_in_fan_out": False,
    },
}
FAMILIES["llama"]["preset"] = "smollm2-135m"  # the random model: jaxdl's preset's shape
FAMILIES["llama-1b"] = {**FAMILIES["llama"], "preset": "llama3-1b"}
LEARNING_RATE = 1e-4


def _peak_rss_mb() -> float:
    """This process's peak RSS since its exec (VmHWM: ru_maxrss would include the RSS of the
    driver that started it, which holds a torch model, because Linux carries it over)."""
    status = Path("/proc/self/status").read_text()
    return (
        int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
        / 1024
    )


def _import_torch_stack():
    from tests.interop.live._torchvision import import_torchvision

    import_torchvision()  # transformers imports torchvision; see tests/interop/live/conftest.py
    import torch
    import transformers

    return torch, transformers


def _batch(args):
    """The token batch every variant trains on: [batch, seq_len + 1] ids."""
    import numpy as np

    return np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq_len + 1))


# ------------------------------------------------------------------ workers


def _jaxdl_worker(name: str, args):
    import jax
    import numpy as np

    from jaxdl import config as config_lib
    from jaxdl.core import steps
    from jaxdl.training.build import build

    cfg = config_lib.load_config(Path(args.workdir) / "config.json")
    cfg.init_from.checkpoint = str(args.workdir)
    cfg.model.dropout_rate = 0.0
    cfg.optimizer.name, cfg.optimizer.learning_rate = "adam", LEARNING_RATE
    if name.endswith(" bf16"):
        cfg.model.dtype = "bfloat16"
    if not name.startswith("jaxdl full"):
        targets = FAMILIES[args.family]["targets"]
        cfg.lora = {"rank": args.rank, "alpha": 2.0 * args.rank, "targets": targets}
        if name.startswith("jaxdl QLoRA"):
            cfg.lora["quantize"] = "nf4"
    spec = {k: ((args.seq_len,), np.int32) for k in ("inputs", "targets")}
    setup = build(cfg, kind="lm", example_spec=spec, num_classes=args.vocab, total_steps=1000)
    factored = not name.startswith("jaxdl LoRA merged")
    step = steps.make_train_step(
        setup.model, setup.head, setup.tx, lora_cfg=setup.lora_cfg, factored_lora=factored
    )
    ids = _batch(args).astype(np.int32)
    batch = {"inputs": jax.device_put(ids[:, :-1]), "targets": jax.device_put(ids[:, 1:])}
    state = setup.state
    trainable = sum(x.size for x in jax.tree.leaves(state.params))
    total = trainable + sum(x.size for x in jax.tree.leaves(state.frozen))
    del setup

    def run(k: int):
        nonlocal state
        for _ in range(k):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics["loss"])
        return float(metrics["loss"])

    return run, {"trainable_params": int(trainable), "params": int(total)}


def _peft_worker(args, bf16: bool = False):
    torch, transformers = _import_torch_stack()
    import peft

    family = FAMILIES[args.family]
    if args.family == "gpt2":
        model = transformers.GPT2LMHeadModel.from_pretrained(
            args.model_dir, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
        )
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir)
    config = peft.LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        lora_dropout=0.0,
        target_modules=family["peft_targets"],
        fan_in_fan_out=family["fan_in_fan_out"],
    )
    model = peft.get_peft_model(model, config).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
    ids = torch.from_numpy(_batch(args)[:, :-1].astype("int64"))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    def run(k: int):
        for _ in range(k):
            with autocast:
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for p in model.parameters())
    info = {"trainable_params": int(trainable), "params": int(total)}
    info["torch_threads"] = torch.get_num_threads()
    return run, info


def worker(name: str, args) -> None:
    """Prepare (compile / first step), then answer "run K" lines with seconds until "quit"."""
    start = time.perf_counter()
    if name.startswith("peft"):
        run, info = _peft_worker(args, bf16=name.endswith(" bf16"))
    else:
        run, info = _jaxdl_worker(name, args)
    info["first_loss"] = run(1)  # compiles (jax) or warms the allocator (torch)
    info["prepare_s"] = time.perf_counter() - start
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        if line.startswith("run "):
            t0 = time.perf_counter()
            loss = run(int(line.split()[1]))
            print(json.dumps({"s": time.perf_counter() - t0, "loss": loss}), flush=True)
        else:
            print(json.dumps({"peak_rss_mb": _peak_rss_mb()}), flush=True)
            return


# ------------------------------------------------------------------ driver


def _vocab(family: dict) -> int:
    if "preset" not in family:
        return family["vocab"]
    from jaxdl.models.llama import llama_spec

    return llama_spec({"name": "llama", "size": family["preset"]}).vocab_size


def _make_model(model_dir: Path, family: str) -> int:
    torch, transformers = _import_torch_stack()
    torch.manual_seed(0)
    if family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    else:
        from jaxdl.interop import llama

        preset = {"name": "llama", "size": FAMILIES[family]["preset"]}
        config = transformers.LlamaConfig(**llama.hf_config(preset, {}))
        model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(model_dir)
    return sum(p.numel() for p in model.parameters())


def _time_import(model_dir: Path, workdir: Path, kind: str) -> dict:
    """Wall time and peak RSS of `jaxdl import KIND` in a fresh process."""
    cmd = [sys.executable, "-m", "jaxdl.cli", "import", kind, "--from", str(model_dir)]
    seconds, peak = peak_rss_of([*cmd, "--out", str(workdir)], cwd=ROOT)
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    return {
        "wall_s": seconds,  # the whole process: interpreter start included
        "peak_rss_mb": peak / 2**20,
        "model_bytes_mb": weights / 2**20,
        "peak_rss_over_model_bytes": peak / weights,
    }


def _start(name: str, args, model_dir: Path, workdir: Path) -> subprocess.Popen:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name]
    cmd += ["--model-dir", str(model_dir), "--workdir", str(workdir)]
    cmd += ["--batch", str(args.batch), "--seq-len", str(args.seq_len), "--rank", str(args.rank)]
    cmd += ["--vocab", str(args.vocab), "--family", args.family]
    # torch's OpenMP threads spin-wait by default, which on a shared CPU stalls every
    # parallel region (see README: "Closing the CPU gaps", item 1); PASSIVE is the fair setting
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", args.omp_wait_policy)}
    return subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env
    )


def _ask(proc: subprocess.Popen, line: str) -> dict:
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def markdown(record: dict) -> str:
    a = record["args"]
    base_name = next(iter(record["variants"]))
    rows = [
        f"{a.get('model', 'GPT-2 124M')}, batch {a['batch']} x {a['seq_len']} tokens, "
        f"LoRA rank {a['rank']}, "
        f"float32 unless named bf16, CPU ({record['env']['cpu']}, "
        f"{record['env']['cpu_count']} cores, bf16 units: "
        f"{', '.join(record['env'].get('cpu_bf16_features') or ['none'])}), "
        f"{a['trials']} interleaved trials of {a['steps_per_trial']} steps, load average "
        f"{record['env']['load_avg'][0]:.1f}; ratios are medians of per-trial ratios\n",
        f"| variant | trainable params | step s (median) | min | CV % | x {base_name} "
        "(paired) | peak RSS MB | prepare s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = record["variants"][base_name]["trials_s"]
    for name, v in record["variants"].items():
        t = v["step_time_s"]
        rows.append(
            f"| {name} | {v['trainable_params']:,} | {t['median']:.3f} | {t['min']:.3f} "
            f"| {t['cv'] * 100:.1f} | {paired_ratio(v['trials_s'], base):.2f} "
            f"| {v['peak_rss_mb']:,.0f} "
            f"| {v['prepare_s']:.1f} |"
        )
    imp = record["import"]
    rows.append(
        f"\n`jaxdl import {FAMILIES[a.get('family', 'gpt2')]['kind']}` ({a.get('model')}): "
        f"{imp['wall_s']:.1f} s, peak RSS "
        f"{imp['peak_rss_mb']:,.0f} MB = {imp['peak_rss_over_model_bytes']:.2f}x the "
        f"{imp['model_bytes_mb']:,.0f} MB of weights"
    )
    return "\n".join(rows) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--steps-per-trial", type=int, default=2)
    parser.add_argument("--variants", default=",".join(DEFAULT_WORKERS), help=", ".join(WORKERS))
    parser.add_argument(
        "--omp-wait-policy",
        default="PASSIVE",
        help="OMP_WAIT_POLICY of the workers (unless already set)",
    )
    parser.add_argument("--out", help="default: benchmarks/results/lora_vs_peft.json")
    parser.add_argument("--render", metavar="FILE.json", help="rewrite FILE.md from FILE.json")
    parser.add_argument("--smoke", action="store_true", help="tiny GPT-2, one step (see above)")
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="gpt2")
    parser.add_argument("--vocab", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--import-only", action="store_true", help="time the import 3 times, no LoRA steps"
    )
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args)
    if args.render:
        record = json.loads(Path(args.render).read_text())
        Path(args.render).with_suffix(".md").write_text(markdown(record))
        return print(markdown(record))

    args.model = {
        "gpt2": "GPT-2 124M",
        "llama": "SmolLM2-135M-shaped Llama",
        "llama-1b": "Llama-3.2-1B-shaped Llama",
    }[args.family]
    args.vocab = args.vocab or _vocab(FAMILIES[args.family])
    if args.smoke and args.family != "gpt2":
        raise SystemExit("--smoke runs the tiny GPT-2 fixture: leave --family unset")
    if args.smoke:
        args.batch, args.seq_len, args.rank, args.trials, args.steps_per_trial = 1, 8, 2, 1, 1
        args.model = "GPT-2 tiny (tests/fixtures/hub/gpt2_tiny)"
        args.vocab = json.loads((TINY_GPT2 / "config.json").read_text())["vocab_size"]
        have_peft = all(importlib.util.find_spec(m) for m in ("torch", "transformers", "peft"))
        if not have_peft:
            kept = [w for w in args.variants.split(",") if not w.startswith("peft")]
            args.variants = ",".join(kept)
    elif args.out is None:
        suffix = "" if args.family == "gpt2" else f"_{args.family}"
        args.out = str(RESULTS / f"lora_vs_peft{suffix}.json")

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, workdir = Path(tmp) / args.family, Path(tmp) / "imported"
        if args.smoke:
            model_dir = TINY_GPT2
        else:
            params = _make_model(model_dir, args.family)
            print(f"wrote a random {args.model} ({params:,} params) to {model_dir}", flush=True)
        kind = FAMILIES[args.family]["kind"]
        if args.import_only:  # each into a fresh workdir, the machine's load beside them
            load = os.getloadavg()
            runs = [_time_import(model_dir, Path(tmp) / f"w{i}", kind) for i in range(3)]
            record = {"env": environment(), "load_before": load, "imports": runs}
            if args.out:
                Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
            return print(json.dumps(runs, indent=1))
        imported = _time_import(model_dir, workdir, kind)
        print(f"import: {json.dumps(imported)}", flush=True)
        names = args.variants.split(",")
        procs = {}
        infos = {}
        for name in names:  # prepared one after another: compiles do not overlap
            procs[name] = _start(name, args, model_dir, workdir)
            infos[name] = json.loads(procs[name].stdout.readline())
            print(f"{name}: ready {json.dumps(infos[name])}", flush=True)
        times = {name: [] for name in names}
        for i in range(args.trials):
            shift = i % len(names)
            for name in names[shift:] + names[:shift]:
                out = _ask(procs[name], f"run {args.steps_per_trial}")
                times[name].append(out["s"] / args.steps_per_trial)
            print(f"trial {i}: " + ", ".join(f"{n} {times[n][-1]:.3f} s" for n in names))
        for name in names:
            infos[name].update(_ask(procs[name], "quit"))
            procs[name].wait()
    record = {
        "args": vars(args),
        "env": {
            **environment(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", args.omp_wait_policy),
        },
        "import": imported,
        "variants": {
            name: {**infos[name], "step_time_s": step_stats(times[name]), "trials_s": times[name]}
            for name in names
        },
    }
    if args.out:
        write_record(args.out, record, markdown(record))
    print(markdown(record))


if __name__ == "__main__":
    main()
