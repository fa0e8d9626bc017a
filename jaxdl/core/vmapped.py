"""Many runs as one program: M members' train and eval steps under one `jax.vmap`.

Members share everything that fixes array shapes (model, data shapes, batch size, the
optimizer's kind and schedule) and differ only in numbers. Those numbers travel as
arrays [M] next to the stacked states, so one compiled step trains all M members:

    learning rate, weight decay, gradient-clipping norm   -> ``hyper`` arrays [M]
    init seed, data-order seed, dropout key                -> each member's own state and batches

vmap keeps members independent: a member whose loss turns NaN cannot reach its
neighbours, and member i computes what a standalone run of its config computes. On CPU the
group's programs keep reductions in XLA's own loops (`GROUP_COMPILER_OPTIONS`): XLA hands a
reduction to YNNPACK once the reduced array is large enough, and YNNPACK sums in another
order, so from 13 stacked digits-MLP members on the softmax and bias-gradient sums came out
an ulp off the standalone run's, which Adam grew to 2.3e-4 in val accuracy in 30 steps.
Without dropout a member of 16 now computes the same bits as alone; with a mask between
layers an ulp remains (XLA's own CPU fusions, YNNPACK off entirely or not), which stays
under 1e-5 in the val metric over 30 steps (tests/runs/test_sweep.py).
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdl.core import steps
from jaxdl.core.heads import Batch, Head, Metrics
from jaxdl.core.optim import make_optimizer
from jaxdl.core.state import TrainState
from jaxdl.errors import UserError

# Config keys whose values may differ inside one vmapped group (the rest fix the program).
VMAPPED_KEYS = (
    "optimizer.learning_rate",
    "optimizer.weight_decay",
    "optimizer.grad_clip_norm",
    "loss.label_smoothing",
    "loss.l1",
    "loss.l2",
    "model.dropout_rate",
    "seed",
)
HYPER = ("learning_rate", "weight_decay", "grad_clip_norm")
# YNNPACK keeps the dots (their results do not depend on the member count) but no reductions.
GROUP_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
LOSS_HYPER = ("label_smoothing", "l1", "l2")


def group_optimizer_config(opt_cfgs: Sequence[Mapping[str, Any]]) -> dict:
    """One optimizer config whose chain holds every transform any member uses.

    A member without weight decay or clipping gets rate 0 / norm inf, which leave its
    updates bitwise unchanged (``u + 0 * p``; a select that keeps ``u``).
    """
    cfg = dict(copy.deepcopy(dict(opt_cfgs[0])))
    for key in ("weight_decay", "grad_clip_norm"):
        cfg[key] = max(float(c[key]) for c in opt_cfgs)
    return cfg


def hyper_arrays(
    opt_cfgs: Sequence[Mapping[str, Any]],
    loss_cfgs: Sequence[Mapping[str, Any]] = (),
    model_cfgs: Sequence[Mapping[str, Any]] = (),
) -> dict[str, jax.Array]:
    """Per-member numbers -> float32 [M]: "learning_rate", "weight_decay", "grad_clip_norm",
    "label_smoothing", "l1", "l2" where some member's is not 0 (else the term stays out, as
    in a standalone run), and "dropout_rate" where members' rates differ."""
    out = {}
    for key in HYPER:
        values = [float(c[key]) for c in opt_cfgs]
        if key == "grad_clip_norm":
            values = [v if v > 0 else np.inf for v in values]
        out[key] = jnp.asarray(values, jnp.float32)
    for key in LOSS_HYPER:
        values = [float(c[key]) for c in loss_cfgs]
        if any(values):
            out[key] = jnp.asarray(values, jnp.float32)
    rates = [float(c.get("dropout_rate", 0.0)) for c in model_cfgs]
    if len(set(rates)) > 1:
        out["dropout_rate"] = jnp.asarray(rates, jnp.float32)
    return out


def dropout_with_rate(rate: jax.Array):
    """An `nn.intercept_methods` interceptor: every `nn.Dropout` drops with ``rate`` (a traced
    array: one member's rate) instead of its own number.

    The same computation as Flax's Dropout, so a member equals its standalone run; a member
    with rate 0 keeps every unit (its bernoulli(1) mask is all ones).
    """

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if not (isinstance(module, nn.Dropout) and context.method_name == "__call__"):
            return next_fun(*args, **kwargs)
        inputs = args[0]
        flag = kwargs.get("deterministic", args[1] if len(args) > 1 else None)
        if nn.merge_param("deterministic", module.deterministic, flag):
            return inputs
        rng = kwargs.get("rng")
        if rng is None:
            rng = module.make_rng(module.rng_collection)
        keep = 1.0 - rate
        shape = [1 if d in module.broadcast_dims else n for d, n in enumerate(inputs.shape)]
        mask = jnp.broadcast_to(jax.random.bernoulli(rng, p=keep, shape=shape), inputs.shape)
        return jax.lax.select(mask, inputs / keep.astype(inputs.dtype), jnp.zeros_like(inputs))

    return interceptor


