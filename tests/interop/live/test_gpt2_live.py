"""GPT-2 import and export-hf against transformers itself (random weights, no hub access).

Max abs logit difference <= 1e-4 at float32, jaxdl at highest matmul precision:
the tiny fixture re-checked live, a full-size GPT-2 124M, and the round trip
import -> LoRA fine-tune -> export-hf -> GPT2LMHeadModel.from_pretrained.
"""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from _gpt2 import randomize_gpt2
from transformers import GPT2Config, GPT2LMHeadModel

from jaxdl import config as config_lib
from jaxdl.checkpoint.read import load_params
from jaxdl.interop import import_checkpoint
from jaxdl.interop.hf_export import export_hf
from jaxdl.models import create_model
from jaxdl.training.trainer import train

TINY = Path(__file__).parents[2] / "fixtures" / "hub" / "gpt2_tiny"
TOL = 1e-4


def _jaxdl_logits(workdir: Path, ids: np.ndarray) -> np.ndarray:
    cfg = json.loads((workdir / "config.json").read_text())
    with jax.default_matmul_precision("highest"):
        model = create_model(cfg["model"])
        return np.asarray(model.apply({"params": load_params(workdir)}, ids))


def _torch_logits(folder: Path, ids: np.ndarray) -> np.ndarray:
    model = GPT2LMHeadModel.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(torch.from_numpy(ids.astype(np.int64))).logits.float().numpy()


def test_tiny_fixture_matches_transformers_live(tmp_path):
    ids = np.random.default_rng(1).integers(0, 512, (3, 40)).astype(np.int32)
    import_checkpoint("hf:gpt2", str(TINY), tmp_path / "w")
    diff = np.abs(_jaxdl_logits(tmp_path / "w", ids) - _torch_logits(TINY, ids)).max()
    assert diff <= TOL


def test_gpt2_124m_random_weights(tmp_path):
    torch.manual_seed(0)
    # std 0.2 * sqrt(32 / 768): the tiny fixture's gain per matmul at width 768. At std 0.2
    # the attention logits reach the hundreds and float32 rounding alone moves the output
    # by ~5e-3, whoever computes it.
    model = randomize_gpt2(GPT2LMHeadModel(GPT2Config()), std=0.04)  # gpt2's 124M architecture
    assert sum(p.numel() for p in model.parameters()) == 124_439_808
    model.save_pretrained(tmp_path / "gpt2")
    ids = np.random.default_rng(0).integers(0, 50257, (2, 64)).astype(np.int32)
    with torch.no_grad():
        want = model(torch.from_numpy(ids.astype(np.int64))).logits.float().numpy()
    del model
    report = import_checkpoint("hf:gpt2", str(tmp_path / "gpt2"), tmp_path / "w")
    assert len(report["loaded"]) == 4 + 12 * 16
    got = _jaxdl_logits(tmp_path / "w", ids)
    assert np.abs(want).max() > 1.0
    assert np.abs(got - want).max() <= TOL


def test_lora_finetune_then_export_hf_matches_transformers(tmp_path):
    imported = tmp_path / "imported"
    import_checkpoint("hf:gpt2", str(TINY), imported)
    cfg = config_lib.load_config(imported / "config.json")
    cfg.init_from.checkpoint = str(imported)
    cfg.lora = {"rank": 4, "alpha": 8.0, "targets": r"params/.*/(query|value|fc1)/kernel"}
    cfg.optimizer.name, cfg.optimizer.learning_rate = "adam", 1e-2
    cfg.data.seq_len, cfg.data.batch_size = 32, 8
    cfg.num_steps, cfg.eval_every, cfg.best_metric = 5, 5, ""
    train(cfg, tmp_path / "lora", progress=False)
    export_hf(tmp_path / "lora", tmp_path / "hf")
    ids = np.random.default_rng(2).integers(0, 512, (2, 48)).astype(np.int32)
    got = _jaxdl_logits(tmp_path / "lora", ids)
    # fine-tuning moved the weights: the exported model is not the imported one
    assert np.abs(got - _jaxdl_logits(imported, ids)).max() > 1e-2
    assert np.abs(got - _torch_logits(tmp_path / "hf", ids)).max() <= TOL


def test_scale_attn_by_inverse_layer_idx_changes_the_logits():
    """A refused flag matters: with it on, transformers' own logits move past tolerance."""
    ids = torch.from_numpy(np.random.default_rng(3).integers(0, 512, (2, 32)))
    base = GPT2LMHeadModel.from_pretrained(TINY).eval()
    other = GPT2LMHeadModel.from_pretrained(TINY, scale_attn_by_inverse_layer_idx=True).eval()
    with torch.no_grad():
        assert float((base(ids).logits - other(ids).logits).abs().max()) > 10 * TOL


def test_pytorch_model_bin_and_bf16_import(tmp_path):
    """A pytorch_model.bin as older transformers wrote it (the whole state dict, tied
    lm_head.weight included; read with torch.load weights_only) and a bfloat16 checkpoint
    (loaded as float32, each leaf reported as cast)."""
    model = GPT2LMHeadModel.from_pretrained(TINY)
    (tmp_path / "bin").mkdir()
    shutil.copyfile(TINY / "config.json", tmp_path / "bin" / "config.json")
    state = model.state_dict()
    assert "lm_head.weight" in state
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    ids = np.random.default_rng(4).integers(0, 512, (2, 24)).astype(np.int32)
    report = import_checkpoint("hf:gpt2", str(tmp_path / "bin"), tmp_path / "w_bin")
    assert "lm_head.weight" in report["ignored"]  # the tied copy, checked equal to wte
    assert np.abs(_jaxdl_logits(tmp_path / "w_bin", ids) - _torch_logits(TINY, ids)).max() <= TOL
    report = import_checkpoint("hf:gpt2", str(tmp_path / "bf16"), tmp_path / "w_bf16")
    assert {tuple(c[1:]) for c in report["dtype_cast"]} == {("bfloat16", "float32")}
    assert len(report["dtype_cast"]) == len(report["loaded"])
    want = _torch_logits(tmp_path / "bf16", ids)  # transformers computes in bfloat16 here
    assert np.abs(_jaxdl_logits(tmp_path / "w_bf16", ids) - want).max() < 0.5


class _RunsCode:
    def __reduce__(self):  # what a malicious pickle does on load
        return (print, ("this must never run",))


@pytest.mark.parametrize("content", ["truncated", "code", "module"])
def test_bad_torch_pickles_are_refused_in_one_line(tmp_path, content, capsys):
    from jaxdl.errors import UserError

    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(TINY / "config.json", src / "config.json")
    path = src / "pytorch_model.bin"
    if content == "truncated":
        torch.save({"wte.weight": torch.ones(64, 64)}, path)
        path.write_bytes(path.read_bytes()[:-2000])
    elif content == "code":
        torch.save({"wte.weight": _RunsCode()}, path)
    else:
        torch.save(torch.nn.Linear(2, 2), path)  # a module, not a state dict
    match = "could not be read" if content == "truncated" else "holds objects other than tensors"
    with pytest.raises(UserError, match=match) as err:
        import_checkpoint("hf:gpt2", str(src), tmp_path / "w")
    assert "\n" not in str(err.value) and not (tmp_path / "w").exists()
    assert "this must never run" not in capsys.readouterr().out
