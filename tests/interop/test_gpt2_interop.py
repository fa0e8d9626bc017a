"""GPT-2 import and export against golden fixtures (torch-free).

tests/fixtures/hub/gpt2_tiny is a GPT-2 that transformers itself wrote, with random weights
made hard to fool, and gpt2_tiny_ref.npz holds transformers' logits for two inputs
(tests/fixtures/make_hub_fixtures.py). Parity is within 1e-4 at float32 and highest matmul
precision; each deliberate mistake (LayerNorm epsilon, GELU form, qkv order, a transposed
square kernel) must miss by more than 10x that.
"""

import copy
import json
import shutil
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxdl.checkpoint.read import load_params
from jaxdl.errors import UserError
from jaxdl.interop import gpt2, import_checkpoint, readers
from jaxdl.interop.hf_export import export_hf
from jaxdl.models import create_model
from jaxdl.testing import subprocess_env

# One xdist worker runs this module (--dist loadgroup): its module fixtures are made once.
pytestmark = pytest.mark.xdist_group("test_gpt2_interop")

FIXTURES = Path(__file__).parents[1] / "fixtures" / "hub"
TINY = FIXTURES / "gpt2_tiny"
TOL = 1e-4


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FIXTURES / "gpt2_tiny_ref.npz"))


@pytest.fixture(scope="module")
def imported():
    hf = json.loads((TINY / "config.json").read_text())
    state, _ = readers.read_state_dict(TINY)
    model_cfg = gpt2.model_config(hf)
    variables, report = gpt2.convert_state(state, model_cfg)
    return model_cfg, variables, report, state


def _logits(model_cfg, variables, ids) -> np.ndarray:
    with jax.default_matmul_precision("highest"):
        return np.asarray(create_model(model_cfg).apply(variables, ids))


def _err(model_cfg, variables, ref) -> float:
    return float(np.abs(_logits(model_cfg, variables, ref["input_ids"]) - ref["logits"]).max())


def test_model_config_reads_the_architecture(imported):
    model_cfg, _, report, _ = imported
    assert model_cfg == {
        "name": "transformer",
        "size": "small",
        "vocab_size": 512,
        "num_layers": 2,
        "num_heads": 4,
        "embed_dim": 32,
        "mlp_ratio": 4,
        "max_len": 64,
        "positions": "learned",
        "mlp": "gelu",
        "layernorm_eps": 1e-3,
        "dropout_rate": 0.1,
    }
    # 4 top-level leaves + 16 per block; nothing cast, nothing ignored (no attn.bias buffers)
    assert len(report["loaded"]) == 4 + 2 * 16
    assert report["dtype_cast"] == [] and report["unexpected"] == []


@pytest.mark.parametrize("scan_layers", [False, True])
def test_logits_match_transformers(imported, ref, scan_layers):
    model_cfg, _, _, state = imported
    model_cfg = {**model_cfg, "scan_layers": scan_layers}
    variables, _ = gpt2.convert_state(state, model_cfg)
    assert np.abs(ref["logits"]).max() > 1.0  # the reference is not near zero
    assert _err(model_cfg, variables, ref) <= TOL


def _swap_qk(variables):
    v = copy.deepcopy(variables)
    attn = v["params"]["block_0"]["attn"]
    attn["query"], attn["key"] = attn["key"], attn["query"]
    return v


def _transpose_out(variables):
    v = copy.deepcopy(variables)
    out = v["params"]["block_1"]["attn"]["out"]
    out["kernel"] = np.ascontiguousarray(out["kernel"].T)  # [32, 32]: same shape, wrong layout
    return v


@pytest.mark.parametrize(
    "mistake",
    ["flax_layernorm_eps", "gpt2_layernorm_eps", "exact_gelu", "qk_order", "transposed_kernel"],
)
def test_each_mistake_misses_by_10x_the_tolerance(imported, ref, mistake):
    model_cfg, variables, _, _ = imported
    if mistake == "flax_layernorm_eps":
        model_cfg = {**model_cfg, "layernorm_eps": 1e-6}
    elif mistake == "gpt2_layernorm_eps":
        model_cfg = {**model_cfg, "layernorm_eps": 1e-5}
    elif mistake == "exact_gelu":
        model_cfg = {**model_cfg, "gelu_approximate": False}
    elif mistake == "qk_order":
        variables = _swap_qk(variables)
    else:
        variables = _transpose_out(variables)
    assert _err(model_cfg, variables, ref) > 10 * TOL


