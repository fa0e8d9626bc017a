"""PEFT adapters: export-hf --adapter writes PEFT's layout, and init_from.adapter reads it
back into a run's adapters exactly (transformers + peft load it: tests/interop/live)."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from _llm import hf_folder, sft_config
from safetensors.numpy import load_file

from jaxdl.checkpoint.read import load_adapters
from jaxdl.data.pydoc_qa import write_pydoc_qa
from jaxdl.errors import UserError
from jaxdl.interop import import_checkpoint
from jaxdl.testing import subprocess_env
from jaxdl.training.trainer import train

# One xdist worker runs this module (--dist loadgroup): its module fixtures are made once.
pytestmark = pytest.mark.xdist_group("test_peft_interop")

TARGETS = r"params/.*/(q_proj|v_proj|down_proj)/kernel"


def lora_sft_config(tmp_path, **init_from):
    return sft_config(
        tmp_path,
        "--config.num_steps=2",
        "--config.eval_every=2",
        "--config.lora.alpha=8.0",
        f"--config.lora.targets={TARGETS}",
        *[f"--config.init_from.{k}={v}" for k, v in init_from.items()],
    )


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("peft")
    import_checkpoint("hf:auto", str(hf_folder(tmp)), tmp / "base")
    write_pydoc_qa(tmp / "qa", seed=0)
    train(lora_sft_config(tmp), tmp / "run", progress=False)
    return tmp


def test_adapter_export_is_peft_layout(lora_run):
    out = lora_run / "adapter"
    cmd = [sys.executable, "-m", "jaxdl.cli", "export-hf", "--adapter"]
    done = subprocess.run(
        [*cmd, "--workdir", str(lora_run / "run"), "--out", str(out)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
    )
    assert done.returncode == 0, done.stderr
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert config["target_modules"] == sorted(
        f"model.layers.{i}.{m}" for i in (0, 1) for m in ("mlp.down_proj", "self_attn.q_proj",
                                                           "self_attn.v_proj")
    )  # fmt: skip
    weights = load_file(str(out / "adapter_model.safetensors"))
    a = weights["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    b = weights["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    ours, _ = load_adapters(lora_run / "run")
    kernel = ours["params"]["layer_1"]["attn"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(a, kernel["a"].T)  # lora_A [r, in] = A^T
    np.testing.assert_array_equal(b, kernel["b"].T)  # lora_B [out, r] = B^T
    assert np.abs(b).max() > 0  # trained, not the zero init


def test_init_from_adapter_starts_from_its_weights(lora_run):
    if not (lora_run / "adapter").exists():
        test_adapter_export_is_peft_layout(lora_run)
    from jaxdl.interop.base import with_base
    from jaxdl.training.build import build

    cfg = with_base(lora_sft_config(lora_run, adapter=lora_run / "adapter"))
    spec = {
        k: ((64,), np.int32 if k != "weights" else np.float32)
        for k in ("inputs", "targets", "weights", "segment_ids", "positions")
    }
    setup = build(cfg, kind="sft", example_spec=spec, num_classes=514, total_steps=1)
    exported, _ = load_adapters(lora_run / "run")
    jax.tree.map(np.testing.assert_array_equal, setup.state.params["lora"], exported)

    wrong = with_base(lora_sft_config(lora_run, adapter=lora_run / "adapter"))
    wrong.lora.rank = 8
    with pytest.raises(UserError, match=r"^lora\.rank: the run has 8, the adapter .* has r=4"):
        build(wrong, kind="sft", example_spec=spec, num_classes=514, total_steps=1)


def test_adapter_export_of_a_full_run_is_refused(lora_run, tmp_path):
    with pytest.raises(UserError, match=r"holds no LoRA adapters"):
        load_adapters(lora_run / "base")
