"""Model registry: a config's ``model.name`` -> a Flax Linen module.

Every registered model is called as ``model(x, *, train: bool = False)`` and returns logits
(float32). Dropout draws from the "dropout" RNG stream; BatchNorm keeps its statistics in
the "batch_stats" collection.

A name can hold a Linen module class, a factory returning one, or an ``nnx.Module`` class.
An NNX class is built as ``Cls(**model_fields, rngs=nnx.Rngs(params=..., dropout=...))``
and runs as a Linen module (`jaxdl.models.nnx_module.NnxModule`), so the steps,
checkpoints, partition rules, LoRA, export and `load_model` see one kind of model: a pure
``apply`` over a variables tree (``nnx.Param`` -> "params", ``nnx.BatchStat`` ->
"batch_stats").

A model registered outside jaxdl remembers the file it was registered in: the trainer
writes it to config.json as ``model_file``, and `import_model_file` imports it again in a
later process (`jaxdl evaluate`, `load_model`, `export`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn

from jaxdl.errors import UserError

_PACKAGE = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class _Entry:
    factory: Callable[..., Any]  # what the user registered
    source: str  # the file it was registered in ("" when unknown)
    nnx: bool  # an nnx.Module class, run through the Linen bridge

    @property
    def builtin(self) -> bool:
        return self.source.startswith(str(_PACKAGE))


_MODELS: dict[str, _Entry] = {}


def _is_nnx_class(obj: Any) -> bool:
    if not isinstance(obj, type):
        return False
    from flax import nnx

    return issubclass(obj, nnx.Module)


def register_model(name: str):
    """Decorator: register a Linen module class, a factory returning one, or an
    ``nnx.Module`` class under `name` (the config's ``model.name``).

    Registering the same definition again (its file imported a second time) replaces it;
    another definition under a taken name is an error naming both files.
    """
    caller = inspect.currentframe().f_back
    source = str(Path(caller.f_globals.get("__file__") or "").resolve()) if caller else ""
    if source == str(Path().resolve()):
        source = ""  # registered from a REPL or `python -c`: no file to import again

    def wrap(factory):
        entry = _Entry(factory, source, _is_nnx_class(factory))
        old = _MODELS.get(name)
        if old is not None and (old.source, _qualname(old.factory)) != (
            entry.source,
            _qualname(factory),
        ):
            raise UserError(
                f"register_model({name!r}): the name is taken by {_qualname(old.factory)} "
                f"from {old.source or 'an interactive session'}, found a second model "
                f"{_qualname(factory)} from {source or 'an interactive session'}. Fix: "
                "register it under another name."
            )
        _MODELS[name] = entry
        return factory

    return wrap


register = register_model  # the name jaxdl's own model files use


def _qualname(obj: Any) -> str:
    return getattr(obj, "__qualname__", repr(obj))


def model_names() -> list[str]:
    return sorted(_MODELS)


def model_source(name: str) -> str:
    """The file that registered a model from outside jaxdl; "" for a built-in one."""
    entry = _MODELS.get(name)
    return "" if entry is None or entry.builtin else entry.source


def import_model_file(path: str, name: str) -> None:
    """Import the Python file that registers model `name` (a workdir's ``model_file``)."""
    if name in _MODELS:
        return
    file = Path(path)
    if not file.is_file():
        raise UserError(
            f"model_file: model {name!r} was registered in {path}, found no such file. "
            "Fix: restore the file, or set --config.model_file to where it lives now."
        )
    from jaxdl.userfile import run_user_file

    digest = hashlib.sha256(str(file.resolve()).encode()).hexdigest()[:8]
    run_user_file(file, f"jaxdl_model_{file.stem}_{digest}", flag="model_file")
    if name not in _MODELS:
        raise UserError(
            f"model_file: {path} registers no model {name!r} (it registers "
            f"{sorted(n for n in _MODELS if model_source(n) == str(file.resolve()))}). "
            f"Fix: decorate the model class with @jaxdl.register_model({name!r})."
        )


def _fields(entry: _Entry) -> tuple[set[str], set[str]] | None:
    """(accepted, required) fields of a model class; None when it takes **kwargs or is a
    plain factory function (which checks its own keyword arguments)."""
    factory = entry.factory
    if entry.nnx:
        params = list(inspect.signature(factory.__init__).parameters.values())[1:]
        if any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params):
            return None
        params = [p for p in params if p.name != "rngs"]
        required = {p.name for p in params if p.default is p.empty}
        return {p.name for p in params}, required
    if not (isinstance(factory, type) and dataclasses.is_dataclass(factory)):
        return None
    fields = [f for f in dataclasses.fields(factory) if f.init and f.name not in ("parent", "name")]
    required = {
        f.name
        for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    return {f.name for f in fields}, required


def option_names(name: str) -> set[str] | None:
    """The options (fields) the model `name` accepts; None for a plain factory function."""
    fields = _fields(_MODELS[name]) if name in _MODELS else None
    return None if fields is None else fields[0]


def _frozen(value: Any) -> Any:
    """Lists -> tuples, so an NNX model's fields hash (Linen modules compare by fields)."""
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    return value


def create_model(model_cfg: Mapping[str, Any]) -> nn.Module:
    """Build the module named by ``model_cfg["name"]`` with the remaining keys as fields."""
    cfg = dict(model_cfg)
    name = cfg.pop("name", None)
    if name not in _MODELS:
        raise UserError(
            f"model.name: expected one of {model_names()}, found {name!r}. Fix: set "
            "--config.model.name to a registered model, or --config.model_file to the "
            "Python file that registers it (@jaxdl.register_model)."
        )
    entry = _MODELS[name]
    fields = _fields(entry)
    if fields is not None:
        accepted, required = fields
        unknown = sorted(set(cfg) - accepted)
        if unknown:
            raise UserError(
                f"model.{unknown[0]}: model {name!r} has no such option; "
                f"expected one of {sorted(accepted)}. Fix: remove or rename it."
            )
        missing = sorted(required - set(cfg))
        if missing:
            raise UserError(
                f"model.{missing[0]}: model {name!r} needs it, found nothing. "
                f"Fix: set --config.model.{missing[0]}=VALUE."
            )
    if entry.nnx:
        from flax.core import FrozenDict

        from jaxdl.models.nnx_module import NnxModule

        return NnxModule(entry.factory, FrozenDict({k: _frozen(v) for k, v in cfg.items()}))
    return entry.factory(**cfg)
