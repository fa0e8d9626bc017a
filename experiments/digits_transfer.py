"""Does pretraining on digits 0-4 help learn digits 5-9 from a few examples?

    python experiments/digits_transfer.py [--quick] [--workdir runs/digits_transfer]

1. Pretrain the SimpleCNN on digits 0-4 (all their train examples, a 5-class head).
2. For 1, 5 and 10 train examples per class of digits 5-9 (the first N of each class in
   the stored split order, the same for every seed) and 3 seeds, train a 5-class model:
     scratch       fresh init, every parameter trains
     linear_probe  pretrained backbone frozen, fresh head trains
     full_ft       pretrained backbone and fresh head both train
     lora          pretrained backbone frozen + rank-4 LoRA adapters on its kernels, fresh head
   All runs use one protocol, tuned for none of them: Adam 1e-3 for 300 steps (every
   method but the linear probe reaches ~0 training loss; the table shows the final
   training loss), batch min(25, 5N), test accuracy on all 180 test images of digits 5-9
   at the last step (no model selection on val). The runs are the tasks of one
   `jaxdl.training.multitask.run_tasks` call, so each restores the pretrained checkpoint afresh.
3. Write WORKDIR/results.json (every run, the aggregate, the protocol) and
   WORKDIR/results.md: mean +/- std (sample std over seeds) test accuracy, trainable
   parameters and median train step time (ms) per method and N.

The std covers initialisation and data order only: the N examples are fixed, and with 1
example per class the choice of that example matters more than the seed. Step times are
per step at that N's batch size, on a CPU shared with other work: compare within a column.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax

from jaxdl import config as config_lib
from jaxdl.fileio import write_json
from jaxdl.training.multitask import run_tasks
from jaxdl.training.runlog import read_metrics
from jaxdl.training.trainer import train

CNN_CONFIG = Path(__file__).with_name("digits_cnn.py")
PRETRAIN_CLASSES = [0, 1, 2, 3, 4]
TARGET_CLASSES = [5, 6, 7, 8, 9]
BACKBONE_KERNELS = "params/(conv_0|conv_1|fc)/kernel"
HEAD_ONLY = [("params/head/.*", {}), (".*", {"trainable": False})]
METHODS = {
    "scratch": {"init_from.checkpoint": "", "init_from.reinit": []},
    "linear_probe": {"partition": HEAD_ONLY},
    "full_ft": {"partition": None},
    "lora": {
        "lora": {"rank": 4, "alpha": 8.0, "targets": BACKBONE_KERNELS},
        "partition": [("lora/.*", {}), *HEAD_ONLY],
    },
}
FULL = {"pretrain_steps": 400, "steps": 300, "shots": (1, 5, 10), "seeds": (0, 1, 2)}
QUICK = {"pretrain_steps": 100, "steps": 60, "shots": (1, 10), "seeds": (0,)}


def _config(overrides: list[str]):
    return config_lib.load_config(CNN_CONFIG, ["--config.num_epochs=0", *overrides])


def pretrain(workdir: Path, steps: int) -> dict:
    """SimpleCNN on digits 0-4: the checkpoint every fine-tune starts from."""
    cfg = _config(
        [
            f"--config.num_steps={steps}",
            f"--config.data.classes={PRETRAIN_CLASSES}",
            f"--config.model.num_classes={len(PRETRAIN_CLASSES)}",
            "--config.seed=0",
            "--config.best_metric=",
            "--config.keep_checkpoints=1",
        ]
    )
    return train(cfg, workdir, progress=False, echo=lambda *_: None)


def tasks_config(pretrained: Path, protocol: dict):
    """The base fine-tune config plus one task per (method, N, seed)."""
    steps = protocol["steps"]
    cfg = _config(
        [
            f"--config.num_steps={steps}",
            f"--config.eval_every={steps}",
            "--config.log_every=10",
            f"--config.data.classes={TARGET_CLASSES}",
            f"--config.model.num_classes={len(TARGET_CLASSES)}",
            f"--config.init_from.checkpoint={pretrained}",
            "--config.init_from.reinit=['params/head/.*']",
            "--config.best_metric=",
            "--config.keep_checkpoints=1",
        ]
    )
    cfg.tasks = [
        {
            "name": f"{method}-n{shots}-s{seed}",
            "seed": seed,
            "data.examples_per_class": shots,
            "data.batch_size": min(25, len(TARGET_CLASSES) * shots),
            **overrides,
        }
        for shots in protocol["shots"]
        for method, overrides in METHODS.items()
        for seed in protocol["seeds"]
    ]
    return cfg


def _final_train_loss(row: dict) -> float:
    """Mean train loss of the run's last logged window (10 steps)."""
    records = read_metrics(Path(row["workdir"]) / "metrics.jsonl")
    return [r for r in records if r["split"] == "train"][-1]["loss"]


