"""Meshes, sharding rules and the multi-process start: how a run spreads over devices and hosts.

One mesh with three named axes, from the ``mesh`` config key::

    mesh = {"data": -1, "fsdp": 1, "tensor": 1}     # -1: the devices the others leave

- ``data``: batch rows are split over it, parameters are replicated (data parallel).
- ``fsdp``: batch rows are split over it too, and every parameter (with its optimizer
  state) is split along its largest divisible dimension (ZeRO-3 / fully sharded).
- ``tensor``: the transformer's projections are split over it (Megatron-style), so the
  matmuls of one layer run on several devices; the batch is replicated over it.

Parameters are placed by regex rules over their "/"-joined paths (`jaxdl.core.tree`); the
optimizer state follows its parameter because optax state trees mirror the parameter tree,
so the same path suffix matches (``opt_state/0/mu/params/block_0/attn/query/kernel``).
Scalars (step counts) are replicated. `jax.jit` then partitions the steps (GSPMD): there is
no pmap and no hand-written collective.

``data.batch_size`` is the GLOBAL batch: each of P processes loads batch_size / P rows,
and the rows are split over the data x fsdp devices. So one config trains the same model
on 1 device, 8 devices or 4 hosts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import os
import re
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdl.core.tree import path_str
from jaxdl.errors import UserError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # batch rows are split over both; tensor devices share rows
# Smaller leaves stay replicated: gathering them costs more latency than they save memory.
FSDP_MIN_SIZE = 2**10

Rule = tuple[str, tuple[str | None, ...]]  # (regex over the path, spec of the trailing dims)


def transformer_rules() -> list[Rule]:
    """Tensor parallelism for `jaxdl.models.transformer` (also scanned: specs align right).

    Column-parallel in (query/key/value, fc1, gate: split the output dim) and row-parallel
    out (attn out, fc2: split the input dim), so each block needs one all-reduce per half.
    """
    column = r"(attn/(query|key|value)|mlp/(fc1|gate))"
    row = r"(attn/out|mlp/fc2)"
    return [
        (rf"{column}/kernel$", (None, "tensor")),  # [D, H]
        (rf"{column}/bias$", ("tensor",)),  # [H]
        (rf"{row}/kernel$", ("tensor", None)),  # [H, D]
    ]


def default_rules() -> list[Rule]:
    """The rules `jaxdl train` uses; a leaf no rule names gets FSDP (or replication)."""
    return transformer_rules()


# ---- the mesh ------------------------------------------------------------------------------


def _plain(mesh_cfg: Any) -> dict[str, Any]:
    if mesh_cfg is None:
        return {"data": -1}
    return mesh_cfg.to_dict() if hasattr(mesh_cfg, "to_dict") else dict(mesh_cfg)


def mesh_shape(
    mesh_cfg: Mapping[str, int] | None, num_devices: int, *, local_devices: int | None = None
) -> dict[str, int]:
    """The ``mesh`` config -> {"data": d, "fsdp": f, "tensor": t} with d * f * t = num_devices.

    ``local_devices`` (devices per process) must be a multiple of ``tensor``: tensor
    parallelism communicates every layer, so it stays inside one host.
    """
    cfg = _plain(mesh_cfg)
    if unknown := sorted(set(cfg) - set(AXES)):
        raise UserError(
            f"mesh: expected axes {list(AXES)}, found unknown {unknown}. "
            'Fix: e.g. mesh={"data": -1, "fsdp": 1, "tensor": 1}.'
        )
    sizes = {axis: cfg.get(axis, 1) for axis in AXES}
    for axis, size in sizes.items():
        if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
            raise UserError(
                f"mesh.{axis}: expected a positive int or -1 (the devices left over), found "
                f"{size!r}. Fix: e.g. mesh.{axis}=1."
            )
    free = [axis for axis, size in sizes.items() if size == -1]
    fixed = math.prod(size for size in sizes.values() if size != -1)
    product = " x ".join(f"{a} {s}" for a, s in sizes.items() if s != -1)
    if len(free) > 1:
        raise UserError(
            f"mesh: at most one axis may be -1, found -1 for {free}. "
            f"Fix: give all but one of them a size ({num_devices} devices in all)."
        )
    if free:
        if num_devices % fixed:
            raise UserError(
                f"mesh.{free[0]}: -1 takes the devices the other axes leave, but {num_devices} "
                f"devices are not divisible by {product} = {fixed}. Fix: make the other axes "
                f"divide {num_devices}."
            )
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise UserError(
            f"mesh: the axes multiply to {product} = {fixed} devices, found {num_devices}. "
            f"Fix: make the product {num_devices}, or set one axis to -1 to take the rest."
        )
    if local_devices is not None and local_devices % sizes["tensor"]:
        raise UserError(
            f"mesh.tensor: expected a divisor of the {local_devices} devices per process "
            f"(tensor parallelism stays within a host), found {sizes['tensor']}. Fix: lower "
            "mesh.tensor and use mesh.fsdp across hosts."
        )
    return sizes


def make_mesh(mesh_cfg: Mapping[str, int] | None, devices: Sequence[Any] | None = None) -> Mesh:
    """A `Mesh` with axes (data, fsdp, tensor) over ``devices`` (default: all of them).

    ``jax.make_mesh`` orders the devices for the interconnect (tensor innermost, so it is
    the fastest link); devices are grouped by process, so each process holds whole rows.
    """
    devices = list(jax.devices() if devices is None else devices)
    local = len([d for d in devices if d.process_index == jax.process_index()])
    sizes = mesh_shape(mesh_cfg, len(devices), local_devices=local)
    shape = tuple(sizes[a] for a in AXES)
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def axis_sizes(mesh: Mesh) -> dict[str, int]:
    return {name: int(size) for name, size in mesh.shape.items()}


# ---- parameter placement -------------------------------------------------------------------


def partition_spec(
    path: str,
    shape: Sequence[int],
    sizes: Mapping[str, int],
    rules: Sequence[Rule] = (),
    *,
    min_size: int = FSDP_MIN_SIZE,
) -> P:
    """The `PartitionSpec` of one leaf.

    The first rule whose regex ``re.search``es ``path`` names mesh axes for the trailing
    dims (so a stacked [L, D, H] leaf takes a [D, H] rule). Then, with fsdp > 1 and at least
    ``min_size`` elements, the largest dim still free and divisible by fsdp goes on "fsdp".
    Axes of size 1 are dropped, so the spec says what is really split.
    """
    spec: list[Any] = [None] * len(shape)
    for regex, template in rules:
        if not re.search(regex, path):
            continue
        if len(template) > len(shape):
            raise UserError(
                f"sharding rule {regex!r}: names {len(template)} dims, but {path} has shape "
                f"{tuple(shape)}. Fix: anchor the rule to leaves of that rank."
            )
        offset = len(shape) - len(template)
        for i, axis in enumerate(template):
            if axis is None or sizes.get(axis, 1) == 1:
                continue
            dim = shape[offset + i]
            if dim % sizes[axis]:
                raise UserError(
                    f"mesh.{axis}: {path} has shape {tuple(shape)}, its dim {offset + i} "
                    f"({dim}) is not divisible by the {axis} axis ({sizes[axis]}). Fix: "
                    f"choose a mesh.{axis} that divides {dim}."
                )
            spec[offset + i] = axis
        break
    fsdp = sizes.get("fsdp", 1)
    if fsdp > 1 and math.prod(shape) >= min_size:
        free = [d for d in range(len(shape)) if spec[d] is None and shape[d] % fsdp == 0]
        if free:
            spec[max(free, key=lambda d: (shape[d], -d))] = "fsdp"
    return P(*spec)


def tree_specs(
    tree: Any, sizes: Mapping[str, int], rules: Sequence[Rule] | None = None, **kwargs
) -> Any:
    """`partition_spec` of every leaf (arrays or ShapeDtypeStructs), same tree structure."""
    rules = default_rules() if rules is None else rules
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: partition_spec(path_str(kp), np.shape(x), sizes, rules, **kwargs), tree
    )


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[Rule] | None = None, **kwargs) -> Any:
    """A `NamedSharding` per leaf of ``tree`` on ``mesh``."""
    specs = tree_specs(tree, axis_sizes(mesh), rules, **kwargs)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a run's arrays live: the state leaf by leaf, batches by rows."""

    mesh: Mesh
    state: Any  # NamedSharding per TrainState leaf

    @property
    def batch(self) -> NamedSharding:
        """Leading (row) dim over data x fsdp; the rest whole."""
        return NamedSharding(self.mesh, P(BATCH_AXES))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def gather(self) -> dict[str, Any] | None:
        """{"params", "frozen"}: the weights' shardings without "fsdp", i.e. whole where a
        step uses them (None without FSDP). Constraining the weights so makes XLA
        all-gather them, rather than reshard activations around a split weight (which,
        for GPT-2's 50,257-token output layer, all-reduces the full [B, T, V] logits)."""
        if axis_sizes(self.mesh)["fsdp"] == 1:
            return None

        def whole(sharding: NamedSharding) -> NamedSharding:
            spec = [None if axis == "fsdp" else axis for axis in sharding.spec]
            return NamedSharding(self.mesh, P(*spec))

        return {
            part: jax.tree.map(whole, getattr(self.state, part)) for part in ("params", "frozen")
        }


