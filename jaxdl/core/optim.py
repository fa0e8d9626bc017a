"""Optimizers and learning-rate schedules from config, as one optax chain.

The chain is built over the *trainable* tree only, so frozen leaves never get optimizer
state. Per-leaf learning-rate and weight-decay multipliers come from the partition plan
(`jaxdl.finetune.partition`) and are pure functions of the step, so resumed runs stay exact.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxdl.errors import UserError

Schedule = Callable[[jax.Array], jax.Array]
MultTree = Callable[[jax.Array], Any]  # step -> tree of per-leaf multipliers (or None)

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw", "rmsprop")
SCHEDULES = ("constant", "step", "exponential", "cosine", "warmup_cosine")


def make_schedule(
    opt_cfg: Mapping[str, Any], total_steps: int, *, lr: float | jax.Array | None = None
) -> Schedule:
    """Learning rate as a function of the optimizer step (``lr``: overrides the config's)."""
    lr = float(opt_cfg["learning_rate"]) if lr is None else lr
    name = opt_cfg["schedule"]
    decay_steps = int(opt_cfg["decay_steps"]) or max(total_steps, 1)
    warmup = int(opt_cfg["warmup_steps"])
    end = lr * float(opt_cfg["end_lr_fraction"])
    if name == "constant":
        schedule = optax.constant_schedule(lr)
    elif name == "step":
        every = int(opt_cfg["step_every"]) or max(decay_steps // 3, 1)
        schedule = optax.exponential_decay(
            lr, transition_steps=every, decay_rate=float(opt_cfg["decay_rate"]), staircase=True
        )
    elif name == "exponential":
        schedule = optax.exponential_decay(
            lr, transition_steps=decay_steps, decay_rate=float(opt_cfg["decay_rate"])
        )
    elif name == "cosine":
        schedule = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr)
    elif name == "warmup_cosine":
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, lr, warmup_steps=warmup, decay_steps=max(decay_steps, warmup + 1), end_value=end
        )
    else:
        raise UserError(f"optimizer.schedule: expected one of {list(SCHEDULES)}, found {name!r}.")
    if warmup and name != "warmup_cosine":
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), schedule], boundaries=[warmup]
        )
    return schedule


def _base_direction(opt_cfg: Mapping[str, Any]) -> optax.GradientTransformation:
    """The optimizer's update direction, before learning rate and sign."""
    name = opt_cfg["name"]
    if name == "sgd":
        return optax.identity()
    if name == "momentum":
        return optax.trace(decay=float(opt_cfg["momentum"]))
    if name in ("adam", "adamw"):
        return optax.scale_by_adam(
            b1=float(opt_cfg["b1"]), b2=float(opt_cfg["b2"]), eps=float(opt_cfg["eps"])
        )
    if name == "rmsprop":
        return optax.scale_by_rms(eps=float(opt_cfg["eps"]))
    raise UserError(f"optimizer.name: expected one of {list(OPTIMIZERS)}, found {name!r}.")


class ScaleByTreeState(NamedTuple):
    count: jax.Array


def scale_by_step_tree(mults: MultTree) -> optax.GradientTransformation:
    """Multiply each update leaf by ``mults(step)[leaf]`` (per-leaf lr multipliers)."""

    def init_fn(params):
        del params
        return ScaleByTreeState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        factors = mults(state.count)
        updates = jax.tree.map(lambda u, f: u * jnp.asarray(f, u.dtype), updates, factors)
        return updates, ScaleByTreeState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def add_weight_decay(rate: float, wd_mults: Any | None) -> optax.GradientTransformation:
    """Weight decay ``rate * wd_mult * param``; 1-D leaves (biases, norms) are not decayed."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params):
        assert params is not None, "weight decay needs params"
        mults = wd_mults if wd_mults is not None else jax.tree.map(lambda _: 1.0, params)
        updates = jax.tree.map(
            lambda u, p, m: u + rate * m * p if p.ndim > 1 else u, updates, params, mults
        )
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(
    opt_cfg: Mapping[str, Any],
    total_steps: int,
    *,
    lr_mults: MultTree | None = None,
    wd_mults: Any | None = None,
    values: Mapping[str, jax.Array] | None = None,
) -> optax.GradientTransformation:
    """clip -> direction -> weight decay -> lr schedule -> per-leaf lr multipliers.

    ``lr_mults(step)`` returns a tree shaped like the trainable params (the partition plan's
    learning-rate multipliers, zero while a leaf waits to be unfrozen); ``wd_mults`` is a
    static tree of weight-decay multipliers.

    ``values``: learning_rate, weight_decay or grad_clip_norm as (traced) arrays in place of
    the config's numbers, so one chain serves every member of a vmapped sweep
    (`jaxdl.core.vmapped`); the config still decides which transforms the chain holds.
    """
    values = values or {}
    number = lambda key: values[key] if key in values else float(opt_cfg[key])
    parts = []
    if float(opt_cfg["grad_clip_norm"]) > 0:
        parts.append(optax.clip_by_global_norm(number("grad_clip_norm")))
    parts.append(_base_direction(opt_cfg))
    decay = number("weight_decay")
    if float(opt_cfg["weight_decay"]) > 0:
        if opt_cfg["name"] != "adamw":
            # Coupled L2 (SGD-style): decay joins the gradient before the direction.
            parts.insert(len(parts) - 1, add_weight_decay(decay, wd_mults))
        else:
            parts.append(add_weight_decay(decay, wd_mults))
    schedule = make_schedule(opt_cfg, total_steps, lr=values.get("learning_rate"))
    parts.append(optax.scale_by_learning_rate(schedule))
    if lr_mults is not None:
        parts.append(scale_by_step_tree(lr_mults))
    # optimizer.accumulate_steps is the train step's own (`jaxdl.core.steps.train_step`): it
    # divides the summed gradients by the whole batch's weight, which MultiSteps cannot.
    return optax.chain(*parts)


def opt_state_slots(opt_cfg: Mapping[str, Any]) -> int:
    """Optimizer-state arrays kept per parameter (for memory reports)."""
    slots = {"sgd": 0, "momentum": 1, "adam": 2, "adamw": 2, "rmsprop": 1}[opt_cfg["name"]]
    return slots
