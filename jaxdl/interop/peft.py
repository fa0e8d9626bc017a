"""PEFT LoRA adapters <-> jaxdl's LoRA adapters, for the Llama family.

    DIR/adapter_config.json          peft_type LORA, r, lora_alpha, target_modules
    DIR/adapter_model.safetensors    base_model.model.<module>.lora_A.weight [r, in]
                                     base_model.model.<module>.lora_B.weight [out, r]

jaxdl's adapter of a kernel W [in, out] is ``W + (alpha / r) A B`` with A [in, r], B
[r, out]; torch's Linear holds W^T, so PEFT's ``W^T + (lora_alpha / r) lora_B lora_A`` is
the same update with lora_A = A^T, lora_B = B^T. Module names come from the one weight
table in `jaxdl.interop.llama`. `peft.PeftModel.from_pretrained(base, DIR)` on the
base's export-hf folder gives the merged export's logits (for a QLoRA run, on its
dequantized base, ``export-hf --base``); `read_adapter` brings such a folder back as the
starting adapters of a run (``init_from.adapter``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxdl.checkpoint.deferred import split_layers
from jaxdl.core import tree as tree_lib
from jaxdl.errors import UserError
from jaxdl.interop import llama
from jaxdl.interop.workdir import check_out, staging

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


def module_names(model_cfg: Mapping[str, Any]) -> dict[str, str]:
    """{jaxdl kernel path "params/layer_3/attn/q_proj/kernel": HF module
    "model.layers.3.self_attn.q_proj"} for every projection of the architecture."""
    spec = llama.llama_spec(model_cfg)
    out = {}
    for path, key, how in llama.table_for(spec):
        if how != "linear":
            continue
        for i in range(spec.num_layers) if "{i}" in path else [None]:
            out["params/" + path.format(i=i)] = key.format(i=i).removesuffix(".weight")
    return out


def export_adapter(workdir: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Write the LoRA adapters of `workdir`'s latest checkpoint as a PEFT folder `out`."""
    from safetensors.numpy import save_file

    from jaxdl.checkpoint.load import load_run_config
    from jaxdl.checkpoint.read import load_adapters

    workdir, out = Path(workdir), Path(out).absolute()
    cfg = load_run_config(workdir)
    if cfg.model.name != "llama":
        raise UserError(
            f"--adapter: model.name={cfg.model.name!r}; PEFT adapters are written for the "
            "Llama family (model.name='llama'). Fix: export the merged model without --adapter."
        )
    adapters, lora_cfg = load_adapters(workdir)
    names = module_names(cfg.model.to_dict())
    flat = split_layers(tree_lib.flatten(adapters), llama.STACKED)
    tensors, targets = {}, []
    for kernel, module in names.items():
        if f"{kernel}/a" not in flat:
            continue
        targets.append(module)
        a, b = flat.pop(f"{kernel}/a"), flat.pop(f"{kernel}/b")
        tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a.T, np.float32)
        tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b.T, np.float32)
    if flat:
        raise UserError(
            f"--adapter: adapters on {sorted(flat)[:3]} have no PEFT module (only the "
            "attention and MLP projections do). Fix: export the merged model without --adapter."
        )
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": int(lora_cfg["rank"]),
        "lora_alpha": float(lora_cfg["alpha"]),
        "target_modules": sorted(targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "base_model_name_or_path": str(cfg.init_from.checkpoint or ""),
    }
    check_out(out)
    with staging(out, "adapter") as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    result = {
        "files": sorted(p.name for p in out.iterdir()),
        "params": int(sum(v.size for v in tensors.values())),
    }
    if lora_cfg.get("quantize"):
        # The adapters learned over the quantized base; over the float base they started
        # from, they would be off by the quantization's rounding.
        result["note"] = (
            f"trained over a {lora_cfg['quantize']} base: load it on `jaxdl export-hf --base "
            f"--workdir {workdir}` (the dequantized base), not on the float base"
        )
    return result


def read_adapter(
    folder: str | os.PathLike,
    template: Mapping[str, Any],
    model_cfg: Mapping[str, Any],
    lora_cfg: Mapping[str, Any],
) -> dict:
    """A PEFT adapter folder -> adapters shaped like `template` (the run's fresh adapters,
    `jaxdl.finetune.lora.init_adapters`); its r and lora_alpha must be the run's."""
    from safetensors.numpy import load_file

    folder = Path(folder).expanduser()
    config_path = folder / CONFIG_FILE
    if not config_path.is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise UserError(
            f"init_from.adapter: expected {CONFIG_FILE} and {WEIGHTS_FILE} in {folder}. Fix: "
            "pass a PEFT adapter folder (save_pretrained of a PeftModel, or jaxdl export-hf "
            "--adapter)."
        )
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("use_rslora"):
        raise UserError(
            f"init_from.adapter: {config_path} is a {config.get('peft_type')} adapter "
            f"(use_dora={config.get('use_dora')}, use_rslora={config.get('use_rslora')}); jaxdl "
            "reads plain LoRA. Fix: train the adapter with plain LoRA."
        )
    for ours, theirs in (("rank", "r"), ("alpha", "lora_alpha")):
        if float(lora_cfg[ours]) != float(config.get(theirs, -1)):
            raise UserError(
                f"lora.{ours}: the run has {lora_cfg[ours]}, the adapter {folder} has "
                f"{theirs}={config.get(theirs)}. Fix: set --config.lora.{ours}="
                f"{config.get(theirs)}."
            )
    state = load_file(str(folder / WEIGHTS_FILE))
    names = module_names(model_cfg)
    used: set[str] = set()

    def fetch(kernel: str, part: str) -> np.ndarray:
        key = f"{PREFIX}{names.get(kernel, kernel)}.lora_{part.upper()}.weight"
        if key not in state:
            raise UserError(
                f"init_from.adapter: {folder} has no weights for {kernel} (expected {key}). "
                "Fix: set lora.targets to the adapter's target_modules "
                f"{config.get('target_modules')}."
            )
        used.add(key)
        return np.asarray(state[key], np.float32).T

    out = {}
    for path, value in tree_lib.flatten(template).items():
        kernel, part = path.rsplit("/", 1)
        prefix = next((p for p in llama.STACKED if kernel.startswith(p + "/")), None)
        if prefix is not None:  # scanned: one stacked adapter per kernel
            rest, layer = kernel[len(prefix) :], llama.STACKED[prefix]
            array = np.stack([fetch(layer.format(i) + rest, part) for i in range(value.shape[0])])
        else:
            array = fetch(kernel, part)
        if array.shape != tuple(value.shape):
            raise UserError(
                f"init_from.adapter: {kernel}'s adapter {part.upper()} has shape "
                f"{array.shape}, the model's needs {tuple(value.shape)}. Fix: use an adapter "
                "trained on this base model."
            )
        out[path] = array
    if unused := sorted(set(state) - used):
        raise UserError(
            f"init_from.adapter: {len(unused)} adapter weights match no lora.targets kernel, "
            f"e.g. {unused[0]}. Fix: widen lora.targets to the adapter's target_modules "
            f"{config.get('target_modules')}."
        )
    return tree_lib.unflatten(out)
