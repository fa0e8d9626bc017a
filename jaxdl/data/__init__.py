"""jaxdl's input pipeline: sources -> grain transforms -> host batches -> device.

data = build_data(cfg.data, seed=cfg.seed, num_classes=cfg.model.num_classes)
batches = prefetch_to_device(data.train_iter(32, seed=cfg.seed))
for batch in data.eval_iter("val", 256): ...   # padded, with batch["mask"]
"""

from jaxdl.data.loader import DevicePrefetcher, TrainIterator, prefetch_to_device
from jaxdl.data.pipeline import Data, build_data
from jaxdl.data.sources import VALID_SOURCES
from jaxdl.data.transforms import parse_transform, parse_transforms
from jaxdl.data.validate import validate_batch

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
