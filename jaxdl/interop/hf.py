"""`jaxdl import hf:auto`: a Hugging Face ``save_pretrained`` folder, by its model_type.

``config.json``'s ``model_type`` picks the family: gpt2 (`jaxdl.interop.gpt2`), or llama,
mistral, qwen2, qwen3 (`jaxdl.interop.llama`). Weights come from ``model.safetensors``,
its sharded index, or a torch pickle, in any stored dtype (cast to float32, reported);
safetensors are read tensor by tensor. The tokenizer files travel with the model
(`jaxdl.interop.lm_files`); without them the import is weights-only, and says so.
"""

from __future__ import annotations

from pathlib import Path

from jaxdl.errors import UserError
from jaxdl.interop import gpt2, llama, lm_files, readers
from jaxdl.interop.workdir import Imported

KINDS = ("hf:auto", *(f"hf:{t}" for t in llama.MODEL_TYPES))


def import_llama(kind: str, path: Path, out: Path) -> Imported:
    """A Llama-family save_pretrained folder -> Imported."""
    hf = gpt2.read_config(path)
    want = kind.removeprefix("hf:")
    if want != "auto" and hf.get("model_type") != want:
        raise UserError(
            f"--from: {path}'s config.json says model_type={hf.get('model_type')!r}, the KIND "
            f"{kind!r} expects {want!r}. Fix: use `jaxdl import hf:auto`, which reads it."
        )
    model_cfg = llama.model_config(hf)
    state, files = readers.stream_state_dict(path)
    variables, report = llama.convert_state(state, model_cfg)
    del state
    folder = path if path.is_dir() else path.parent
    lm = lm_files.from_hf_folder(folder, hf)
    data = lm.data_config(out, model_cfg["max_len"])
    return Imported(
        config={"model": model_cfg, "data": data, "best_metric": "val_loss"},
        variables=variables,
        report=report,
        files=[folder / "config.json", *files],
        assets=lm.assets(),
        provenance={"hf_config": hf, **lm.provenance()},
    )


def import_auto(kind: str, path: Path, out: Path) -> Imported:
    """Dispatch on config.json's model_type."""
    model_type = gpt2.read_config(path).get("model_type")
    if model_type == "gpt2":
        return gpt2.import_gpt2(kind, path, out)
    if model_type in llama.MODEL_TYPES:
        return import_llama(kind, path, out)
    raise UserError(
        f"--from: config.json has model_type={model_type!r}; hf:auto imports "
        f"{['gpt2', *llama.MODEL_TYPES]}. Fix: import a model of one of these families."
    )
