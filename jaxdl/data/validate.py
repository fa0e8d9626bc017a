"""Host-side checks of a batch against the data's example spec (run once per split)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from jaxdl.errors import UserError

# Integer fields whose values index classes or a vocabulary: [0, num_classes).
_INDEX_FIELDS = ("label", "inputs", "targets")


def validate_batch(
    batch: Mapping[str, np.ndarray],
    example_spec: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    num_classes: int,
    *,
    split: str,
) -> None:
    """Raise ValueError naming the field, expected and found, on the first problem.

    Checks: every spec field present; shape [B, *spec shape] with one B; dtype; no NaN/Inf
    in float fields; label/token ids in [0, num_classes); "mask" (eval) float32 [B].
    """
    missing = sorted(set(example_spec) - set(batch))
    if missing:
        raise UserError(
            f"data: batch ({split}) lacks fields {missing}; it has "
            f"{sorted(batch)}. Fix: check the data source and transforms."
        )
    sizes = set()
    for key, (shape, dtype) in example_spec.items():
        x = np.asarray(batch[key])
        if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != tuple(shape):
            raise UserError(
                f"data: batch {key!r} ({split}) has shape {tuple(x.shape)}, "
                f"expected [B, {', '.join(map(str, shape))}]. Fix: check "
                "data.image_size / data.transforms / data.seq_len."
            )
        if x.dtype != np.dtype(dtype):
            raise UserError(
                f"data: batch {key!r} ({split}) has dtype {x.dtype}, expected {np.dtype(dtype)}."
            )
        sizes.add(x.shape[0])
        if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
            bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
            raise UserError(
                f"data: batch {key!r} ({split}) holds {bad} NaN/Inf values. Fix: "
                "check the source files and normalize(std=...) for zeros."
            )
        if key in _INDEX_FIELDS and np.issubdtype(x.dtype, np.integer) and x.size:
            lo, hi = int(x.min()), int(x.max())
            if lo < 0 or hi >= num_classes:
                bad = int(np.count_nonzero((x < 0) | (x >= num_classes)))
                fix = (
                    f"set model.num_classes to at least {hi + 1} or fix the labels"
                    if key == "label"
                    else "use a vocabulary that covers every token id"
                )
                raise UserError(
                    f"data: batch {key!r} ({split}) holds {bad} values outside "
                    f"[0, {num_classes}): found min {lo} max {hi}. Fix: {fix}."
                )
    if "mask" in batch:
        mask = np.asarray(batch["mask"])
        if mask.dtype != np.float32 or mask.ndim != 1:
            raise UserError(
                f"data: batch 'mask' ({split}) has dtype {mask.dtype} shape "
                f"{mask.shape}, expected float32 [B]."
            )
        sizes.add(mask.shape[0])
    if len(sizes) > 1:
        raise UserError(
            f"data: batch fields ({split}) disagree on the batch size: {sorted(sizes)}."
        )
