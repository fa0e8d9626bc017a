"""Meshes, placement rules, sharded training equal to one device, restores across topologies.

The rule and mesh tests are pure (axis sizes, abstract shapes). The training tests run
tests/_sharding_worker.py on 8 simulated CPU devices in a subprocess (the flag must precede
the jax import; this process has 1 device) and compare with 1-device runs made here.
"""

import importlib.util
import json
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from jaxdl.core import tree as tree_lib
from jaxdl.core.state import TrainState
from jaxdl.errors import UserError
from jaxdl.models import create_model
from jaxdl.parallel import sharding
from jaxdl.training.runlog import read_metrics

# One xdist worker runs this module (--dist loadgroup): its module fixtures are made once.
pytestmark = pytest.mark.xdist_group("test_sharding")

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "_sharding_worker", ROOT / "tests/_sharding_worker.py"
)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

SIZES = {"data": 1, "fsdp": 4, "tensor": 2}


# ---- mesh from config ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg, devices, expected",
    [
        ({"data": -1, "fsdp": 1, "tensor": 1}, 8, {"data": 8, "fsdp": 1, "tensor": 1}),
        ({"data": 2, "fsdp": -1}, 8, {"data": 2, "fsdp": 4, "tensor": 1}),
        ({"fsdp": 4, "tensor": 2}, 8, {"data": 1, "fsdp": 4, "tensor": 2}),
        (None, 1, {"data": 1, "fsdp": 1, "tensor": 1}),
    ],
)
def test_mesh_shape(cfg, devices, expected):
    assert sharding.mesh_shape(cfg, devices) == expected


@pytest.mark.parametrize(
    "cfg, match",
    [
        (
            {"data": 3},
            r"^mesh: the axes multiply to data 3 x fsdp 1 x tensor 1 = 3 devices, found 8",
        ),
        (
            {"data": -1, "fsdp": 3},
            r"^mesh\.data: -1 takes .* 8 devices are not divisible by .* = 3",
        ),
        (
            {"data": -1, "fsdp": -1},
            r"^mesh: at most one axis may be -1, found -1 for \['data', 'fsdp'\]",
        ),
        ({"pipeline": 2}, r"^mesh: expected axes \['data', 'fsdp', 'tensor'\], found unknown"),
        ({"data": 0}, r"^mesh\.data: expected a positive int or -1"),
    ],
)
def test_bad_mesh_names_numbers_and_fix(cfg, match):
    with pytest.raises(ValueError, match=match) as err:
        sharding.mesh_shape(cfg, 8)
    assert "Fix:" in str(err.value)


def test_tensor_axis_must_stay_within_a_host():
    with pytest.raises(ValueError, match=r"^mesh\.tensor: expected a divisor of the 2 devices"):
        sharding.mesh_shape({"data": -1, "tensor": 4}, 8, local_devices=2)


def test_one_device_mesh_replicates_everything():
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    tree = {"w": jnp.zeros((64, 512)), "b": jnp.zeros(512)}
    assert all(s.is_fully_replicated for s in jax.tree.leaves(sharding.tree_shardings(tree, mesh)))


def test_global_batch_is_split_over_processes():
    mesh = AbstractMesh((4, 2, 1), sharding.AXES)
    assert sharding.per_process_batch(32, mesh, process_count=4) == 8
    assert sharding.per_process_batch(32, mesh, process_count=1) == 32


@pytest.mark.parametrize(
    "batch, mesh, count, match",
    [
        (
            12,
            (8, 1, 1),
            1,
            r"^data\.batch_size: expected a multiple of mesh data x fsdp = 8 x 1 = 8",
        ),
        (
            20,
            (2, 4, 1),
            1,
            r"= 2 x 4 = 8 .* found 20\. Fix: set data\.batch_size to a multiple of 8",
        ),
        (16, (2, 1, 1), 3, r"^data\.batch_size: expected a multiple of the 3 processes"),
    ],
)
def test_indivisible_batch_names_the_numbers(batch, mesh, count, match):
    with pytest.raises(ValueError, match=match):
        sharding.per_process_batch(batch, AbstractMesh(mesh, sharding.AXES), process_count=count)


