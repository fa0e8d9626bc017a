"""What a fine-tuning run inherits from the base it starts from (``init_from.checkpoint``).

    model = {"name": "base", ...}   the base workdir's model section (keys given here on
                                    top: dtype, remat, scan_layers, dropout_rate, ...)
    data.tokenizer = "base"         the base workdir's tokenizer (and its chat template)

So a shipped config (``--config sft``) fine-tunes whatever model was imported, and the
run's resolved config.json names the concrete architecture and tokenizer file. Imported
image classifiers also pass on their preprocessing (`vision.with_source_preprocessing`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from jaxdl.errors import UserError
from jaxdl.interop.vision import with_source_preprocessing

BASE = "base"


def _base_config(checkpoint: str) -> dict[str, Any]:
    if not checkpoint:
        raise UserError(
            'model.name: "base" takes the model of init_from.checkpoint, which is unset. Fix: '
            "pass --config.init_from.checkpoint=WORKDIR (e.g. a `jaxdl import` workdir)."
        )
    path = Path(checkpoint).expanduser() / "config.json"
    if not path.is_file():
        raise UserError(
            f'init_from.checkpoint: no config.json in {path.parent} (a "base" model or '
            "tokenizer is read from it). Fix: point it at a jaxdl workdir (a run or an import)."
        )
    return json.loads(path.read_text())


def with_base(cfg: Any) -> Any:
    """`cfg` (a ConfigDict) with the base's model, tokenizer and preprocessing where it
    asks for them; a copy."""
    inherits_model = cfg.model.get("name") == BASE
    inherits_tokenizer = cfg.data.get("tokenizer") == BASE
    if inherits_model or inherits_tokenizer:
        base = _base_config(cfg.init_from.checkpoint)
        cfg = copy.deepcopy(cfg)
        if inherits_model:
            own = {k: v for k, v in cfg.model.to_dict().items() if k != "name"}
            with cfg.unlocked():
                cfg.model = {**base["model"], **own}
        if inherits_tokenizer:
            cfg.data.tokenizer = base.get("data", {}).get("tokenizer", "bytes")
    return with_source_preprocessing(cfg)