@pytest.mark.parametrize(
    "flag, value",
    [
        ("scale_attn_by_inverse_layer_idx", True),
        ("reorder_and_upcast_attn", True),
        ("tie_word_embeddings", False),
        ("activation_function", "relu"),
        ("model_type", "llama"),
    ],
)
def test_unsupported_config_is_refused_in_one_line(flag, value):
    hf = json.loads((TINY / "config.json").read_text())
    hf[flag] = value
    with pytest.raises(UserError, match=f"config.json: {flag}=") as err:
        gpt2.model_config(hf)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"n_head": None}, ["expected positive integers", "{'n_head': None}"]),
        ({"n_layer": "2"}, ["{'n_layer': '2'}"]),
        ({"n_head": 5}, ["n_head=5 is not supported", "n_embd=32 is not a multiple of it"]),
    ],
    ids=["missing-n_head", "string-n_layer", "n_head-not-dividing"],
)
def test_missing_or_bad_sizes_name_the_source_field(change, words):
    hf = json.loads((TINY / "config.json").read_text())
    hf.update(change)
    hf = {k: v for k, v in hf.items() if v is not None}
    with pytest.raises(UserError) as err:
        gpt2.model_config(hf)
    for word in ["config.json: ", *words]:
        assert word in str(err.value)


def test_import_writes_a_workdir_that_reproduces_the_logits(tmp_path, ref):
    out = tmp_path / "gpt2"
    report = import_checkpoint("hf:gpt2", str(TINY), out)
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoints",
        "config.json",
        "generation_config.json",
        "import_report.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    saved = json.loads((out / "import_report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    weights = next(f for f in saved["source"]["files"] if f["name"] == "model.safetensors")
    assert weights["sha256"] == readers.sha256(TINY / "model.safetensors")
    assert saved["source"]["kind"] == "hf:gpt2" and saved["step"] == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["tokenizer"] == str(out / "tokenizer.json")
    params = load_params(out)
    assert _err(cfg["model"], {"params": params}, ref) <= TOL
    assert not list(tmp_path.glob(".*tmp*"))


def test_bf16_and_fp16_sources_load_and_are_reported_as_cast(tmp_path, imported, ref):
    model_cfg, _, _, state = imported
    for dtype, tol in ((np.float16, 0.05), (ml_dtypes.bfloat16, 0.5)):
        low = {k: v.astype(dtype) for k, v in state.items()}
        variables, report = gpt2.convert_state(low, model_cfg)
        assert len(report["dtype_cast"]) == len(report["loaded"])
        assert report["dtype_cast"][0][1:] == [np.dtype(dtype).name, "float32"]
        assert variables["params"]["ln_f"]["scale"].dtype == np.float32
        assert TOL < _err(model_cfg, variables, ref) < tol
    src = tmp_path / "bf16"
    shutil.copytree(TINY, src)
    save_file(
        {k: v.astype(ml_dtypes.bfloat16) for k, v in state.items()}, src / "model.safetensors"
    )
    report = import_checkpoint("hf:gpt2", str(src), tmp_path / "out")
    assert len(report["dtype_cast"]) == 36


def _broken_source(tmp_path: Path, how: str) -> Path:
    src = tmp_path / "src"
    shutil.copytree(TINY, src)
    if how == "truncated":
        data = (src / "model.safetensors").read_bytes()
        (src / "model.safetensors").write_bytes(data[: len(data) - 1000])
    elif how == "other_architecture":  # weights of a 3-layer model, config of 2 layers
        state = load_file(src / "model.safetensors")
        for key in [k for k in state if ".h.1." in k]:
            state[key.replace(".h.1.", ".h.2.")] = state[key]
        save_file(state, src / "model.safetensors")
    elif how == "missing":
        (src / "model.safetensors").unlink()
    return src