def make_layout(abstract_state: Any, mesh: Mesh, rules: Sequence[Rule] | None = None) -> Layout:
    """The `Layout` of a state (arrays or `jax.eval_shape` output) on ``mesh``."""
    return Layout(mesh=mesh, state=tree_shardings(abstract_state, mesh, rules))


def place(tree: Any, shardings: Any) -> Any:
    """Host (or single-device) arrays -> global arrays with ``shardings``.

    Every process passes the whole value and keeps the slices its devices hold, which
    works for one process and for many (`jax.device_put` cannot target other hosts).
    """

    def put(x, sharding):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree, shardings)


def create_state(
    init_fn: Callable[..., Any],
    host_args: Sequence[Any],
    mesh: Mesh,
    rules: Sequence[Rule] | None = None,
) -> tuple[Any, Layout]:
    """Run ``init_fn(*host_args) -> TrainState`` under jit so each leaf is born on its shard.

    The arguments (host trees of parameters) are placed with the same rules first, and
    optimizer state is created already sharded: no device ever holds the whole state.
    """
    abstract = jax.eval_shape(init_fn, *host_args)
    layout = make_layout(abstract, mesh, rules)
    args = [place(arg, tree_shardings(arg, mesh, rules)) for arg in host_args]
    init = jax.jit(init_fn, out_shardings=layout.state, donate_argnums=tuple(range(len(args))))
    return init(*args), layout


