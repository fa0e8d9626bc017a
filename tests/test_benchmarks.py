"""Smoke test of benchmarks/throughput.py: one micro case, the record schema, no recompiles."""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks package

from benchmarks import _flops, _report, _timing, throughput  # noqa: E402
from jaxdl.models.transformer import flops_per_token  # noqa: E402

# 8 features -> 16 -> 4 classes: 8*16 + 16 + 16*4 + 4 = 212 parameters.
MICRO = throughput.Case("micro", {"name": "mlp", "num_classes": 4, "hidden": (16,)}, (8,), 8)
MICRO_PARAMS = 212
PRESET = throughput.Preset(
    models=(),
    modes=("full",),
    dtypes=("float32",),
    warmup=10,
    trials=7,
    target_trial_s=0.005,
    max_steps_per_trial=3,
)

RECORD_KEYS = {
    "model",
    "framework",
    "mode",
    "dtype",
    "batch",
    "step_time_s",
    "throughput",
    "compile_s",
    "flops_per_step",
    "xla_flops",
    "mfu",
    "peak_memory_bytes",
    "time_vs_jax",
    "params",
    "trainable_params",
    "state_bytes",
    "steps_per_trial",
    "trials",
}


@pytest.fixture(scope="module")
def jax_record():
    (record,) = throughput.bench_case(MICRO, "full", "float32", PRESET, frameworks=("jax",))
    return record


def test_jax_record_schema_and_values(jax_record, tmp_path):
    r = jax_record
    assert RECORD_KEYS <= r.keys()
    assert (r["model"], r["framework"], r["mode"], r["batch"]) == ("micro", "jax", "full", 8)
    assert set(r["step_time_s"]) == {"median", "min", "p90", "cv"}
    assert len(r["step_times_s"]) == 7 and 1 <= r["steps_per_trial"] <= 3
    t = r["step_time_s"]
    assert 0 < t["min"] <= t["median"] <= t["p90"]
    assert r["throughput"] == pytest.approx(8 / t["median"])
    assert r["params"] == r["trainable_params"] == MICRO_PARAMS
    # 6 FLOPs per parameter per example (biases included), exactly.
    assert r["flops_per_step"] == 6 * MICRO_PARAMS * 8
    # XLA also counts Adam, softmax and the metrics, so it lands above the matmul count.
    assert r["flops_per_step"] <= r["xla_flops"] < 3 * r["flops_per_step"]
    assert r["time_vs_jax"] == 1.0 and r["mfu"] is None  # no known peak for a CPU
    # state = params + Adam's two moments (float32) + step counters and the rng key.
    assert 3 * 4 * MICRO_PARAMS <= r["state_bytes"] < 3 * 4 * MICRO_PARAMS + 64

    env = {
        "device": "cpu:cpu",
        "jax": "x",
        "jaxlib": "x",
        "flax": "x",
        "optax": "x",
        "torch": None,
        "xla_flags": "",
    }
    _report.write_all(tmp_path / "r.json", env, [r])
    loaded = json.loads((tmp_path / "r.json").read_text())
    assert loaded["results"][0]["step_time_s"] == t
    table = (tmp_path / "r.md").read_text().splitlines()
    assert table[-1].startswith("| micro | full | float32 | jax | 8 |")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_compile_counter_sees_a_retrace():
    f = jax.jit(lambda x: x * 2)
    f(jnp.ones(3))
    with _timing.CompileCounter() as quiet:
        f(jnp.ones(3))
    with _timing.CompileCounter() as loud:
        f(jnp.ones(4))  # new shape: traced and compiled again
    assert quiet.events == []
    assert {e for e, _ in loud.events} == set(_timing.CompileCounter.EVENTS)


def test_step_stats_and_paired_ratio():
    stats = _timing.step_stats([1.0, 2.0, 3.0, 4.0, 10.0])
    assert stats["median"] == 3.0 and stats["min"] == 1.0
    assert stats["p90"] == pytest.approx(7.6)
    assert stats["cv"] == pytest.approx(np.std([1, 2, 3, 4, 10], ddof=1) / 4.0)
    assert _timing.paired_ratio([2.0, 9.0, 3.0], [1.0, 3.0, 1.0]) == 3.0


def test_lm_flops_match_the_library_convention():
    model = {"name": "transformer", "size": "small", "max_len": 128}
    layers = _flops.transformer_layers(model, (128,))
    full = _flops.train_flops(layers, "full", lambda name: True)
    assert full == pytest.approx(128 * flops_per_token(model, 128), rel=1e-12)


def test_frozen_and_lora_flops():
    layers = [("a", 10.0), ("b", 20.0), ("head", 5.0)]
    # forward 35, head trains (+2*5); nothing after it
    assert _flops.train_flops(layers, "frozen", lambda n: n == "head") == 45.0
    # "b" trains: +2*20, then head needs only its input gradient: +5
    assert _flops.train_flops(layers, "frozen", lambda n: n == "b") == 80.0
    assert _flops.train_flops(layers, "lora", lambda n: False) == 70.0
    assert _flops.train_flops(layers, "full", lambda n: False) == 105.0


def test_torch_twin_matches_jax(jax_record):
    torch = pytest.importorskip("torch")
    from benchmarks import torch_models

    batch = throughput.host_batch(MICRO)
    common = dict(
        kind="classification",
        batch=batch,
        dtype="float32",
        frozen_trains=MICRO.frozen_trains,
        lora={**throughput.LORA, "targets": MICRO.lora_targets},
        compiled=False,
    )
    full = torch_models.torch_runner(MICRO.model, mode="full", **common)
    assert full.info["params"] == full.info["trainable_params"] == jax_record["params"]
    frozen = torch_models.torch_runner(MICRO.model, mode="frozen", **common)
    assert frozen.info["trainable_params"] == 16 * 4 + 4  # the head only
    lora = torch_models.torch_runner(MICRO.model, mode="lora", **common)
    assert lora.info["trainable_params"] == 8 * (8 + 16) + 8 * (16 + 4)  # rank 8, two kernels

    # LoRA starts as the base model (B = 0): same logits as without the parametrization.
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    plain = torch_models.make_model(MICRO.model, (8,))
    adapted = torch_models.make_model(MICRO.model, (8,))
    adapted.load_state_dict(plain.state_dict())
    torch_models.apply_mode(adapted, "lora", "params/head/.*", common["lora"])
    torch.testing.assert_close(adapted(x), plain(x))

    for runner in (full, frozen):
        runner.prepare()
        runner.run(2)
    # params + Adam's m and v (+ a 4-byte step count per tensor) over what trains
    assert full.info["state_bytes"]() == 4 * MICRO_PARAMS + 2 * 4 * MICRO_PARAMS + 4 * 4
    assert frozen.info["state_bytes"]() == 4 * MICRO_PARAMS + 2 * 4 * 68 + 2 * 4