# ---- placement rules -----------------------------------------------------------------------


def tiny_gpt_state(scan_layers: bool = False):
    """Abstract TrainState (shapes only) of the tiny GPT with an AdamW chain."""
    model = create_model({"name": "transformer", "size": "tiny", "scan_layers": scan_layers})
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))

    def init():
        variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))
        params = {"params": variables["params"]}
        return TrainState.create(params, tx, jax.random.PRNGKey(1))

    return jax.eval_shape(init)


def flat_specs(tree, sizes=SIZES, **kwargs):
    specs = sharding.tree_specs(tree, sizes, **kwargs)
    flat = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P))
    return {tree_lib.path_str(kp): spec for kp, spec in flat}


def test_gpt_tensor_parallel_and_fsdp_rules():
    specs = flat_specs(tiny_gpt_state().params)
    b = "params/block_0"
    assert specs[f"{b}/attn/query/kernel"] == P("fsdp", "tensor")  # [32, 32]: output dim on tensor
    assert specs[f"{b}/attn/value/bias"] == P("tensor")  # 32 values: too small for fsdp
    assert specs[f"{b}/attn/out/kernel"] == P("tensor", "fsdp")  # input dim on tensor
    assert specs[f"{b}/mlp/fc1/kernel"] == P("fsdp", "tensor")  # [32, 128]
    assert specs[f"{b}/mlp/fc2/kernel"] == P("tensor", "fsdp")  # [128, 32]
    assert specs[f"{b}/mlp/fc2/bias"] == P(None)
    assert specs["params/embed/embedding"] == P("fsdp", None)  # [256, 32]: the largest dim
    assert specs["params/pos_embed"] == P("fsdp", None)  # [64, 32]
    assert specs[f"{b}/ln1/scale"] == P(None)


def test_rules_align_right_on_scanned_layers():
    specs = flat_specs(tiny_gpt_state(scan_layers=True).params)
    # [L=2, 32, 32]: the layer axis (2) is not divisible by fsdp=4, the input dim is.
    assert specs["params/blocks/attn/query/kernel"] == P(None, "fsdp", "tensor")
    assert specs["params/blocks/mlp/fc2/kernel"] == P(None, "tensor", "fsdp")


def test_optimizer_state_follows_its_parameter():
    state = tiny_gpt_state()
    specs = flat_specs(state)
    params = {k: v for k, v in specs.items() if k.startswith("params/")}
    followed = 0
    for path, spec in specs.items():
        if path.startswith("opt_state/"):
            owner = [p for p in params if path.endswith(p[len("params/") :])]
            if owner:
                assert spec == params[owner[0]], path
                followed += 1
            else:
                assert spec == P(), path  # counts
    assert followed == 2 * len(params)  # Adam's mu and nu
    assert specs["step"] == P() and specs["rng"] == P(None)


def test_fsdp_takes_the_largest_divisible_dim():
    sizes = {"data": 2, "fsdp": 4, "tensor": 1}
    assert sharding.partition_spec("w", (64, 512), sizes) == P(None, "fsdp")
    assert sharding.partition_spec("w", (512, 10), sizes) == P("fsdp", None)
    assert sharding.partition_spec("w", (6, 1000), sizes) == P(None, "fsdp")
    assert sharding.partition_spec("w", (3, 999), sizes) == P(None, None)  # nothing divisible
    assert sharding.partition_spec("w", (1023,), sizes) == P(None)  # below FSDP_MIN_SIZE
    assert sharding.partition_spec("w", (64, 512), {**sizes, "fsdp": 1}) == P(None, None)


def test_tensor_rule_on_an_indivisible_dim_is_a_user_error():
    with pytest.raises(ValueError, match=r"^mesh\.tensor: .*query/kernel has shape \(32, 30\)"):
        sharding.partition_spec(
            "params/block_0/attn/query/kernel", (32, 30), {"tensor": 4}, sharding.default_rules()
        )


# ---- multi-process helpers (the process-level parts run in test_multiprocess.py) -----------


