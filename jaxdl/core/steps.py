"""The jitted train and eval steps: pure functions of (state, batch).

``train_step(state, batch) -> (state, metrics)`` differentiates only ``state.params`` (the
trainable leaves, LoRA adapters included); frozen leaves are constants to it, so they get
neither gradients nor optimizer state. Dropout keys are ``fold_in(state.rng, state.step)``,
so a step's randomness depends on nothing but the state: resumed runs repeat bitwise.

Research code uses these directly::

    train_step = make_train_step(model, head, tx)
    state, metrics = train_step(state, batch)
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Collection, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxdl.core import adapters, losses, quant, tree
from jaxdl.core.batch import BatchSpec, check_batch
from jaxdl.core.heads import FLAGS, Batch, Head, Metrics
from jaxdl.core.state import TrainState

StepFn = Callable[[TrainState, Batch], tuple[TrainState, Metrics]]


def _base_tree(
    params: Mapping[str, Any], frozen: Mapping[str, Any], keep: Collection[str] = ()
) -> dict:
    """{"params": ...} from trainable + frozen parts, LoRA adapters left out; frozen kernels
    stored quantized (QLoRA, `jaxdl.core.quant`) are dequantized here, inside the step,
    except those in ``keep`` (multiplied quantized where used, `quant.quantized_dense`)."""
    plain = {k: v for k, v in params.items() if k != "lora"}
    if not frozen:
        return dict(plain)
    return tree.merge(plain, quant.dequantize_tree(frozen, keep=keep))


def model_params(
    params: Mapping[str, Any],
    frozen: Mapping[str, Any],
    lora_cfg: Mapping | None,
    *,
    unmerged: frozenset[str] = frozenset(),
    keep_quantized: frozenset[str] = frozenset(),
) -> dict:
    """The model's full "params" collection from trainable + frozen (+ LoRA) parts.

    LoRA adapters are merged into their kernels, except those in ``unmerged``, whose A and
    B are placed beside the kernel instead (`adapters.place_factors`, for
    `adapters.low_rank_dense`); quantized frozen kernels are dequantized (float32) first,
    so the adapters add to those, except those in ``keep_quantized``, which stay quantized
    dicts (for `quant.quantized_dense`).
    """
    full = _base_tree(params, frozen, keep_quantized)
    if "lora" in params:
        assert lora_cfg is not None, "state holds LoRA adapters but no lora config was given"
        rank, alpha = lora_cfg["rank"], lora_cfg["alpha"]
        full = adapters.merge(full, params["lora"], rank=rank, alpha=alpha, skip=unmerged)
        full = adapters.place_factors(full, params["lora"], unmerged)
    return full.get("params", {})


def _forward(apply: Callable, params, frozen, lora_cfg: Mapping | None, factored_lora: bool):
    """`apply(model params)` inside a step.

    LoRA adapters of plain nn.Dense layers (stacked by nn.scan too) run as
    ``x W + s (x A) B`` (`adapters.low_rank_dense`, no full weight gradient) unless
    ``factored_lora`` is False; the rest are merged into their kernels. Quantized frozen
    kernels (QLoRA) of plain nn.Dense layers whose adapters are not merged are multiplied
    quantized where they are used (`quant.quantized_dense`), so no float copy of the base
    outlives its product; the other quantized kernels are dequantized up front.
    """
    lora = params.get("lora")
    adapted = frozenset(adapters.pairs(lora)) if lora is not None else frozenset()
    candidates = frozenset()
    if lora is not None and factored_lora:
        shapes = jax.eval_shape(lambda: _base_tree(params, frozen))  # stages no dequantizing
        candidates = adapters.factorable_candidates(shapes, lora)
    quantized = frozenset(quant.quantized_kernels(frozen)) if frozen else frozenset()
    dense = frozenset()
    if candidates or quantized:  # one abstract trace finds both kinds
        merged = lambda: apply(model_params(params, frozen, lora_cfg))
        dense = adapters.dense_kernels(merged, candidates | quantized)
    factored = dense & candidates
    # a kernel whose adapter is merged into it is needed whole: dequantized up front
    keep = (dense & quantized) - (adapted - factored)
    with contextlib.ExitStack() as stack:  # entered first, called first: low rank, then base
        if factored:
            rank, alpha = lora_cfg["rank"], lora_cfg["alpha"]
            stack.enter_context(adapters.low_rank_dense(rank=rank, alpha=alpha))
        if keep:
            stack.enter_context(quant.quantized_dense())
        return apply(model_params(params, frozen, lora_cfg, unmerged=factored, keep_quantized=keep))


def _apply(model: nn.Module, variables, x, *, train: bool, rng=None, mutable=(), extra=None):
    rngs = {"dropout": rng} if rng is not None else None
    extra = extra or {}
    if mutable:
        return model.apply(variables, x, train=train, rngs=rngs, mutable=list(mutable), **extra)
    return model.apply(variables, x, train=train, rngs=rngs, **extra), {}


def _model_inputs(head: Head, batch: Batch) -> dict[str, jax.Array]:
    """The batch's extra model inputs the head names (packed rows' segment_ids, ...)."""
    return {k: batch[k] for k in head.model_inputs if k in batch}


def _micro_batches(batch: Batch, accumulate: int) -> Batch:
    """[K * B, ...] leaves -> [K, B, ...]: micro-batch k is rows k*B .. k*B + B - 1."""

    def split(x):
        if x.shape[0] % accumulate:
            raise ValueError(
                f"a batch of {x.shape[0]} rows does not split into {accumulate} micro-batches"
            )
        return x.reshape(accumulate, x.shape[0] // accumulate, *x.shape[1:])

    return jax.tree.map(split, batch)


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model: nn.Module,
    head: Head,
    tx: optax.GradientTransformation,
    lora_cfg: Mapping | None = None,
    l1: float = 0.0,
    l2: float = 0.0,
    gather: Mapping[str, Any] | None = None,
    factored_lora: bool = True,
    accumulate: int = 1,
) -> tuple[TrainState, Metrics]:
    """One optimizer step. Metrics: loss, the task's metrics, grad_norm, finite (1/0).

    ``accumulate=K``: the batch's K * B rows are K micro-batches of B, run one after another
    (`lax.scan`: the activations of one at a time); their gradients are summed and divided
    by the weight of the whole batch (`Head.sums`: its rows, or an SFT batch's loss
    tokens), so the update equals one step on all K * B rows, whatever each holds.

    ``factored_lora``: True (default) computes the LoRA adapters of plain nn.Dense layers as
    ``x W + s (x A) B`` (`adapters.low_rank_dense`); False merges every adapter into its
    kernel (``W + s A B``). Same function. The rule is "always factor": the factored form
    never forms the full ``[in, out]`` weight gradient that a merged kernel pays for, so it
    does fewer FLOPs on any backend, and with its own backward pass (`adapters.low_rank`) it
    also measured faster than merged, and than full fine-tuning, on CPU from a 4-layer
    width-128 GPT to GPT-2 124M (benchmarks/README.md, `python benchmarks/lora_cost.py`).
    Adapters of other layers (convolutions, DenseGeneral, nn.scan-stacked) are merged either
    way.

    ``gather``: {"params", "frozen"} shardings the weights take where they are used
    (`jaxdl.parallel.sharding.Layout.gather`, FSDP): XLA then all-gathers weights instead of
    moving activations, and the gradients go back sharded (reduce-scatter).
    """
    rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
        frozen = state.frozen
        if gather is not None:
            params = jax.lax.with_sharding_constraint(params, gather["params"])
            frozen = jax.lax.with_sharding_constraint(frozen, gather["frozen"])

        def apply(weights):
            return _apply(
                model,
                {"params": weights, **state.model_state},
                batch[head.input_key],
                train=True,
                rng=rng,
                mutable=tuple(state.model_state),
                extra=_model_inputs(head, batch),
            )

        outputs, new_model_state = _forward(apply, params, frozen, lora_cfg, factored_lora)
        loss, metrics = head.loss(outputs, batch)
        penalty = 0.0
        plain = {k: v for k, v in params.items() if k != "lora"}
        if not losses.static_zero(l1):
            penalty += l1 * losses.l1_penalty(plain)
        if not losses.static_zero(l2):
            penalty += l2 * losses.l2_penalty(plain)
        return loss + penalty, (loss, metrics, new_model_state)

    if accumulate > 1:
        loss, metrics, new_model_state, grads = _accumulated_grads(
            state,
            _micro_batches(batch, accumulate),
            rng,
            model,
            head,
            lora_cfg,
            l1,
            l2,
            factored_lora,
        )
    else:
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, (loss, metrics, new_model_state)), grads = grad_fn(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.global_norm(grads)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        model_state=new_model_state or state.model_state,
    )
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    return new_state, {"loss": loss, **metrics, "grad_norm": grad_norm, "finite": finite}


def _accumulated_grads(state, micro, rng, model, head, lora_cfg, l1, l2, factored_lora):
    """Sum the K micro-batches' loss sums and gradients (`lax.scan`), then divide by their
    total weight; the l1/l2 penalty joins once. -> (loss, metrics, model_state, grads)."""

    def sum_fn(params, model_state, batch, key):
        def apply(weights):
            return _apply(
                model,
                {"params": weights, **model_state},
                batch[head.input_key],
                train=True,
                rng=key,
                mutable=tuple(model_state),
                extra=_model_inputs(head, batch),
            )

        outputs, new_model_state = _forward(apply, params, state.frozen, lora_cfg, factored_lora)
        total, weight, metrics = head.sums(outputs, batch)
        return total, (weight, metrics, new_model_state)

    grad_fn = jax.value_and_grad(sum_fn, has_aux=True)

    def body(carry, xs):
        grads, total, weight, model_state, metric_sums = carry
        k, batch = xs
        (t, (w, m, new_model_state)), g = grad_fn(
            state.params, model_state, batch, jax.random.fold_in(rng, k)
        )
        flags = _combine_flags(metric_sums, m)
        metric_sums = {key: flags.get(key, a + m[key] * w) for key, a in metric_sums.items()}
        grads = jax.tree.map(jnp.add, grads, g)
        return (grads, total + t, weight + w, new_model_state or model_state, metric_sums), None

    zeros = lambda tree_: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree_)
    first = jax.tree.map(lambda x: x[0], micro)
    (_, (_, metric_shapes, _)), _ = jax.eval_shape(
        grad_fn, state.params, state.model_state, first, rng
    )
    k = jax.tree.leaves(micro)[0].shape[0]
    init = (zeros(state.params), jnp.float32(0), jnp.float32(0), state.model_state)
    metric_init = {
        key: jnp.ones((), bool) if key == "labels_ok" else jnp.zeros(shape.shape, shape.dtype)
        for key, shape in metric_shapes.items()
    }
    metric_init = {
        k_: v.astype(jnp.float32) if k_ not in FLAGS else v for k_, v in metric_init.items()
    }
    (grads, total, weight, model_state, metric_sums), _ = jax.lax.scan(
        body, (*init, metric_init), (jnp.arange(k), micro)
    )
    weight = jnp.maximum(weight, 1e-12)
    grads = jax.tree.map(lambda g: g / weight, grads)
    if not (losses.static_zero(l1) and losses.static_zero(l2)):

        def penalty(params):
            plain = {key: v for key, v in params.items() if key != "lora"}
            return l1 * losses.l1_penalty(plain) + l2 * losses.l2_penalty(plain)

        grads = jax.tree.map(jnp.add, grads, jax.grad(penalty)(state.params))
    loss = total / weight
    metrics = {k_: v if k_ in FLAGS else v / weight for k_, v in metric_sums.items()}
    return loss, metrics, model_state, grads


def _combine_flags(so_far: Metrics, new: Metrics) -> Metrics:
    """The label checks over micro-batches: labels_ok of all, and the bad label of the first
    micro-batch that had one."""
    if "labels_ok" not in new:
        return {}
    first_bad = so_far["labels_ok"] & ~new["labels_ok"]
    return {
        "labels_ok": so_far["labels_ok"] & new["labels_ok"],
        "bad_label": jnp.where(first_bad, new["bad_label"], so_far["bad_label"]),
    }


def eval_step(
    state: TrainState,
    batch: Batch,
    *,
    model: nn.Module,
    head: Head,
    lora_cfg: Mapping | None = None,
    gather: Mapping[str, Any] | None = None,
) -> Metrics:
    """Masked metric sums over one padded eval batch (BatchNorm uses running statistics)."""
    params, frozen = state.params, state.frozen
    if gather is not None:  # as in train_step
        params = jax.lax.with_sharding_constraint(params, gather["params"])
        frozen = jax.lax.with_sharding_constraint(frozen, gather["frozen"])
    extra = _model_inputs(head, batch)

    def apply(weights):
        variables = {"params": weights, **state.model_state}
        return _apply(model, variables, batch[head.input_key], train=False, extra=extra)

    outputs, _ = _forward(apply, params, frozen, lora_cfg, factored_lora=True)
    return head.eval_sums(outputs, batch)


def _jit(fn: Callable, layout, bound: Mapping[str, Any], *, train: bool, stacked: bool = False):
    """`fn` with `bound` keywords, jitted once (the state donated when training). With a
    ``layout`` the state keeps its sharding, batches are split by rows (by B of a stacked
    [K, B, ...]) and metrics come back replicated; XLA inserts the collectives."""
    if layout is None:
        return jax.jit(functools.partial(fn, **bound), donate_argnums=0 if train else ())
    batch = layout.batch
    if stacked:
        spec = jax.sharding.PartitionSpec(None, *layout.batch.spec)
        batch = jax.sharding.NamedSharding(layout.mesh, spec)
    return jax.jit(
        functools.partial(fn, **bound, gather=layout.gather),
        donate_argnums=0 if train else (),
        in_shardings=(layout.state, batch),
        out_shardings=(layout.state, layout.replicated) if train else layout.replicated,
    )


def _checked(fn, spec: BatchSpec | None, where: str, *, stacked: bool = False):
    """`fn` that first checks each batch (one step's slice of a stacked one) on the host."""
    if spec is None:
        return fn

    @functools.wraps(fn)
    def wrapper(state, batch):
        one = batch
        if stacked:
            one = {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for k, v in batch.items()}
        check_batch(one, spec, where=where)
        return fn(state, batch)

    return wrapper


def make_train_step(
    model: nn.Module,
    head: Head,
    tx: optax.GradientTransformation,
    *,
    batch_spec: BatchSpec | None = None,
    layout=None,
    **kwargs,
) -> StepFn:
    """`train_step` with everything but (state, batch) bound; jitted once, state donated.

    With ``batch_spec`` each call first checks the batch's shapes on the host. With a
    ``layout`` (`jaxdl.parallel.sharding.Layout`) the state keeps its sharding, batches are split
    by rows and metrics come back replicated; XLA inserts the collectives.
    """
    bound = dict(model=model, head=head, tx=tx, **kwargs)
    return _checked(_jit(train_step, layout, bound, train=True), batch_spec, "train_step")


def train_steps(state: TrainState, batches: Batch, **kwargs) -> tuple[TrainState, Metrics]:
    """``K`` optimizer steps in one call: batches stacked [K, B, ...] -> metrics [K].

    A `lax.scan` over `train_step`, so one dispatch (and one host round trip) serves K
    steps; each step still folds its own step number into the dropout key.
    """
    return jax.lax.scan(lambda s, batch: train_step(s, batch, **kwargs), state, batches)


def make_train_steps(
    model: nn.Module,
    head: Head,
    tx: optax.GradientTransformation,
    *,
    batch_spec: BatchSpec | None = None,
    layout=None,
    **kwargs,
) -> StepFn:
    """`train_steps` bound like `make_train_step`: (state, batches [K, B, ...]) -> metrics [K]."""
    bound = dict(model=model, head=head, tx=tx, **kwargs)
    jitted = _jit(train_steps, layout, bound, train=True, stacked=True)
    return _checked(jitted, batch_spec, "train_steps", stacked=True)


def make_eval_step(
    model: nn.Module, head: Head, *, batch_spec: BatchSpec | None = None, layout=None, **kwargs
) -> Callable[[TrainState, Batch], Metrics]:
    bound = dict(model=model, head=head, **kwargs)
    return _checked(_jit(eval_step, layout, bound, train=False), batch_spec, "eval_step")


def make_predict(model: nn.Module, lora_cfg: Mapping | None = None):
    """predict(state, x) -> outputs (logits), eval mode."""

    def predict(state: TrainState, x: jax.Array) -> jax.Array:
        def apply(weights):
            return _apply(model, {"params": weights, **state.model_state}, x, train=False)

        return _forward(apply, state.params, state.frozen, lora_cfg, factored_lora=True)[0]

    return jax.jit(predict)
