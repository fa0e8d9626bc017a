"""Compress a trained workdir: int8 quantization and magnitude pruning, measured.

The transforms themselves are pure functions over parameter trees (`jaxdl.deploy.quantize`,
`jaxdl.deploy.prune`); this module runs them on a restored run and reports test metrics before
and after, with the exported artifact's size for each variant::

    report = compress_report("runs/digits_cnn", sparsity=0.5)
    python experiments/compress_digits.py --workdir runs/digits_cnn [--sparsity 0.5] [--out-dir DIR]

Pruning is followed by a short recovery fine-tune whose optimizer updates are masked
(`prune.keep_masked`), so pruned weights stay exactly zero.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdl.core import steps
from jaxdl.core.state import TrainState
from jaxdl.deploy import prune as prune_lib
from jaxdl.deploy.quantize import dequantize, quantize_params


def _state_for(setup, params: Mapping, tx: optax.GradientTransformation | None = None):
    """A TrainState whose trainable part is the full model params (nothing frozen, no LoRA)."""
    trainable = {"params": jax.tree.map(jnp.asarray, dict(params))}
    return TrainState(
        step=jnp.zeros([], jnp.int32),
        params=trainable,
        frozen={},
        model_state=setup.state.model_state,
        opt_state=tx.init(trainable) if tx is not None else (),
        rng=setup.state.rng,
    )


def evaluate_params(
    setup, data, params: Mapping, split: str = "test", batch_size: int = 256
) -> dict[str, float]:
    """The task's metrics (accuracy, loss, ... or bits_per_byte) of `params` on `split`."""
    from jaxdl.training.evaluate import evaluate_split

    eval_step = steps.make_eval_step(setup.model, setup.head)
    return evaluate_split(
        eval_step, _state_for(setup, params), data.eval_iter(split, batch_size), data.kind
    )


def recover(
    cfg,
    setup,
    data,
    params: Mapping,
    masks: Mapping,
    num_steps: int,
    learning_rate: float | None = None,
) -> dict:
    """Fine-tune pruned `params` for `num_steps` with masked updates; the new params.

    The run's optimizer at a constant learning rate (default: the run's base rate).
    """
    from jaxdl.core.optim import make_optimizer

    opt_cfg = {
        **cfg.optimizer.to_dict(),
        "schedule": "constant",
        "warmup_steps": 0,
        "accumulate_steps": 1,
    }
    if learning_rate is not None:
        opt_cfg["learning_rate"] = float(learning_rate)
    tx = optax.chain(make_optimizer(opt_cfg, num_steps), prune_lib.keep_masked({"params": masks}))
    train_step = steps.make_train_step(setup.model, setup.head, tx, l1=cfg.loss.l1, l2=cfg.loss.l2)
    state = _state_for(setup, params, tx)
    batches = data.train_iter(cfg.data.batch_size, seed=cfg.seed + 1)
    for _ in range(num_steps):
        state, _ = train_step(state, next(batches))
    batches.close()
    return jax.tree.map(np.asarray, jax.device_get(state.params["params"]))


def _sizes(path: Path) -> dict[str, int]:
    blob = path.read_bytes()
    return {"artifact_bytes": len(blob), "artifact_zlib_bytes": len(zlib.compress(blob, 9))}


def compress_report(
    workdir: str | Path,
    *,
    sparsity: float = 0.5,
    scope: str = "global",
    recovery_steps: int | None = None,
    learning_rate: float | None = None,
    split: str = "test",
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Baseline vs int8 vs pruned (+ recovery) on `split`, with artifact sizes.

    recovery_steps: default two epochs. out_dir keeps the three artifacts (baseline,
    int8, pruned); by default they go to a temporary folder.
    """
    from jaxdl.deploy.export import export_run
    from jaxdl.training.evaluate import restore_run

    cfg, setup, data = restore_run(workdir)
    if split not in data.split_sizes:
        raise ValueError(f"--split: expected one of {sorted(data.split_sizes)}, found {split!r}.")
    metric = "bits_per_byte" if data.kind == "lm" else "accuracy"
    params = jax.tree.map(
        np.asarray,
        jax.device_get(steps.model_params(setup.state.params, setup.state.frozen, setup.lora_cfg)),
    )
    if recovery_steps is None:
        recovery_steps = 2 * data.steps_per_epoch(cfg.data.batch_size)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(out_dir or tmp)
        out.mkdir(parents=True, exist_ok=True)

        def export(name: str, **kwargs) -> dict[str, int]:
            path = out / f"{name}.jaxexport"
            export_run(cfg, setup, data, path, workdir=workdir, **kwargs)
            return _sizes(path)

        base = evaluate_params(setup, data, params, split)
        base_size = export("baseline")

        qparams, qreport = quantize_params(params)
        int8 = evaluate_params(setup, data, dequantize(qparams), split)
        int8_size = export("int8", quantize="int8")

        pruned, masks = prune_lib.prune(params, sparsity, scope)
        pruned_metrics = evaluate_params(setup, data, pruned, split)
        recovered = recover(cfg, setup, data, pruned, masks, recovery_steps, learning_rate)
        recovered_metrics = evaluate_params(setup, data, recovered, split)
        pruned_size = export("pruned", params=recovered)

    def change(metrics: Mapping[str, float]) -> float:
        return metrics[metric] - base[metric]

    return {
        "workdir": str(workdir),
        "split": split,
        "metric": metric,
        "baseline": {**base, **base_size},
        "int8": {
            **int8,
            **int8_size,
            f"{metric}_change": change(int8),
            "artifact_ratio": base_size["artifact_bytes"] / int8_size["artifact_bytes"],
            "weight_bytes_before": qreport["bytes_before"],
            "weight_bytes_after": qreport["bytes_after"],
            "max_abs_weight_error": qreport["max_abs_error"],
        },
        "pruned": {
            "sparsity": sparsity,
            "scope": scope,
            "achieved_sparsity": prune_lib.sparsity(pruned)["global"],
            "before_recovery": pruned_metrics,
            "recovery_steps": recovery_steps,
            **recovered_metrics,
            **pruned_size,
            f"{metric}_change": change(recovered_metrics),
            "sparsity_after_recovery": prune_lib.sparsity(recovered)["global"],
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python experiments/compress_digits.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--scope", choices=prune_lib.SCOPES, default="global")
    parser.add_argument("--recovery-steps", type=int, default=None)
    parser.add_argument("--split", default="test")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    try:
        report = compress_report(
            args.workdir,
            sparsity=args.sparsity,
            scope=args.scope,
            recovery_steps=args.recovery_steps,
            split=args.split,
            out_dir=args.out_dir,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"jaxdl.compress: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
