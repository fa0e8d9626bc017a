"""Model registry: a config's ``model.name`` -> a Flax Linen module.

Every registered model is a Linen module whose ``__call__(x, *, train: bool = False)``
returns logits (float32). Dropout draws from the "dropout" RNG stream; BatchNorm keeps
its statistics in the "batch_stats" collection.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn

from jaxdl.errors import UserError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    """Decorator: register a module class (or a factory returning one) under `name`."""

    def wrap(factory):
        assert name not in _MODELS, f"model {name!r} registered twice"
        _MODELS[name] = factory
        return factory

    return wrap


def model_names() -> list[str]:
    return sorted(_MODELS)


def _fields(factory) -> tuple[set[str], set[str]] | None:
    """(accepted, required) fields of a module class; None for a plain factory function."""
    if not (isinstance(factory, type) and dataclasses.is_dataclass(factory)):
        return None  # a plain factory function checks its own keyword arguments
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


def create_model(model_cfg: Mapping[str, Any]) -> nn.Module:
    """Build the module named by ``model_cfg["name"]`` with the remaining keys as fields."""
    cfg = dict(model_cfg)
    name = cfg.pop("name", None)
    if name not in _MODELS:
        raise UserError(
            f"model.name: expected one of {model_names()}, found {name!r}. "
            "Fix: set --config.model.name to a registered model."
        )
    factory = _MODELS[name]
    fields = _fields(factory)
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
    return factory(**cfg)