def stack(trees: Sequence[Any]) -> Any:
    """[tree_1, ..., tree_M] -> one device tree with leaves [M, ...].

    Stacked on the host: op-by-op `jnp.stack` would compile once per leaf shape.
    """
    host = jax.device_get(list(trees))
    return jax.device_put(jax.tree.map(lambda *xs: np.stack(xs), *host))


def unstack(tree: Any, i: int) -> Any:
    """Member ``i`` of a stacked tree, as host arrays."""
    return jax.tree.map(lambda x: np.asarray(x)[i], jax.device_get(tree))


def restructure(state: TrainState, like: TrainState) -> TrainState:
    """``state`` with its optimizer state in ``like``'s tree structure.

    A group's chain may hold transforms a member's own chain lacks (weight decay, clipping);
    those keep no arrays, so the leaves are the same and only the tree differs.
    """
    leaves = jax.tree.leaves(state.opt_state)
    treedef = jax.tree.structure(like.opt_state)
    assert treedef.num_leaves == len(leaves), "group and member optimizer states differ"
    return state.replace(opt_state=jax.tree.unflatten(treedef, leaves))


def make_group_step(
    model: nn.Module,
    head: Head,
    opt_cfg: Mapping[str, Any],
    total_steps: int,
    *,
    lr_mults: Callable | None = None,
    wd_mults: Any | None = None,
    make_head: Callable[[jax.Array], Head] | None = None,
    scan: bool = False,
    **step_kwargs,
) -> Callable[[TrainState, Batch, Mapping[str, jax.Array]], tuple[TrainState, Metrics]]:
    """``step(states [M], batches [M, B, ...], hyper [M]) -> (states, metrics [M])``, jitted,
    states donated. With ``scan``, K steps per call (`steps_per_call`): batches
    [K, M, B, ...] -> metrics [K, M]. ``opt_cfg`` is `group_optimizer_config`'s; ``hyper``
    is `hyper_arrays`'; ``make_head(label_smoothing)`` rebuilds the head when members'
    smoothing differ; ``step_kwargs`` go to `jaxdl.core.steps.train_step` (l1, l2, lora_cfg).
    """
    if int(opt_cfg.get("accumulate_steps", 1)) > 1:
        raise UserError(
            f"optimizer.accumulate_steps: vmapped sweeps and federated rounds step without "
            f"accumulation, found {opt_cfg['accumulate_steps']}. Fix: set it to 1 and raise "
            "data.batch_size instead (each member's batch is its own)."
        )

    def member_step(state, batch, hyper):
        opt_values = {k: v for k, v in hyper.items() if k in HYPER}
        tx = make_optimizer(
            opt_cfg, total_steps, lr_mults=lr_mults, wd_mults=wd_mults, values=opt_values
        )
        member_head = head
        if "label_smoothing" in hyper:
            assert make_head is not None, "label smoothing differs but no make_head was given"
            member_head = make_head(hyper["label_smoothing"])
        kwargs = {**step_kwargs, **{k: hyper[k] for k in ("l1", "l2") if k in hyper}}
        with contextlib.ExitStack() as stack:
            if "dropout_rate" in hyper:
                stack.enter_context(nn.intercept_methods(dropout_with_rate(hyper["dropout_rate"])))
            return steps.train_step(state, batch, model=model, head=member_head, tx=tx, **kwargs)

    group_step = jax.vmap(member_step)
    if not scan:
        return jax.jit(group_step, donate_argnums=0, compiler_options=_compiler_options())

    def group_steps(states, batches, hyper):
        return jax.lax.scan(lambda s, batch: group_step(s, batch, hyper), states, batches)

    return jax.jit(group_steps, donate_argnums=0, compiler_options=_compiler_options())


def make_group_eval(
    model: nn.Module, head: Head, **kwargs
) -> Callable[[TrainState, Batch], Metrics]:
    """``eval(states [M], batches [M, B, ...]) -> metric sums [M]``, jitted."""
    member_eval = functools.partial(steps.eval_step, model=model, head=head, **kwargs)
    return jax.jit(jax.vmap(member_eval), compiler_options=_compiler_options())


def _compiler_options() -> dict[str, str] | None:
    """`GROUP_COMPILER_OPTIONS` on the CPU backend (the option is XLA:CPU's), else None."""
    return GROUP_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