def test_local_data_state_keeps_the_step_and_takes_this_shard():
    saved = {"step": 7, "shard": [0, 1], "batch_size": 32}
    assert sharding.local_data_state(saved) == saved
    other = {"step": 7, "shard": [0, 2], "batch_size": 16}  # another process count: refused later
    assert sharding.local_data_state(other) == other
    assert sharding.local_data_state(None) is None


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, None),
        (
            {
                "SLURM_JOB_ID": "1",
                "SLURM_STEP_NODELIST": "n[1-2]",
                "SLURM_NTASKS": "2",
                "SLURM_PROCID": "1",
            },
            "SLURM",
        ),
        (
            {
                "SLURM_JOB_ID": "1",
                "SLURM_STEP_NODELIST": "n1",
                "SLURM_NTASKS": "1",
                "SLURM_PROCID": "0",
            },
            None,
        ),
        ({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "4"}, "Open MPI"),
    ],
)
def test_detected_cluster(env, expected):
    assert sharding.detected_cluster(env) == expected


@pytest.mark.parametrize(
    "args, match",
    [
        (
            ("h:1", None, None),
            r"^--num-processes, --process-id: expected together with --coordinator",
        ),
        (("host", 2, 0), r"^--coordinator: expected HOST:PORT .*found 'host'"),
        (("h:1", 2, 2), r"^--process-id: expected 0 <= id < --num-processes \(2\), found 2"),
    ],
)
def test_distributed_flags_are_checked_before_starting(args, match):
    with pytest.raises(ValueError, match=match):
        sharding.initialize_distributed(*args, environ={})


def test_busy_coordinator_port_is_refused_before_starting():
    # Without the check, gRPC fails to bind and process 0 dies by SIGSEGV.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(
            UserError, match=rf"^--coordinator: .*port {port}, found it unavailable"
        ):
            sharding.initialize_distributed(f"127.0.0.1:{port}", 2, 0, environ={})
    assert not jax.distributed.is_initialized()


def test_no_flags_no_cluster_starts_nothing():
    assert sharding.initialize_distributed(environ={}) is False
    assert not jax.distributed.is_initialized()


# ---- one device: the mesh path equals the plain jit path -----------------------------------


def test_one_device_mesh_steps_equal_plain_steps():
    from jaxdl.core import steps
    from jaxdl.data import build_data
    from jaxdl.training.build import build

    cfg = worker.load("mlp")
    data = build_data(cfg.data, seed=cfg.seed, num_classes=10)
    kw = dict(kind=data.kind, example_spec=data.example_spec, num_classes=10, total_steps=20)
    plain = build(cfg, **kw)
    meshed = build(cfg, **kw, mesh=sharding.make_mesh(cfg.mesh))
    step_a = steps.make_train_step(plain.model, plain.head, plain.tx)
    step_b = steps.make_train_step(meshed.model, meshed.head, meshed.tx, layout=meshed.layout)
    batches = data.train_iter(32, seed=0)
    a, b = plain.state, meshed.state
    for batch in [next(batches) for _ in range(3)]:
        a, ma = step_a(a, batch)
        b, mb = step_b(b, sharding.put_batch(batch, meshed.layout.batch))
        assert float(ma["loss"]) == float(mb["loss"])
    batches.close()
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---- 8 simulated devices -------------------------------------------------------------------


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    """1-device reference runs here, then the 8-device worker; (ref dir, out dir, facts)."""
    from jaxdl.training.trainer import train

    ref, out = tmp_path_factory.mktemp("ref"), tmp_path_factory.mktemp("out")
    for model in ("mlp", "gpt"):
        train(worker.load(model), ref / model, progress=False, echo=lambda *a: None)
    # The worker's runs of one model share their init and eval programs: the session's
    # compilation cache (tests/conftest.py, inherited) compiles them once.
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests/_sharding_worker.py"), str(out), str(ref)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return ref, out, json.loads((out / "facts.json").read_text())


def train_losses(workdir: Path) -> np.ndarray:
    records = [r for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in records] == list(range(1, 21))
    return np.array([r["loss"] for r in records])


