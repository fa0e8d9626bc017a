"""The benchmarks: throughput.py's record schema on a micro case (in process), and every
script of benchmarks/ run in its smoke mode (`--smoke`) in a subprocess, so a refactor that
breaks a benchmark fails CI. The smoke runs are marked `benchmark_smoke`, which the default
suite deselects (pyproject.toml): `pytest -n 2 -m benchmark_smoke` runs them, as CI does.

Torch: the default suite is torch-free, and so are these runs. throughput.py and cpu_gaps.py
time the jaxdl side alone without torch, and lora_vs_peft.py runs its jaxdl variants (peft's
where torch, transformers and peft are installed: run this file in the interop venv,
`pip install -e ".[interop]"`, to check the torch twins too); their tests assert the torch
records exactly when torch is importable.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks package

from benchmarks import _flops, _report, _timing, throughput  # noqa: E402
from jaxdl.models.transformer import (  # noqa: E402
    count_params,
    flops_per_token,
    transformer_spec,
)

REPO = Path(__file__).resolve().parents[1]
HAVE_TORCH = importlib.util.find_spec("torch") is not None

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


# ------------------------------------------------------------------ every script's smoke mode


def _scripts() -> list[str]:
    """benchmarks/*.py that run as a command (helpers, such as torch_models.py, do not)."""
    return sorted(
        p.name
        for p in (REPO / "benchmarks").glob("*.py")
        if 'if __name__ == "__main__":' in p.read_text()
    )


def _smoke(script: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--smoke", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _check_throughput(tmp_path):
    _smoke("throughput.py", "--out", str(tmp_path / "t.json"))
    results = json.loads((tmp_path / "t.json").read_text())["results"]
    jax_rows = {r["model"]: r for r in results if r["framework"] == "jax"}
    assert list(jax_rows) == list(throughput.PRESETS["smoke"].models)
    # smoke-mlp: 8 -> 8 -> 3: 8*8 + 8 + 8*3 + 3 parameters
    assert jax_rows["smoke-mlp"]["params"] == 99
    for r in jax_rows.values():
        assert r["params"] == r["trainable_params"] > 0 and r["flops_per_step"] > 0
        assert r["trials"] == 1 and r["steps_per_trial"] == 1
    torch_rows = {r["model"]: r for r in results if r["framework"] == "torch-eager"}
    if HAVE_TORCH:  # every twin has exactly the JAX model's parameter count
        assert {m: r["params"] for m, r in torch_rows.items()} == {
            m: r["params"] for m, r in jax_rows.items()
        }
    else:
        assert torch_rows == {}
    assert (tmp_path / "t.md").is_file() and (tmp_path / "t.png").is_file()


def _check_checkpoint_verify(tmp_path):
    _smoke("checkpoint_verify.py", "--out", str(tmp_path / "v.json"))
    result = json.loads((tmp_path / "v.json").read_text())
    spec = transformer_spec({"name": "transformer", "size": "tiny"})
    assert (result["size"], result["trials"]) == ("tiny", 1)
    assert result["params"] == count_params(spec)
    assert 0 < result["verify_s"] < result["restore_s_with_verify"]


def _check_cpu_gaps(tmp_path):
    from benchmarks import cpu_gaps

    out = _smoke("cpu_gaps.py").stdout
    probes = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert sorted(set(probes)) == sorted(cpu_gaps.PROBES)
    reference = "vs torch" if HAVE_TORCH else "vs jax"
    assert all(reference in line for line in out.splitlines() if line.startswith("  "))


def _check_data_throughput(tmp_path):
    from benchmarks import data_throughput

    _smoke("data_throughput.py", "--data-dir", str(tmp_path / "tfds"), "--out", str(tmp_path / "d"))
    record = json.loads((tmp_path / "d").read_text())
    assert [r["case"] for r in record["results"]] == list(data_throughput.CASES)
    assert all(r["workers"] == 0 and r["examples_per_s"] > 0 for r in record["results"])
    ratio = record["loader_step_ratio"]
    assert (ratio["trials"], ratio["steps_per_trial"]) == (1, 2) and ratio["ratio"] > 0


def _check_lora_cost(tmp_path):
    _smoke("lora_cost.py", "--out", str(tmp_path / "l.json"))
    variants = json.loads((tmp_path / "l.json").read_text())["models"]["smoke-gpt"]["variants"]
    model = throughput.CASES["smoke-gpt"].model
    assert variants["full"]["trainable_params"] == count_params(transformer_spec(model))
    # rank 8 on query, key, value, out (32 -> 32) and fc1, fc2 (32 <-> 128), one block
    lora = 4 * 8 * (32 + 32) + 2 * 8 * (32 + 128)
    assert variants["LoRA merged"]["trainable_params"] == lora
    assert variants["LoRA factored (default)"]["trainable_params"] == lora
    assert all(len(v["trials_s"]) == 1 for v in variants.values())


def _check_lora_vs_peft(tmp_path):
    from safetensors.numpy import load_file

    _smoke("lora_vs_peft.py", "--out", str(tmp_path / "p.json"))
    variants = json.loads((tmp_path / "p.json").read_text())["variants"]
    have_peft = all(importlib.util.find_spec(m) for m in ("torch", "transformers", "peft"))
    jaxdl_side = ["jaxdl LoRA", "jaxdl LoRA merged", "jaxdl full"]
    assert list(variants) == jaxdl_side + (["peft LoRA"] if have_peft else [])
    weights = load_file(REPO / "tests" / "fixtures" / "hub" / "gpt2_tiny" / "model.safetensors")
    assert variants["jaxdl full"]["trainable_params"] == sum(w.size for w in weights.values())
    # rank 2 on query, key, value, out (32 -> 32) and fc1, fc2 (32 <-> 128), two blocks
    assert variants["jaxdl LoRA"]["trainable_params"] == 2 * (4 * 2 * 64 + 2 * 2 * 160)


def _check_memory_report(tmp_path):
    _smoke("memory_report.py", "--out", str(tmp_path / "m.json"))
    record = json.loads((tmp_path / "m.json").read_text())
    rows = {r["strategy"]: r for r in record["parallel"]}
    assert set(rows) == {"data parallel", "FSDP"}
    params = count_params(transformer_spec({"name": "transformer", "size": "tiny"}))
    dp, fsdp = rows["data parallel"], rows["FSDP"]
    assert dp["params"] == fsdp["params"] == params
    assert dp["param_bytes"] == 4 * params  # float32, replicated on each of the 2 devices
    assert fsdp["param_bytes"] < dp["param_bytes"]  # sharded over the 2 devices
    # the tiny Llama: full vs LoRA (rank 4 on its 7 projections) vs QLoRA (those NF4)
    modes = {r["mode"]: r for r in record["finetune"]}
    assert list(modes) == ["full", "LoRA", "QLoRA nf4"]
    kernels = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)  # q, o; k, v; gate, up, down
    params, adapters = 90_432, 2 * 4 * (2 * 128 + 2 * 96 + 3 * 192)
    assert all(r["params"] == params for r in modes.values())
    assert modes["full"]["weight_bytes"] == 4 * params
    assert modes["LoRA"]["trainable_params"] == modes["QLoRA nf4"]["trainable_params"] == adapters
    assert modes["LoRA"]["weight_bytes"] == 4 * (params + adapters)
    nf4 = kernels // 2 + 4 * kernels // 64  # packed codes + a float32 absmax per 64
    assert modes["QLoRA nf4"]["weight_bytes"] == nf4 + 4 * (params - kernels + adapters)
    assert (
        modes["LoRA"]["opt_bytes"] == modes["QLoRA nf4"]["opt_bytes"] < modes["full"]["opt_bytes"]
    )


def _check_roofline(tmp_path):
    _smoke("roofline.py", "--out", str(tmp_path / "r.json"))
    records = {r["model"]: r for r in json.loads((tmp_path / "r.json").read_text())["results"]}
    assert list(records) == list(throughput.PRESETS["smoke"].models)
    # smoke-mlp, batch 4, 8 -> 8 -> 3: forward x W1, h W2; backward dW2, dh, dW1 (no dx)
    mlp = records["smoke-mlp"]
    assert sorted((o["flops"], o["shapes"]) for o in mlp["ops"]) == [
        (192.0, [[4, 3], [4, 8]]),  # dW2 = h^T g
        (192.0, [[4, 3], [8, 3]]),  # dh = g W2^T
        (192.0, [[4, 8], [8, 3]]),  # h W2
        (512.0, [[4, 8], [4, 8]]),  # dW1 = x^T g1
        (512.0, [[4, 8], [8, 8]]),  # x W1
    ]
    assert mlp["gemm_count"] == 5 and mlp["gemm_flops"] == 2 * (2 * 4 * 8 * 8 + 3 * 4 * 8 * 3)
    for r in records.values():
        assert r["gemm_count"] == sum(o["count"] for o in r["ops"])
        assert r["roofline_s"] == pytest.approx(sum(o["alone_s"] * o["count"] for o in r["ops"]))
        assert r["step_s"] > 0 and r["roofline_share"] == r["roofline_s"] / r["step_s"]


def _check_sweep_throughput(tmp_path):
    _smoke("sweep_throughput.py", "--out", str(tmp_path / "s.json"))
    record = json.loads((tmp_path / "s.json").read_text())
    assert (record["members"], record["steps"], list(record["sweep"])) == (2, 2, ["mlp"])
    assert all(v > 0 for k, v in record["sweep"]["mlp"].items() if k.endswith("_s"))
    assert sorted(record["steps_per_call"]) == ["gpt-small", "mlp"]
    assert all(r["trials"] == 1 for r in record["steps_per_call"].values())


def _check_llm_decode(tmp_path):
    _smoke("llm_decode.py", "--out", str(tmp_path / "d.json"))
    record = json.loads((tmp_path / "d.json").read_text())
    assert record["model"] == "tiny-llama" and record["settings"]["new_tokens"] == 32
    ours = record["decode"]["jaxdl"]
    assert ours["prefill_tokens_per_s"] > 0 and ours["generate_s"] > 0
    assert ("transformers" in record["decode"]) == HAVE_TORCH


def _check_nnx_vs_linen(tmp_path):
    _smoke("nnx_vs_linen.py", "--out", str(tmp_path / "n.json"))
    record = json.loads((tmp_path / "n.json").read_text())
    [case] = record["cases"].values()
    assert case["max_abs_logit_diff"] < 1e-4  # the twins are the same function
    assert case["nnx"]["xla_flops"] > 0 and case["linen"]["step_time_s"]["median"] > 0
    assert case["nnx_over_linen"] > 0


SMOKE_CHECKS = {
    re.sub(r"^_check_(.*)$", r"\1.py", name): check
    for name, check in dict(globals()).items()
    if name.startswith("_check_")
}


def test_every_benchmark_script_has_a_smoke_test():
    assert sorted(SMOKE_CHECKS) == _scripts()


@pytest.mark.benchmark_smoke  # CI's own step: `pytest -n 2 -m benchmark_smoke`
@pytest.mark.parametrize("script", sorted(SMOKE_CHECKS))
def test_smoke_mode(script, tmp_path):
    SMOKE_CHECKS[script](tmp_path)
