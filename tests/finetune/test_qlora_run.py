"""QLoRA end to end through `jaxdl train`: the tiny Llama on pydoc text, base run first.

Checked: the QLoRA run (lora.quantize="nf4", init_from the base run) trains only the
adapters; its checkpoints hold the NF4 base (uint8 codes, float32 absmax), which is the
base run's weights quantized; partition_plan.json states the quantized bytes;
`jaxdl.load_model` of the workdir gives the logits of the in-memory merged model.
"""

import json

import jax
import numpy as np
import pytest

import jaxdl
from jaxdl.checkpoint.read import load_params, state_metadata
from jaxdl.cli import main
from jaxdl.core import quant, steps
from jaxdl.core import tree as tree_lib
from jaxdl.training.evaluate import restore_run

# One xdist worker runs this module (--dist loadgroup): its module fixtures are made once.
pytestmark = pytest.mark.xdist_group("test_qlora_run")

STEPS = 4
LORA = {"rank": 4, "alpha": 8.0, "targets": r"params/.*_proj/kernel", "quantize": "nf4"}
# tiny Llama: per layer q, o [64, 64]; k, v [64, 32]; gate, up [64, 128]; down [128, 64]
KERNELS = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]
KERNEL_VALUES = 2 * sum(i * o for i, o in KERNELS)
PARAMS = KERNEL_VALUES + 256 * 64 + 5 * 64  # + tied embedding, 4 layer norms and the final one


def _train(workdir, *extra):
    argv = [
        "train",
        "--config",
        "lm_pydoc_lora",
        "--config.model={'name': 'llama', 'size': 'tiny'}",
        "--config.data.seq_len=32",
        "--config.data.batch_size=4",
        "--config.data.eval_batch_size=64",
        "--config.data.max_bytes=60000",
        f"--config.num_steps={STEPS}",
        "--config.log_every=2",
        "--config.eval_every=4",
        "--config.best_metric=",
        "--config.init_from.checkpoint=",
        *extra,
        "--workdir",
        str(workdir),
    ]
    assert main(argv) == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora_run")
    _train(root / "base", "--config.lora=None")
    _train(
        root / "qlora", f"--config.lora={LORA}", f"--config.init_from.checkpoint={root / 'base'}"
    )
    return root


def test_qlora_run_trains_adapters_over_the_nf4_base(runs):
    summary = json.loads((runs / "qlora" / "summary.json").read_text())
    assert summary["params"] == PARAMS
    assert summary["trainable_params"] == 2 * sum(4 * (i + o) for i, o in KERNELS)
    train_losses = [
        json.loads(line)["loss"]
        for line in (runs / "qlora" / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["split"] == "train"
    ]
    assert len(train_losses) == STEPS // 2 and all(np.isfinite(train_losses))

    step_dir = runs / "qlora" / "checkpoints" / str(STEPS)
    meta = tree_lib.flatten(state_metadata(step_dir)["frozen"])
    assert meta["params/layer_0/attn/q_proj/kernel/nf4"].dtype == np.uint8
    assert meta["params/layer_0/attn/q_proj/kernel/nf4"].shape == (32, 64)
    assert meta["params/layer_0/mlp/down_proj/kernel/absmax"].shape == (2, 64)
    assert "params/layer_0/attn/q_proj/kernel" not in meta
    assert meta["params/embed/embedding"].dtype == np.float32

    # the stored base is the base run's final weights, NF4-quantized
    base = load_params(runs / "base")
    _, setup, _ = restore_run(runs / "qlora")
    frozen = tree_lib.flatten(jax.device_get(setup.state.frozen))
    want = quant.quantize_nf4(base["layer_1"]["mlp"]["up_proj"]["kernel"])
    np.testing.assert_array_equal(frozen["params/layer_1/mlp/up_proj/kernel/nf4"], want["nf4"])

    plan = json.loads((runs / "qlora" / "partition_plan.json").read_text())["groups"]
    frozen_row = next(r for r in plan if not r["trainable"])
    assert frozen_row["quantized_leaves"] == 2 * len(KERNELS)
    nf4_bytes = KERNEL_VALUES // 2 + 4 * KERNEL_VALUES // 64
    assert frozen_row["param_bytes"] == nf4_bytes + 4 * (PARAMS - KERNEL_VALUES)


def test_load_model_of_the_qlora_workdir_is_the_in_memory_merged_model(runs):
    _, setup, data = restore_run(runs / "qlora")
    model, variables = jaxdl.load_model(runs / "qlora")
    tokens = next(iter(data.eval_iter("val", 8)))["inputs"]
    in_memory = steps.model_params(setup.state.params, setup.state.frozen, setup.lora_cfg)
    want = setup.model.apply({"params": in_memory}, tokens)
    got = model.apply(variables, tokens)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # ... and not the float base: the adapters and the NF4 rounding both show
    base_logits = model.apply({"params": load_params(runs / "base")}, tokens)
    assert np.abs(np.asarray(got) - np.asarray(base_logits)).max() > 1e-3


def test_export_hf_base_is_the_dequantized_base_the_adapter_export_names(runs, tmp_path, capsys):
    from safetensors.numpy import load_file

    from jaxdl.interop import llama

    assert (
        main(
            ["export-hf", "--base", "--workdir", str(runs / "qlora"), "--out", str(tmp_path / "b")]
        )
        == 0
    )
    written = load_file(str(tmp_path / "b" / "model.safetensors"))
    model_cfg = json.loads((runs / "qlora" / "config.json").read_text())["model"]
    dequantized = llama.to_state_dict(load_params(runs / "qlora", merge_lora=False), model_cfg)
    float_base = llama.to_state_dict(load_params(runs / "base"), model_cfg)
    assert written.keys() == dequantized.keys()
    for key, value in written.items():
        np.testing.assert_array_equal(value, dequantized[key])
    # the NF4 rounding shows on every projection, and nothing else changed
    changed = {k for k in written if not np.array_equal(written[k], float_base[k])}
    assert changed == {k for k in written if k.endswith("_proj.weight")}
    capsys.readouterr()
    out = ["--out", str(tmp_path / "a")]
    assert main(["export-hf", "--adapter", "--workdir", str(runs / "qlora"), *out]) == 0
    assert "jaxdl export-hf --base" in capsys.readouterr().out
    # a run without adapters has no base of its own: one line, exit 2
    out = ["--out", str(tmp_path / "c")]
    assert main(["export-hf", "--base", "--workdir", str(runs / "base"), *out]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds no LoRA adapters" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "c").exists()
