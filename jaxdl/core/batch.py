"""The one check of a batch against the example spec a model was built for.

Two callers, one set of rules: the jitted steps check every call's shapes and dtypes
(research code feeding them directly), and the data layer checks each split's first host
batch, values included, with hints in the data config's words (`jaxdl.data.validate`).
Without it a wrong shape fails deep inside Flax or, worse, silently retraces the step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxdl.errors import UserError

BatchSpec = Mapping[str, tuple[tuple[int, ...], Any]]  # key -> (per-example shape, dtype)

# Integer fields whose values index classes or a vocabulary: [0, num_classes).
INDEX_FIELDS = ("label", "inputs", "targets")


@dataclasses.dataclass(frozen=True)
class Fixes:
    """The "Fix: ..." a caller gives for each kind of problem, in its user's words."""

    fields: str = "feed batches from the same data config"
    shape: str = "resize the inputs or rebuild the model for this shape"
    dtype: str = "cast the inputs in the data pipeline"
    finite: str = "remove or impute the NaN/Inf values before the step"


def _expected(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(["B", *map(str, shape)]) + "]"


def check_batch(
    batch: Mapping[str, Any],
    spec: BatchSpec,
    *,
    where: str,
    prefix: str = "",
    fixes: Fixes = Fixes(),
    num_classes: int | None = None,
) -> None:
    """Raise UserError naming the field, expected and found, on the first problem.

    Checks: every spec field present; each field [B, *spec shape] with one B across fields
    (an eval "mask" float32 [B] included); dtype as in the spec. Reads only shapes and
    dtypes, so any arrays (device, sharded, ShapeDtypeStruct) are cheap to check. With
    ``num_classes`` (host arrays) the values too: float fields finite, label/token ids in
    [0, num_classes). ``where`` (e.g. the split) and ``prefix`` (e.g. "data: ") name the
    batch in messages.
    """
    missing = sorted(set(spec) - set(batch))
    if missing:
        raise UserError(
            f"{prefix}batch ({where}) lacks fields {missing}; it has {sorted(batch)} (the "
            f"model was built for {sorted(spec)}). Fix: {fixes.fields}."
        )
    sizes = set()
    for key, (shape, dtype) in spec.items():
        x = batch[key]
        name = f"{prefix}batch {key!r} ({where})"
        if len(x.shape) != len(shape) + 1 or tuple(x.shape[1:]) != tuple(shape):
            raise UserError(
                f"{name} has shape {tuple(x.shape)}, expected {_expected(shape)}. "
                f"Fix: {fixes.shape}."
            )
        if jnp.dtype(x.dtype) != jnp.dtype(dtype):
            raise UserError(
                f"{name} has dtype {x.dtype}, expected {jnp.dtype(dtype)}. Fix: {fixes.dtype}."
            )
        sizes.add(x.shape[0])
        if num_classes is not None:
            _check_values(np.asarray(x), key, name, num_classes, fixes)
    if "mask" in batch:
        mask = batch["mask"]
        if jnp.dtype(mask.dtype) != jnp.float32 or len(mask.shape) != 1:
            raise UserError(
                f"{prefix}batch 'mask' ({where}) has dtype {mask.dtype} shape "
                f"{tuple(mask.shape)}, expected float32 [B]. Fix: a mask of 1.0 (real "
                "example) or 0.0 (padding) per row."
            )
        sizes.add(mask.shape[0])
    if len(sizes) > 1:
        raise UserError(
            f"{prefix}batch fields ({where}) disagree on the batch size: {sorted(sizes)}. "
            "Fix: give every field the same first dimension."
        )


def _check_values(x: np.ndarray, key: str, name: str, num_classes: int, fixes: Fixes) -> None:
    if jnp.issubdtype(x.dtype, jnp.floating) and not np.all(np.isfinite(x)):
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        raise UserError(f"{name} holds {bad} NaN/Inf values. Fix: {fixes.finite}.")
    if key in INDEX_FIELDS and jnp.issubdtype(x.dtype, jnp.integer) and x.size:
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi >= num_classes:
            bad = int(np.count_nonzero((x < 0) | (x >= num_classes)))
            fix = (
                f"set model.num_classes to at least {hi + 1} or fix the labels"
                if key == "label"
                else "use a vocabulary that covers every token id"
            )
            raise UserError(
                f"{name} holds {bad} values outside [0, {num_classes}): found min {lo} "
                f"max {hi}. Fix: {fix}."
            )