@pytest.mark.parametrize(
    "how, message",
    [
        ("truncated", r"model.safetensors could not be read as a state dict"),
        ("other_architecture", r"12 source keys unused: h\.2\.attn\.c_attn\.bias, "),
        ("missing", r"holds none of \['model.safetensors'"),
    ],
)
def test_bad_sources_fail_in_one_line_without_a_workdir(tmp_path, how, message):
    src = _broken_source(tmp_path, how)
    with pytest.raises(UserError, match=message) as err:
        import_checkpoint("hf:gpt2", str(src), tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))


def test_cli_import_and_bad_config_exit_codes(tmp_path):
    import subprocess

    src = tmp_path / "src"
    shutil.copytree(TINY, src)
    hf = json.loads((src / "config.json").read_text())
    hf["scale_attn_by_inverse_layer_idx"] = True
    (src / "config.json").write_text(json.dumps(hf))
    cmd = [sys.executable, "-m", "jaxdl.cli", "import", "hf:gpt2", "--from"]
    bad = subprocess.run(
        [*cmd, str(src), "--out", str(tmp_path / "bad")],
        capture_output=True,
        text=True,
        env=subprocess_env(),
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "jaxdl: error: config.json: scale_attn_by_inverse_layer_idx=True is not supported "
        "(jaxdl has no per-layer attention scale). Fix: import a standard GPT-2 checkpoint "
        "(gpt2, gpt2-medium/-large/-xl, distilgpt2)."
    ]
    assert not (tmp_path / "bad").exists()
    good = subprocess.run(
        [*cmd, str(TINY), "--out", str(tmp_path / "good")],
        capture_output=True,
        text=True,
        env=subprocess_env(),
    )
    assert good.returncode == 0, good.stderr
    assert "36 leaves loaded, 0 source keys ignored, 0 cast" in good.stdout


def test_export_hf_writes_the_source_state_dict_back(tmp_path, imported):
    _, _, _, state = imported
    import_checkpoint("hf:gpt2", str(TINY), tmp_path / "w")
    result = export_hf(tmp_path / "w", tmp_path / "hf")
    assert result["files"] == ["config.json", "model.safetensors", "tokenizer.json"]
    back = load_file(tmp_path / "hf" / "model.safetensors")
    assert sorted(back) == sorted(state)
    for key, value in state.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert gpt2.model_config(hf) == gpt2.model_config(
        json.loads((TINY / "config.json").read_text())
    )


def test_export_hf_refuses_a_non_gpt2_workdir(tmp_path):
    (tmp_path / "w").mkdir()
    cfg = {"num_steps": 1, "model": {"name": "transformer", "size": "tiny", "positions": "rope"}}
    (tmp_path / "w" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="model.positions='rope'"):
        export_hf(tmp_path / "w", tmp_path / "hf")