@pytest.mark.parametrize("name", list(worker.RUNS))
def test_sharded_training_equals_one_device(scaled, name):
    ref, out, facts = scaled
    model, _ = worker.RUNS[name]
    expected, found = train_losses(ref / model), train_losses(out / name)
    np.testing.assert_allclose(found, expected, rtol=0, atol=1e-5)
    assert expected[-1] < expected[0] - 0.3  # it learned: equality is not of flat curves
    summary = json.loads((ref / model / "summary.json").read_text())
    assert facts["runs"][name]["test_loss"] == pytest.approx(summary["test_loss"], abs=1e-5)
    assert facts["runs"][name]["params"] == summary["params"]


def test_fsdp_and_tensor_parallel_state_is_really_split(scaled):
    _, _, facts = scaled
    # Restored onto the run's own mesh (fsdp 4 x tensor 2): [32, 32] kernels in 8 pieces.
    query, fc2 = facts["gpt_fsdp_tp"]["attn/query/kernel"], facts["gpt_fsdp_tp"]["mlp/fc2/kernel"]
    assert query["kernel_shard"] == [8, 16] and query["mu_shard"] == [8, 16]  # fsdp, tensor
    assert fc2["kernel_shard"] == [64, 8] and fc2["mu_shard"] == [64, 8]  # [128, 32]: tensor, fsdp


def test_restore_8_devices_to_4(scaled):
    _, _, facts = scaled
    saved = facts["runs"]["mlp_fsdp"]
    for how in ("resume_8_to_4", "finetune_8_to_4"):
        got = facts[how]
        assert got["sha"] == saved["params_sha256"], how
        assert got["kernel_shard"] == [64, 128], how  # [64, 512] over fsdp=4
    assert facts["resume_8_to_4"]["step"] == 20 and facts["resume_8_to_4"]["mu_shard"] == [64, 128]
    assert facts["finetune_8_to_4"]["loaded"] == 8  # 4 Dense layers x (kernel, bias)


def test_restore_1_device_to_8(scaled):
    ref, _, facts = scaled
    saved = json.loads((ref / "mlp" / "summary.json").read_text())
    for how in ("resume_1_to_8", "finetune_1_to_8"):
        assert facts[how]["sha"] == saved["params_sha256"], how
        assert facts[how]["kernel_shard"] == [64, 64], how  # [64, 512] over fsdp=8
    assert facts["resume_1_to_8"]["devices"] == 8


def test_restore_8_devices_to_1(scaled):
    _, out, facts = scaled
    saved = facts["runs"]["mlp_fsdp"]
    cfg = worker.load("mlp")
    resumed = worker.resume_on(out / "mlp_fsdp", cfg, jax.devices())
    finetuned = worker.finetune_on(out / "mlp_fsdp", cfg, jax.devices())
    assert resumed["sha"] == finetuned["sha"] == saved["params_sha256"]
    assert resumed["step"] == 20 and resumed["devices"] == 1
    assert resumed["kernel_shard"] == resumed["mu_shard"] == [64, 512]


def test_memory_report_counts_shards(scaled):
    _, _, facts = scaled
    dp, fsdp = facts["memory"]
    params = 256 * 32 + 64 * 32 + 2 * (4 * (32 * 32 + 32) + 2 * 32 * 128 + 128 + 32 + 4 * 32) + 64
    assert dp["params"] == fsdp["params"] == params
    assert dp["param_bytes"] == 4 * params  # replicated: every device holds all of it
    assert dp["opt_bytes"] == 2 * 4 * params + 8  # mu, nu; int32 counts of Adam and schedule
    # FSDP splits the 12 leaves of >= 1,024 values 8 ways; the 1-D ones stay whole.
    small = 4 * (2 * (4 * 32 + 128 + 32 + 4 * 32) + 64)
    assert fsdp["param_bytes"] == (4 * params - small) // 8 + small
    assert fsdp["opt_bytes"] == 2 * fsdp["param_bytes"] + 8
    assert 0 < fsdp["temp_bytes"] and fsdp["peak_bytes"] < dp["peak_bytes"]
