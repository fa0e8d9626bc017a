"""`jaxdl export-hf`: a GPT-2-shaped workdir back to Hugging Face's format.

    DIR/config.json          GPT2Config (architecture from the workdir's model section)
    DIR/model.safetensors    GPT2LMHeadModel's state dict, float32 (LoRA adapters merged)
    DIR/tokenizer.json       the run's tokenizer, when it has one (data.tokenizer)

``transformers.GPT2LMHeadModel.from_pretrained(DIR)`` loads it and gives the workdir's
logits. Written to a temporary sibling folder and renamed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from jaxdl.errors import UserError
from jaxdl.interop import gpt2
from jaxdl.interop.workdir import check_out, staging


def export_hf(workdir: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Write the latest checkpoint of `workdir` to `out`; returns {"files", "params"}."""
    from safetensors.numpy import save_file

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
    model_cfg = cfg.model.to_dict()
    hf_config = gpt2.hf_config(model_cfg)
    check_out(out)
    state = gpt2.to_state_dict(load_params(workdir), model_cfg)
    tokenizer = cfg.data.tokenizer if cfg.data.tokenizer != "bytes" else None
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise UserError(
            f"data.tokenizer: {tokenizer} (named by {config_path}) does not exist. Fix: restore "
            "the tokenizer.json or the workdir."
        )
    with staging(out, "export") as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / "tokenizer.json")
    return {
        "files": sorted(p.name for p in out.iterdir()),
        "params": int(sum(v.size for v in state.values())),
    }