def test_sharded_index_imports_like_the_single_file(tmp_path, imported, ref):
    model_cfg, _, _, state = imported
    src = tmp_path / "sharded"
    src.mkdir()
    shutil.copyfile(TINY / "config.json", src / "config.json")
    keys = sorted(state)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, src / name)
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {}, "weight_map": weight_map}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    report = import_checkpoint("hf:gpt2", str(src), tmp_path / "w")
    names = [f["name"] for f in report["source"]["files"]]
    assert names[1:] == [
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert _err(model_cfg, {"params": load_params(tmp_path / "w")}, ref) <= TOL


def test_torch_pickles_need_torch_and_say_so(tmp_path, monkeypatch):
    src = tmp_path / "bin"
    shutil.copytree(TINY, src)
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(UserError, match=r"torch is not installed. Fix: `pip install torch`"):
        import_checkpoint("hf:gpt2", str(src), tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_a_hub_name_without_huggingface_hub_says_to_pass_a_path(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(UserError, match="not a local path and huggingface_hub is not installed"):
        import_checkpoint("hf:gpt2", "openai-community/gpt2", tmp_path / "w")


def test_a_hub_name_offline_says_to_pass_a_path(tmp_path, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"could not download 'openai-community/gpt2'") as err:
        import_checkpoint("hf:gpt2", "openai-community/gpt2", tmp_path / "w")
    assert str(err.value).endswith(
        "Fix: pass a local path to the model's folder or weights file instead."
    )
    assert "\n" not in str(err.value)


def test_import_evaluate_lora_finetune_export_hf_round_trip(tmp_path, ref):
    """import -> evaluate -> init_from + LoRA steps -> export-hf -> import again: the
    re-imported model gives the fine-tuned run's logits."""
    from jaxdl import config as config_lib
    from jaxdl.training.evaluate import evaluate_workdir
    from jaxdl.training.trainer import train

    imported = tmp_path / "imported"
    import_checkpoint("hf:gpt2", str(TINY), imported)
    metrics = evaluate_workdir(imported)  # an imported LM holds pydoc test text out (0.1)
    assert metrics["split"] == "test"
    assert metrics["step"] == 0 and 0 < metrics["loss"] < 20
    cfg = config_lib.load_config(imported / "config.json")
    cfg.init_from.checkpoint = str(imported)
    cfg.lora = {"rank": 4, "alpha": 8.0, "targets": r"params/.*/(query|value|fc2)/kernel"}
    cfg.optimizer.name, cfg.optimizer.learning_rate = "adam", 1e-2
    cfg.data.batch_size, cfg.num_steps, cfg.eval_every, cfg.best_metric = 8, 3, 3, ""
    summary = train(cfg, tmp_path / "lora", progress=False)
    assert summary["trainable_params"] == 2 * (2 * 4 * (32 + 32) + 4 * (128 + 32))  # 2 layers
    export_hf(tmp_path / "lora", tmp_path / "hf")
    import_checkpoint("hf:gpt2", str(tmp_path / "hf"), tmp_path / "again")
    model_cfg = json.loads((imported / "config.json").read_text())["model"]
    tuned = _logits(model_cfg, {"params": load_params(tmp_path / "lora")}, ref["input_ids"])
    again = _logits(model_cfg, {"params": load_params(tmp_path / "again")}, ref["input_ids"])
    assert np.abs(tuned - ref["logits"]).max() > 1e-2  # the adapters moved the model
    np.testing.assert_array_equal(again, tuned)


def test_to_state_dict_inverts_the_import_in_both_layouts(imported):
    model_cfg, _, _, state = imported
    for scan_layers in (False, True):
        cfg = {**model_cfg, "scan_layers": scan_layers}
        variables, _ = gpt2.convert_state(state, cfg)
        back = gpt2.to_state_dict(variables["params"], cfg)
        assert sorted(back) == sorted(state)
        for key, value in state.items():
            np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_a_tied_lm_head_copy_is_ignored_an_untied_one_refused(imported):
    model_cfg, _, _, state = imported
    wte = state["transformer.wte.weight"]
    _, report = gpt2.convert_state({**state, "lm_head.weight": wte.copy()}, model_cfg)
    assert report["ignored"] == ["lm_head.weight"]
    with pytest.raises(UserError, match=r"lm_head.weight='untied' is not supported"):
        gpt2.convert_state({**state, "lm_head.weight": wte + 1.0}, model_cfg)


def test_staging_renames_on_success_and_leaves_nothing_otherwise(tmp_path):
    import subprocess

    from jaxdl.interop.workdir import staging

    dead = subprocess.Popen(["true"])
    dead.wait()  # a PID no longer running: its leftover is a killed run's
    stale = tmp_path / f".w.import-tmp-{dead.pid}"
    stale.mkdir()
    with pytest.raises(KeyboardInterrupt):
        with staging(tmp_path / "w", "import") as tmp:
            (tmp / "half.json").write_text("{")
            raise KeyboardInterrupt
    assert sorted(tmp_path.iterdir()) == []  # neither the workdir, its tmp, nor the stale one
    with staging(tmp_path / "w", "import") as tmp:
        (tmp / "done.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]
    assert (tmp_path / "w" / "done.json").is_file()


def test_an_unknown_kind_lists_the_known_ones(tmp_path):
    with pytest.raises(
        UserError, match=r"KIND: expected one of \[.*'hf:gpt2'.*\], found 'hf:falcon'"
    ):
        import_checkpoint("hf:falcon", str(TINY), tmp_path / "w")
    assert not (tmp_path / "w").exists()