# ---- batches and host views ----------------------------------------------------------------


def per_process_batch(
    batch_size: int, mesh: Mesh, *, field: str = "data.batch_size", process_count: int | None = None
) -> int:
    """The rows each process loads for a global ``batch_size``, after checking it splits."""
    count = jax.process_count() if process_count is None else process_count
    sizes = axis_sizes(mesh)
    shards = sizes["data"] * sizes["fsdp"]
    if batch_size % shards:
        raise UserError(
            f"{field}: expected a multiple of mesh data x fsdp = {sizes['data']} x "
            f"{sizes['fsdp']} = {shards} (the global batch is split over them), found "
            f"{batch_size}. Fix: set {field} to a multiple of {shards}, e.g. "
            f"{max(shards, batch_size // shards * shards)}."
        )
    if batch_size % count:
        raise UserError(
            f"{field}: expected a multiple of the {count} processes (it is the global batch; "
            f"each loads an equal part), found {batch_size}. Fix: set {field} to a "
            f"multiple of {count}."
        )
    return batch_size // count


def put_batch(batch: Mapping[str, Any], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's rows -> global arrays (rows of all processes, in process order)."""
    if jax.process_count() > 1:
        return {
            k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()
        }
    return jax.device_put(dict(batch), sharding)


def on_mesh(batches, sharding: NamedSharding | None):
    """Yield ``batches`` placed with ``sharding`` (unchanged when it is None)."""
    for batch in batches:
        yield batch if sharding is None else put_batch(batch, sharding)


def fetch(tree: Any) -> Any:
    """Every leaf as a numpy array of its global value, on every process."""
    from jax.experimental import multihost_utils

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(get, tree)


def host_local(tree: Any) -> Any:
    """The rows of each (batch) leaf that this process's devices hold, as numpy."""

    def rows(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(x)
        shards = {s.index[0].start or 0: s.data for s in x.addressable_shards}
        return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])

    return jax.tree.map(rows, tree)


