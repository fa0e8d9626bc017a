"""`jaxdl export-hf`: a GPT-2 or Llama-family workdir back to Hugging Face's format.

    DIR/config.json                the architecture (GPT2Config, LlamaConfig, Qwen2Config, ...)
    DIR/model.safetensors          the CausalLM's state dict, float32 (LoRA adapters merged);
                                   above `max_shard_bytes`, model-0000i-of-0000n.safetensors
                                   shards and model.safetensors.index.json, as save_pretrained
    DIR/tokenizer.json             the run's tokenizer, when it has one (data.tokenizer), with
    DIR/tokenizer_config.json      its chat template and special tokens, and
    DIR/generation_config.json     its end-of-turn ids

``transformers.AutoModelForCausalLM.from_pretrained(DIR)`` loads it and gives the
workdir's logits. Written to a temporary sibling folder and renamed at the end.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from jaxdl.errors import UserError
from jaxdl.interop import gpt2, llama, lm_files
from jaxdl.interop.workdir import check_out, staging

MAX_SHARD_BYTES = 5 * 2**30  # save_pretrained's long-standing default, "5GB"


def write_safetensors(state: dict[str, np.ndarray], folder: Path, max_shard_bytes: int) -> None:
    """model.safetensors, or shards + index when the weights exceed `max_shard_bytes`."""
    from safetensors.numpy import save_file

    total = sum(v.nbytes for v in state.values())
    if total <= max_shard_bytes:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, value in state.items():
        if shards[-1] and size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += value.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def export_hf(
    workdir: str | os.PathLike,
    out: str | os.PathLike,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    *,
    base: bool = False,
) -> dict[str, Any]:
    """Write the latest checkpoint of `workdir` to `out`; returns {"files", "params"}.

    ``base``: a LoRA run's base without its adapters (`jaxdl export-hf --base`), the model
    its PEFT adapter (`--adapter`) goes on; for a QLoRA run that is the dequantized base."""
    from jaxdl import config as config_lib
    from jaxdl.checkpoint.read import load_params

    workdir, out = Path(workdir), Path(out).absolute()
    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise UserError(
            f"--workdir: no config.json in {workdir}. Fix: pass a jaxdl workdir (a run or an "
            "import)."
        )
    cfg = config_lib.load_config(config_path)
    if base and cfg.lora is None:
        raise UserError(
            f"--base: {workdir} holds no LoRA adapters (its config has lora=None), so its "
            "base is the model itself. Fix: export it without --base, or pass a LoRA run's "
            "workdir."
        )
    model_cfg = cfg.model.to_dict()
    tokenizer = cfg.data.tokenizer
    lm = lm_files.from_workdir(workdir, "none" if tokenizer == "bytes" else tokenizer)
    if model_cfg.get("name") == "llama":
        source = _source_config(workdir)
        special = {k: lm.generation_config.get(k) for k in lm_files.GENERATION_KEYS}
        hf_config = llama.hf_config(model_cfg, special, preferred=source.get("model_type"))
        check_out(out)
        state = llama.to_state_dict(load_params(workdir, merge_lora=not base), model_cfg)
    else:
        hf_config = gpt2.hf_config(model_cfg)
        check_out(out)
        state = gpt2.to_state_dict(load_params(workdir, merge_lora=not base), model_cfg)
    with staging(out, "export") as tmp:
        write_safetensors(state, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if model_cfg.get("name") == "llama":
            for name, data in lm.assets().items():
                (tmp / name).write_bytes(data)
        elif lm.tokenizer is not None:  # GPT-2 runs carry a bare tokenizer.json
            (tmp / "tokenizer.json").write_bytes(lm.tokenizer)
    return {
        "files": sorted(p.name for p in out.iterdir()),
        "params": int(sum(v.size for v in state.values())),
    }


def _source_config(workdir: Path) -> dict[str, Any]:
    """The Hugging Face config.json an imported workdir came from ({} for others)."""
    report = workdir / "import_report.json"
    if not report.is_file():
        return {}
    return json.loads(report.read_text()).get("source", {}).get("hf_config") or {}
