"""TrainState: everything a training step reads and writes, and nothing else.

Arrays only, so Orbax saves exactly this and `jax.jit` can donate it. The model's
"params" collection is split by the partition plan into ``params`` (trainable, the only
part differentiated and given optimizer state) and ``frozen``. Both trees are keyed by
the same paths as the model variables, e.g. ``{"params": {"Dense_0": {"kernel": ...}}}``;
LoRA adapters live in ``params["lora"]`` (see `jaxdl.finetune.lora`).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

Params = Any  # nested dict of arrays


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Params  # trainable leaves: {"params": {...}} and optionally {"lora": {...}}
    frozen: Params  # non-trainable leaves of the model params: {"params": {...}} or {}
    model_state: Params  # mutable collections, e.g. {"batch_stats": {...}} or {}
    opt_state: optax.OptState  # over `params` only
    rng: jax.Array  # base key; each step folds in `step`

    @classmethod
    def create(
        cls,
        params: Params,
        tx: optax.GradientTransformation,
        rng: jax.Array,
        *,
        frozen: Params | None = None,
        model_state: Params | None = None,
    ) -> TrainState:
        """Step 0: the optimizer state is `tx.init(params)` (trainable leaves only)."""
        return cls(
            step=jnp.zeros([], jnp.int32),
            params=params,
            frozen=frozen or {},
            model_state=model_state or {},
            opt_state=tx.init(params),
            rng=rng,
        )
