"""Host-side check of a split's batch against the data's example spec (once per split).

The rules live in `jaxdl.core.batch.check_batch` (the steps use them too); this adds what
only the data layer knows: the values are on the host, and the fixes name data config keys.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from jaxdl.core.batch import BatchSpec, Fixes, check_batch

_DATA_FIXES = Fixes(
    fields="check the data source and transforms",
    shape="check data.image_size / data.transforms / data.seq_len",
    dtype="check the data source and data.transforms",
    finite="check the source files and normalize(std=...) for zeros",
)


def validate_batch(
    batch: Mapping[str, np.ndarray], example_spec: BatchSpec, num_classes: int, *, split: str
) -> None:
    """Raise UserError naming the field, expected and found, on the first problem.

    Shapes, dtypes and batch sizes as the steps check them, plus the values: no NaN/Inf in
    float fields, label/token ids in [0, num_classes); "mask" (eval) float32 [B].
    """
    check_batch(
        batch,
        example_spec,
        where=split,
        prefix="data: ",
        fixes=_DATA_FIXES,
        num_classes=num_classes,
    )
