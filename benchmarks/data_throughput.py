"""Host input-pipeline throughput: examples/s of `Data.train_iter`, per source and workers.

    python benchmarks/data_throughput.py                       # small default matrix
    python benchmarks/data_throughput.py --workers 0 4 --steps 200 \
        --out benchmarks/results/data_throughput.json
    python benchmarks/data_throughput.py --smoke      # every case, a few tiny batches (CI)

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
    # The article's 5.2.1 input: JPEG files decoded, resized to 224, augmented, normalized.
    "jpeg folder 224+augment": {
        "source": "imagefolder:{jpeg_dir}",
        "image_size": 224,
        "train_transforms": ["random_flip", "random_rotation(10)"],
        "transforms": ["normalize(imagenet)"],
    },
}


def make_jpeg_folder(root: str, per_class: int = 160, side: int = 256) -> str:
    """Two classes of real-looking JPEGs: upscaled digits with noise, ``side`` pixels a side."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(0)
    for label in (0, 1):
        folder = os.path.join(root, str(label))  # class folders; val split off by fraction
        os.makedirs(folder, exist_ok=True)
        for k, i in enumerate(np.flatnonzero(digits.target == label)[:per_class]):
            small = (digits.images[i] * 15).astype(np.uint8)
            big = np.asarray(Image.fromarray(small).resize((side, side), Image.BILINEAR))
            rgb = np.stack([big] * 3, -1).astype(np.int16) + rng.integers(-20, 20, (side, side, 3))
            Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(
                os.path.join(folder, f"{k:03d}.jpg"), quality=90
            )
    return root


def loader_step_ratio(
    *, steps: int, data_dir: str, trials: int = 5, overrides: tuple[str, ...] = ()
) -> dict:
    """Digits CNN: step time fed by the real loader / step time on batches already on device.

    Loader and device-resident runs of `steps` steps alternate `trials` times (the ratio of
    each adjacent pair, then the median), so a load spike on this shared machine hits both.
    """
    import jax
    import numpy as np

    from jaxdl import config as config_lib
    from jaxdl.core import steps as steps_lib
    from jaxdl.data import build_data, prefetch_to_device
    from jaxdl.parallel import sharding as sharding_lib
    from jaxdl.training.build import build

    cfg = config_lib.load_config(
        "experiments/digits_cnn.py",
        [f"--config.data.data_dir={data_dir}", *(f"--config.{kv}" for kv in overrides)],
    )
    data = build_data(cfg.data, seed=0, num_classes=10)
    setup = build(  # on a mesh, as the trainer builds it
        cfg,
        kind=data.kind,
        example_spec=data.example_spec,
        num_classes=10,
        total_steps=steps,
        mesh=sharding_lib.make_mesh(cfg.mesh),
    )
    train_step = steps_lib.make_train_step(setup.model, setup.head, setup.tx)
    batch_size = cfg.data.batch_size

    def run(state, batches):
        state, m = train_step(state, next(batches))  # compile / warm up
        jax.block_until_ready(m)
        start = time.perf_counter()
        for _ in range(steps):
            state, m = train_step(state, next(batches))
        jax.block_until_ready(m)
        return state, (time.perf_counter() - start) / steps

    it = data.train_iter(batch_size, seed=0)
    sharding = setup.layout.batch  # as the trainer places batches
    on_device = [jax.device_put(next(it), sharding) for _ in range(steps + 1)]
    state, loader_times, device_times = setup.state, [], []
    for _ in range(trials):
        state, device_s = run(state, iter(on_device))
        loader = prefetch_to_device(data.train_iter(batch_size, seed=0), sharding=sharding)
        state, loader_s = run(state, loader)
        loader.close()
        device_times.append(device_s)
        loader_times.append(loader_s)
    pairs = np.array(loader_times) / np.array(device_times)
    return {
        "loader_step_ms": 1e3 * float(np.median(loader_times)),
        "device_step_ms": 1e3 * float(np.median(device_times)),
        "ratio": float(np.median(pairs)),
        "pair_ratios": [round(float(r), 3) for r in pairs],
        "trials": trials,
        "steps_per_trial": steps,
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--ratio-steps", type=int, default=200)
    parser.add_argument(
        "--ratio-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for the ratio's run, e.g. data.cache_mb=0 (repeatable)",
    )
    parser.add_argument("--device", action="store_true", help="include prefetch_to_device")
    parser.add_argument("--data-dir", default=None, help="TFDS folder (default: a temp dir)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument(
        "--smoke", action="store_true", help="batch 8, 2 steps, 0 workers, small JPEGs (CI)"
    )
    args = parser.parse_args(argv)
    trials, jpegs = 5, {}
    if args.smoke:
        args.batch_size, args.steps, args.warmup, args.workers = 8, 2, 1, [0]
        args.ratio_steps, trials, jpegs = 2, 1, {"per_class": 8, "side": 32}

    data_dir = args.data_dir or tempfile.mkdtemp(prefix="jaxdl-bench-")
    jpeg_dir = make_jpeg_folder(tempfile.mkdtemp(prefix="jaxdl-jpeg-"), **jpegs)
    rows = []
    for name in args.cases:
        for workers in args.workers:
            cfg = {"data_dir": data_dir, **CASES[name]}
            cfg["source"] = cfg["source"].format(jpeg_dir=jpeg_dir)
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
    ratio = loader_step_ratio(
        steps=args.ratio_steps, data_dir=data_dir, trials=trials, overrides=tuple(args.ratio_set)
    )
    ratio["overrides"] = list(args.ratio_set)
    print(
        f"digits CNN step: {ratio['loader_step_ms']:.2f} ms fed by the loader, "
        f"{ratio['device_step_ms']:.2f} ms on device-resident batches: ratio {ratio['ratio']:.3f} "
        f"(median of {ratio['pair_ratios']})"
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
            json.dump({"meta": meta, "results": rows, "loader_step_ratio": ratio}, f, indent=2)


if __name__ == "__main__":
    main()
