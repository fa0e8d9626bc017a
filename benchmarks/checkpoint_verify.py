"""What verifying a checkpoint's digest costs next to restoring it, for a gpt2-124m state.

    python benchmarks/checkpoint_verify.py                       # gpt2-124m + AdamW moments
    python benchmarks/checkpoint_verify.py --size small --trials 5 --out /tmp/v.json
    python benchmarks/checkpoint_verify.py --smoke        # the tiny transformer, one trial (CI)

Saves one TrainState (the transformer's params and AdamW's two moments, all filled with
random values so nothing compresses away) with `jaxdl.checkpoint.manager.Checkpointer`,
then times, per trial: `verify_step` alone (crc32 of every file, what every restore does
first) and `Checkpointer.restore` (verification included). The figure to watch is
verify / (restore - verify): the share verification adds to Orbax's own restore.
Both run with the files in the page cache (the second trial on), the case where hashing
is not hidden behind the disk.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `jaxdl` importable from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdl.checkpoint.integrity import verify_step
from jaxdl.checkpoint.manager import Checkpointer
from jaxdl.core.state import TrainState
from jaxdl.models.registry import create_model


def random_state(size: str) -> TrainState:
    import jaxdl.models  # noqa: F401  (registers the transformer)

    model = create_model({"name": "transformer", "size": size})
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
    rng = np.random.default_rng(0)

    def fill(s):
        return jnp.asarray(rng.standard_normal(s.shape, np.float32))

    params = jax.tree.map(fill, shapes)
    state = TrainState.create(params, optax.adamw(1e-3), jax.random.PRNGKey(0))
    # Real moments after training are dense: random ones store as many bytes.
    return state.replace(
        opt_state=jax.tree.map(lambda x: fill(x) if x.ndim else x, state.opt_state)
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="gpt2-124m", help="transformer size")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--smoke", action="store_true", help="--size tiny --trials 1 (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.trials = "tiny", 1

    state = random_state(args.size)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    with tempfile.TemporaryDirectory() as workdir:
        with Checkpointer(workdir) as ckpt:
            ckpt.save(1, state, data_state=None, config={})
        step_dir = Path(workdir) / "checkpoints" / "1"
        nbytes = sum(p.stat().st_size for p in step_dir.rglob("*") if p.is_file())
        verify_s, restore_s = [], []
        for _ in range(args.trials):
            t = time.perf_counter()
            verify_step(step_dir)
            verify_s.append(time.perf_counter() - t)
            with Checkpointer(workdir) as ckpt:
                t = time.perf_counter()
                restored, _ = ckpt.restore(state)
                jax.block_until_ready(restored)
                restore_s.append(time.perf_counter() - t)
    verify, restore = statistics.median(verify_s), statistics.median(restore_s)
    result = {
        "size": args.size,
        "params": n_params,
        "checkpoint_bytes": nbytes,
        "verify_s": verify,
        "restore_s_with_verify": restore,
        "verify_share_of_orbax_restore": verify / (restore - verify),
        "verify_gb_per_s": nbytes / verify / 1e9,
        "trials": args.trials,
        "cpus": os.cpu_count(),
        "backend": jax.default_backend(),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
