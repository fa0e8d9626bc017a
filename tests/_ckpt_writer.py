"""Child process for the kill test: save a TrainState every iteration until killed.

Usage: python tests/_ckpt_writer.py WORKDIR. Runs on 2 fake CPU devices with the kernel
sharded over them, so the parent (1 device) also checks restore across device counts.
Every leaf of the state at step s is a known function of s (see `expected_kernel`).
Prints "ready" once the first step is on disk, then keeps saving (async) for at most 60 s.
"""

import os
import sys
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from jaxdl.checkpoint.manager import Checkpointer  # noqa: E402
from jaxdl.core.state import TrainState  # noqa: E402

SHAPE = (512, 256)  # 512 KiB of float32 per leaf: a save takes long enough to be hit


def expected_kernel(step: int) -> np.ndarray:
    return np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) + step


def main(workdir: str) -> None:
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded = NamedSharding(mesh, PartitionSpec("data"))
    ckpt = Checkpointer(workdir, max_to_keep=2)
    start = time.time()
    step = 0
    while time.time() - start < 60:
        step += 1
        kernel = jax.device_put(expected_kernel(step), sharded)
        state = TrainState(
            step=jnp.int32(step),
            params={"params": {"dense": {"kernel": kernel}}},
            frozen={"params": {"embed": {"embedding": jnp.full((64, 8), step, jnp.float32)}}},
            model_state={},
            opt_state={"mu": kernel * 2},
            rng=jax.random.PRNGKey(step),
        )
        ckpt.save(step, state, data_state={"step": step}, config={"seed": 0})
        if step == 1:
            ckpt.wait()
            print("ready", flush=True)
    ckpt.close()


if __name__ == "__main__":
    main(sys.argv[1])