def local_data_state(state: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A saved train-iterator state for THIS process.

    Process 0 writes the checkpoint's data state; the others resume the same step of their
    own shard. A different process count is left as saved so the iterator refuses it.
    """
    if state is None or "shard" not in state:
        return None if state is None else dict(state)
    count = jax.process_count()
    if int(state["shard"][1]) != count:
        return dict(state)
    return {**state, "shard": [jax.process_index(), count]}


# ---- multi-process start -------------------------------------------------------------------


def detected_cluster(environ: Mapping[str, str] | None = None) -> str | None:
    """ "SLURM" / "Open MPI" when this process is one task of a multi-task job, else None.

    The same variables `jax.distributed.initialize()` reads to fill in its arguments; a
    one-task job is not a cluster (it needs no coordinator).
    """
    env = os.environ if environ is None else environ
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID")
    if all(k in env for k in slurm) and int(env["SLURM_NTASKS"]) > 1:
        return "SLURM"
    if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    return None


# XLA's CPU client sizes its thread pools to the machine's cores. A CPU collective (gloo)
# blocks its pool thread until every participant arrives; with 2 local devices on a 2-core
# machine both threads can be held while the work they wait for is queued behind them: we
# saw both processes of a 2-process run hang in evaluation that way.
MIN_CPU_THREADS = 8


@contextlib.contextmanager
def _cpu_thread_pools(at_least: int):
    """Within: XLA's CPU client (when made) gets at least `at_least` pool threads, unless the
    user sized them (PJRT_NPROC / NPROC, which XLA reads once, when it makes the client)."""
    if "PJRT_NPROC" in os.environ or "NPROC" in os.environ:
        yield
        return
    os.environ["PJRT_NPROC"] = str(max(os.cpu_count() or 1, at_least))
    try:
        yield
    finally:
        del os.environ["PJRT_NPROC"]


def check_port_free(port: int) -> None:
    """Refuse a coordinator port that process 0 cannot listen on.

    jax.distributed binds the coordination service to `[::]:PORT` (all interfaces); when
    that fails, gRPC logs one line and the process crashes (SIGSEGV) while the others wait.
    """
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does
                s.bind((host, port))
            return
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                raise UserError(
                    f"--coordinator: process 0 listens on port {port}, found it unavailable "
                    f"on this host ({e.strerror}). Fix: pick a free port and pass it to every "
                    "process."
                ) from None
            # No IPv6 on this host: the IPv4 wildcard is what gRPC falls back to.


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> bool:
    """Start `jax.distributed` when asked (flags) or inside a SLURM / Open MPI job.

    Must run before anything touches devices. Returns whether it started. With no flags
    and no cluster, nothing happens: one process drives all local devices. CPU collectives
    across processes use gloo.
    """
    flags = {
        "--coordinator": coordinator,
        "--num-processes": num_processes,
        "--process-id": process_id,
    }
    given = {k: v for k, v in flags.items() if v is not None}
    cluster = detected_cluster(environ)
    if not given and cluster is None:
        return False
    if cluster is None and len(given) < len(flags):
        missing = [k for k in flags if k not in given]
        raise UserError(
            f"{', '.join(missing)}: expected together with {', '.join(given)} (outside a SLURM "
            "or Open MPI job all three are needed), found it missing. Fix: pass --coordinator "
            "HOST:PORT --num-processes N --process-id I to every process."
        )
    if coordinator is not None and not re.fullmatch(r".+:\d+", coordinator):
        raise UserError(
            f"--coordinator: expected HOST:PORT (process 0's address), found {coordinator!r}. "
            "Fix: e.g. --coordinator 10.0.0.1:1234."
        )
    if num_processes is not None and num_processes < 1:
        raise UserError(f"--num-processes: expected >= 1, found {num_processes}.")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise UserError(
            f"--process-id: expected 0 <= id < --num-processes ({num_processes}), found "
            f"{process_id}. Fix: number the processes 0..{num_processes - 1}."
        )
    if jax.distributed.is_initialized():
        return True
    if coordinator is not None and process_id == 0:
        check_port_free(int(coordinator.rsplit(":", 1)[1]))
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )
    with _cpu_thread_pools(MIN_CPU_THREADS):
        jax.devices()  # the backends are made now, while the variable is set
    return True
