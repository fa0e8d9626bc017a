"""jaxdl's input pipeline: sources -> grain transforms -> host batches -> device.

data = build_data(cfg.data, seed=cfg.seed, num_classes=cfg.model.num_classes)
batches = prefetch_to_device(data.train_iter(32, seed=cfg.seed))
for batch in data.eval_iter("val", 256): ...   # padded, with batch["mask"]

Names load lazily: serving code that decodes an image file with `jaxdl.data.records` or
`jaxdl.data.transforms` does not import grain or TFDS.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "VALID_SOURCES": "jaxdl.data.sources",
    "Data": "jaxdl.data.pipeline",
    "DevicePrefetcher": "jaxdl.data.loader",
    "TrainIterator": "jaxdl.data.loader",
    "build_data": "jaxdl.data.pipeline",
    "parse_transform": "jaxdl.data.transforms",
    "parse_transforms": "jaxdl.data.transforms",
    "prefetch_to_device": "jaxdl.data.loader",
    "validate_batch": "jaxdl.data.validate",
}

__all__ = [
    "VALID_SOURCES",
    "Data",
    "DevicePrefetcher",
    "TrainIterator",
    "build_data",
    "parse_transform",
    "parse_transforms",
    "prefetch_to_device",
    "validate_batch",
]

if TYPE_CHECKING:
    from jaxdl.data.loader import DevicePrefetcher, TrainIterator, prefetch_to_device
    from jaxdl.data.pipeline import Data, build_data
    from jaxdl.data.sources import VALID_SOURCES
    from jaxdl.data.transforms import parse_transform, parse_transforms
    from jaxdl.data.validate import validate_batch


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jaxdl.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
