"""Federated averaging (FedAvg, McMahan et al. 2017), simulated on the vmapped machinery.

    train split -> C client shards (IID, or label-skewed by Dirichlet(alpha) per class)
    round r:  sample K of C clients -> each starts from the global params with a fresh
              optimizer state -> E local steps on its own shard (K clients = one vmapped
              step, `jaxdl.core.vmapped`) -> server: global = sum_k n_k params_k / sum_k n_k
              -> evaluate the global model on val

    jaxdl train --config experiments/digits_mlp.py --workdir runs/fedavg \\
        --config.federated.clients=10 --config.federated.rounds=20 \\
        --config.federated.local_steps=10 --config.federated.alpha=0.1

Config: ``federated.clients`` C (0: off), ``rounds`` R, ``local_steps`` E,
``alpha`` (0: IID shards; > 0: Dirichlet label skew, smaller is more skewed),
``clients_per_round`` K (0: all C). The workdir gets config.json, metrics.jsonl (one val
line per round, ``step`` = round), a checkpoint after every round (the global model, each
client's data position and the client sampler: a killed or stopped run resumes after its
last round, exactly) and summary.json.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdl.core import vmapped
from jaxdl.core.optim import make_optimizer
from jaxdl.data import build_data
from jaxdl.data.records import Subset
from jaxdl.errors import UserError
from jaxdl.fileio import write_json
from jaxdl.finetune import partition
from jaxdl.training.build import build
from jaxdl.training.guards import stop_on_signals, workdir_lock
from jaxdl.training.runlog import MetricLogger, params_sha256
from jaxdl.training.trainer import check_workdir, full_params

MAX_DRAWS = 1000
RESUME = "Run the same command to resume."


def client_shards(
    labels: np.ndarray, clients: int, alpha: float, min_size: int, seed: int
) -> list[np.ndarray]:
    """Indices of each client's shard of the train split (disjoint, covering it).

    IID (alpha = 0): a random permutation cut into C near-equal parts. Dirichlet(alpha):
    each class's examples are divided among the clients in proportions drawn from
    Dir(alpha, ..., alpha), redrawn until every client holds at least ``min_size``.
    """
    n = len(labels)
    if clients > n:
        raise UserError(
            f"federated.clients: expected at most {n} (the train examples), found {clients}. "
            "Fix: lower federated.clients."
        )
    if clients * min_size > n:
        raise UserError(
            f"federated.clients: {clients} clients x data.batch_size {min_size} exceeds the "
            f"{n} train examples, so some client cannot fill one batch. Fix: lower "
            "federated.clients or data.batch_size."
        )
    rng = np.random.default_rng(seed)
    if alpha <= 0:
        return [np.sort(part) for part in np.array_split(rng.permutation(n), clients)]
    for _ in range(MAX_DRAWS):
        shards: list[list[int]] = [[] for _ in range(clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha))) * len(idx)).astype(int)
            for k, part in enumerate(np.split(idx, cuts[:-1])):
                shards[k].extend(part.tolist())
        if min(len(s) for s in shards) >= min_size:
            return [np.sort(np.asarray(s, np.int64)) for s in shards]
    raise UserError(
        f"federated.alpha: {alpha} gave some client fewer than data.batch_size={min_size} "
        f"examples in {MAX_DRAWS} draws. Fix: raise federated.alpha or lower federated.clients."
    )


def _client_data(data, indices: np.ndarray):
    """``data`` restricted to these train records (its own cache: shards differ)."""
    source = copy.copy(data.source)
    source.splits = {**source.splits, "train": Subset(source.splits["train"], indices)}
    sizes = {**data.split_sizes, "train": len(indices)}
    return dataclasses.replace(data, source=source, split_sizes=sizes, _caches={})


def run_federated(
    cfg: ml_collections.ConfigDict, workdir: str | Path, *, echo=print
) -> dict[str, Any]:
    """FedAvg for ``cfg.federated``; returns the summary (test accuracy of the global model)."""
    fed = cfg.federated
    for key in ("rounds", "local_steps"):
        if fed[key] < 1:
            raise UserError(f"config.federated.{key}: expected >= 1, found {fed[key]}.")
    start_time = time.time()
    workdir = Path(workdir)
    config_dict = check_workdir(workdir, cfg)
    data = build_data(cfg.data, seed=cfg.seed, num_classes=cfg.model.get("num_classes"))
    batch_size = cfg.data.batch_size
    labels = data.source.labels("train")
    shards = client_shards(labels, fed.clients, float(fed.alpha), batch_size, cfg.seed)
    clients = [_client_data(data, s) for s in shards]
    counts = np.array([len(s) for s in shards], np.float32)
    per_round = fed.clients_per_round or fed.clients
    if not 1 <= per_round <= fed.clients:
        raise UserError(
            f"config.federated.clients_per_round: expected 0 (all) or 1..{fed.clients}, "
            f"found {fed.clients_per_round}."
        )

    # ---- model and one vmapped local step for K clients -------------------------------------
    local_total = fed.rounds * fed.local_steps
    setup = build(
        cfg,
        kind=data.kind,
        example_spec=data.example_spec,
        num_classes=data.num_classes,
        total_steps=local_total,
        task_fields=data.task_fields,
    )
    trainable = setup.state.params
    mults = dict(
        lr_mults=lambda step: partition.lr_mult_tree(setup.plan, trainable, step),
        wd_mults=partition.wd_mult_tree(setup.plan, trainable),
    )
    opt_cfg = dict(cfg.optimizer)
    local_step = vmapped.make_group_step(
        setup.model,
        setup.head,
        opt_cfg,
        local_total,
        l1=cfg.loss.l1,
        l2=cfg.loss.l2,
        lora_cfg=setup.lora_cfg,
        **mults,
    )
    tx = make_optimizer(opt_cfg, local_total, **mults)
    hyper = vmapped.hyper_arrays([opt_cfg] * per_round)
    group_eval = vmapped.make_group_eval(setup.model, setup.head, lora_cfg=setup.lora_cfg)

    @jax.jit
    def average(params, weights):
        """Server step: the example-weighted mean of the clients' params [K, ...]."""
        w = weights / weights.sum()
        return jax.tree.map(lambda p: jnp.tensordot(w, p, axes=1), params)

    # Every round is checkpointed (global state, each client's data position, the sampler's
    # generator): a killed or stopped run resumes after its last saved round, exactly.
    from jaxdl.checkpoint.manager import Checkpointer

    with (
        workdir_lock(workdir),
        stop_on_signals() as stop,
        contextlib.ExitStack() as stack,
    ):
        write_json(workdir / "config.json", config_dict)
        write_json(
            workdir / "clients.json",
            {
                "examples": counts.astype(int).tolist(),
                "classes": [
                    np.bincount(labels[s], minlength=data.num_classes).tolist() for s in shards
                ],
            },
        )
        iters = [c.train_iter(batch_size, seed=cfg.seed + k) for k, c in enumerate(clients)]
        rng = np.random.default_rng(cfg.seed)
        for it in iters:
            stack.callback(it.close)
        ckpt = stack.enter_context(
            Checkpointer(workdir, max_to_keep=cfg.keep_checkpoints, best_metric=None)
        )
        start_step, global_state, data_state = ckpt.resume(setup.state, require_data=True)
        start = start_step // fed.local_steps
        if data_state is not None:
            for it, position in zip(iters, data_state["clients"], strict=True):
                it.set_state(position)
            rng.bit_generator.state = data_state["sampler"]
            echo(f"resumed from round {start} in {workdir / 'checkpoints'}")
        logger = stack.enter_context(MetricLogger(workdir, resume_step=start, config=config_dict))
        for r in range(start + 1, fed.rounds + 1):
            stop.check(f"before round {r}; rounds 1..{r - 1} are saved. {RESUME}")
            chosen = np.sort(rng.choice(fed.clients, per_round, replace=False))
            # every chosen client starts from the global params, fresh optimizer state
            begin = global_state.replace(opt_state=tx.init(global_state.params))
            state = vmapped.stack([begin] * per_round)
            state = state.replace(
                rng=jnp.stack([jax.random.fold_in(begin.rng, int(k)) for k in chosen])
            )
            losses = []
            for _ in range(fed.local_steps):
                host = [next(iters[k]) for k in chosen]
                batch = {key: np.stack([b[key] for b in host]) for key in host[0]}
                state, metrics = local_step(state, batch, hyper)
                losses.append(metrics["loss"])
            losses = np.asarray(jax.device_get(losses))
            if not np.isfinite(losses).all():
                raise UserError(
                    f"loss: expected finite values, found NaN/Inf in round {r}. Fix: lower "
                    "optimizer.learning_rate or federated.local_steps."
                )
            params = average(state.params, jnp.asarray(counts[chosen]))
            global_state = global_state.replace(
                params=params,
                model_state=average(state.model_state, jnp.asarray(counts[chosen])),
                step=global_state.step + fed.local_steps,
            )
            val = _evaluate_global(group_eval, global_state, data, cfg.data.eval_split, batch_size)
            logger.log(r, "train", {"loss": float(losses.mean())})
            logger.log(r, "val", val)
            echo(f"round {r}: val accuracy {val.get('accuracy', float('nan')):.4f}")
            ckpt.save(
                int(global_state.step),
                global_state,
                data_state={
                    "clients": [it.get_state() for it in iters],
                    "sampler": rng.bit_generator.state,
                },
                config=config_dict,
            )
        ckpt.wait()
        stop.check(f"after round {fed.rounds} (saved). Run the same command to finish.")
        test = _evaluate_global(group_eval, global_state, data, cfg.data.test_split, batch_size)
        logger.log(fed.rounds, "test", test)
        summary = {
            "rounds": fed.rounds,
            "clients": fed.clients,
            "local_steps": fed.local_steps,
            "test_loss": test["loss"],
            "test_accuracy": test.get("accuracy"),
            "params_sha256": params_sha256(full_params(global_state, setup)),
            "wall_s": time.time() - start_time,
        }
        write_json(workdir / "summary.json", summary)
        logger.finish(summary, ("summary.json", "config.json"))
        stop.check(f"after the run finished ({workdir / 'summary.json'} written)")
        return summary


def _evaluate_global(group_eval, state, data, split: str, batch_size: int) -> dict:
    """The global model on ``split`` (a group of one)."""
    from jaxdl.training import scores

    stacked = vmapped.stack([state])
    sums, per_example = None, []
    for batch in data.eval_iter(split, batch_size):
        out = dict(group_eval(stacked, {k: v[None] for k, v in batch.items()}))
        if "per_example" in out:
            per_example.append(out.pop("per_example"))
        sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
    sums, per_example = jax.device_get((sums, per_example))
    return scores.member_metrics(sums, per_example, data.kind, 1)[0]