def aggregate(rows: list[dict], protocol: dict) -> list[dict]:
    """One entry per (method, N): mean and sample std over seeds."""
    out = []
    for method in METHODS:
        for shots in protocol["shots"]:
            runs = [r for r in rows if r["task"].startswith(f"{method}-n{shots}-")]
            acc = [r["test_accuracy"] for r in runs]
            out.append(
                {
                    "method": method,
                    "shots": shots,
                    "seeds": len(runs),
                    "acc_mean": statistics.mean(acc),
                    "acc_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                    "train_loss": statistics.mean(_final_train_loss(r) for r in runs),
                    "trainable_params": runs[0]["trainable_params"],
                    "step_ms": statistics.median(r["step_ms"] for r in runs),
                }
            )
    return out


def markdown(table: list[dict], protocol: dict, pretrain_acc: float) -> str:
    shots = protocol["shots"]
    per_n = "/".join(map(str, shots))
    head = ["method", "trainable params", *[f"test acc N={n}" for n in shots]]
    head += [f"final train loss N={per_n}", f"step ms N={per_n}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in METHODS:
        cells = {e["shots"]: e for e in table if e["method"] == method}
        row = [method, f"{cells[shots[0]]['trainable_params']:,}"]
        row += [f"{cells[n]['acc_mean']:.3f} +/- {cells[n]['acc_std']:.3f}" for n in shots]
        row.append(" / ".join(f"{cells[n]['train_loss']:.3f}" for n in shots))
        row.append(" / ".join(f"{cells[n]['step_ms']:.1f}" for n in shots))
        lines.append("| " + " | ".join(row) + " |")
    seeds = len(protocol["seeds"])
    lines += [
        "",
        f"Digits 5-9 test accuracy (180 images, chance 0.2), mean +/- std over {seeds} "
        f"seed(s); N train examples per class; {protocol['steps']} Adam steps at 1e-3 for "
        f"every method. Pretrained on digits 0-4 for {protocol['pretrain_steps']} steps "
        f"(test accuracy on 0-4: {pretrain_acc:.3f}).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, N in (1, 10), fewer steps")
    parser.add_argument("--workdir", default="runs/digits_transfer")
    args = parser.parse_args(argv)
    protocol = QUICK if args.quick else FULL
    workdir = Path(args.workdir)
    # ~40 short runs of a few model shapes: compile each shape once, not once per run.
    jax.config.update("jax_compilation_cache_dir", str(workdir / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

    start = time.time()
    pre = pretrain(workdir / "pretrain_0_4", protocol["pretrain_steps"])
    print(f"pretrained on digits 0-4: test accuracy {pre['test_accuracy']:.3f}")
    cfg = tasks_config(workdir / "pretrain_0_4", protocol)
    result = run_tasks(cfg, workdir / "finetune", progress=False, echo=lambda *_: None)
    table = aggregate(result["tasks"], protocol)
    text = markdown(table, protocol, pre["test_accuracy"])
    write_json(
        workdir / "results.json",
        {
            "protocol": {**protocol, "methods": METHODS, "batch_size": "min(25, 5 * N)"},
            "pretrain": {k: pre[k] for k in ("test_accuracy", "steps", "trainable_params")},
            "aggregate": table,
            "runs": result["tasks"],
            "wall_s": time.time() - start,
        },
    )
    (workdir / "results.md").write_text(text)
    print(text)
    print(f"wrote {workdir / 'results.json'} and {workdir / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
