"""Host input-pipeline throughput: examples/s of `Data.train_iter`, per source and workers.

    python benchmarks/data_throughput.py                       # small default matrix
    python benchmarks/data_throughput.py --workers 0 4 --steps 200 \
        --out benchmarks/results/data_throughput.json

Each case builds the data, discards `--warmup` batches (worker start-up, file cache), then
times `--steps` batches. `--device` also wraps the iterator in `prefetch_to_device`, so the
figure includes the host-to-device copy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

CASES = {
    "digits": {"source": "digits"},
    "digits+augment": {
        "source": "digits",
        "train_transforms": ["random_rotation(10)", "random_flip"],
    },
    "synthetic:images 64x64x3+augment": {
        "source": "synthetic:images",
        "shape": [64, 64, 3],
        "num_examples": 4096,
        "train_transforms": ["random_resized_crop(56)", "random_flip"],
        "transforms": ["resize(56)", "normalize(imagenet)"],
    },
    "text:pydoc seq 256": {"source": "text:pydoc", "seq_len": 256},
}


def measure(
    cfg: dict, *, batch_size: int, steps: int, warmup: int, workers: int, device: bool
) -> dict:
    from jaxdl.data import build_data, prefetch_to_device

    data = build_data(cfg, seed=0, num_classes=None)
    it = data.train_iter(batch_size, seed=0, num_workers=workers)
    batches = prefetch_to_device(it) if device else it
    for _ in range(warmup):
        next(batches)
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(batches)
    if device:
        import jax

        jax.block_until_ready(batch)
    seconds = time.perf_counter() - start
    batches.close()
    return {"examples_per_s": steps * batch_size / seconds, "ms_per_batch": 1e3 * seconds / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 2])
    parser.add_argument("--device", action="store_true", help="include prefetch_to_device")
    parser.add_argument("--data-dir", default=None, help="TFDS folder (default: a temp dir)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    data_dir = args.data_dir or tempfile.mkdtemp(prefix="jaxdl-bench-")
    rows = []
    for name in args.cases:
        for workers in args.workers:
            cfg = {"data_dir": data_dir, **CASES[name]}
            result = measure(
                cfg,
                batch_size=args.batch_size,
                steps=args.steps,
                warmup=args.warmup,
                workers=workers,
                device=args.device,
            )
            rows.append({"case": name, "workers": workers, **result})
            print(
                f"{name:36s} workers={workers}  {result['examples_per_s']:>10.0f} ex/s  "
                f"{result['ms_per_batch']:7.2f} ms/batch",
                flush=True,
            )
    if args.out:
        meta = {
            "batch_size": args.batch_size,
            "steps": args.steps,
            "device": args.device,
            "machine": platform.platform(),
            "cpus": os.cpu_count(),
        }
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
