"""An ``nnx.Module`` class run as a Linen module, so that NNX models share everything jaxdl
has for Linen ones (pure jitted steps over a variables tree, Orbax checkpoints, partition
rules, LoRA, export, `load_model`).

Each call builds the NNX object from its class and fields, loads the Linen variables into
it, calls it, and hands the state it mutated back to Linen:

    nnx.Param      <-> "params"          nnx.BatchStat <-> "batch_stats"
    (any Variable type <-> its registered collection name)

Under jit the rebuild is trace-time work only: the initializers' results are overwritten,
so XLA drops them (benchmarks/nnx_vs_linen.py times the step against the same Linen
model). Dropout streams are seeded from Linen's "dropout" key, which the train step derives
from the state's rng and step as for every model.

Why not `flax.nnx.bridge.ToLinen`: it hands Linen the NNX state with the integer keys of
``nnx.List`` indices, which jaxdl's "/"-joined parameter paths and Orbax turn into strings,
and then cannot load them back. Here Linen sees string keys only, and each NNX path is
matched exactly (``("hidden", 0, "kernel")`` <-> ``hidden/0/kernel``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
from flax.core import FrozenDict


class NnxModule(nn.Module):
    """``nnx_class(**kwargs, rngs=nnx.Rngs(params=..., dropout=...))``, called as
    ``module(x, **call_kwargs)`` (jaxdl passes ``train=``)."""

    nnx_class: Any
    kwargs: FrozenDict = FrozenDict()

    @nn.compact
    def __call__(self, x, **call_kwargs):
        from flax import nnx

        initializing = self.is_initializing()
        rngs = nnx.Rngs(
            params=self.make_rng("params") if initializing else 0,
            dropout=self.make_rng("dropout") if self.has_rng("dropout") else 0,
        )
        module = self.nnx_class(**self.kwargs, rngs=rngs)
        if initializing:
            self._put(module, lambda collection: True)
        else:
            nnx.update(module, _nnx_state(module, self.variables))
        out = module(x, **call_kwargs)
        if not initializing:
            self._put(module, self.is_mutable_collection)
        return out

    def _put(self, module, wanted) -> None:
        for collection, tree in linen_variables(module).items():
            if wanted(collection):
                for key, value in tree.items():
                    self.put_variable(collection, key, value)


def _variables(module):
    """(path, Variable) of the module's state, RNG streams left out (they are per call)."""
    from flax import nnx

    return nnx.to_flat_state(nnx.state(module, nnx.Not(nnx.RngState)))


def _collection(variable) -> str:
    from flax.nnx import variablelib

    return variablelib.variable_name_from_type(type(variable), allow_register=True)


def linen_variables(module) -> dict[str, dict]:
    """The NNX module's state as Linen collections with string keys."""
    out: dict[str, dict] = {}
    for path, variable in _variables(module):
        node = out.setdefault(_collection(variable), {})
        *parents, leaf = (str(k) for k in path)
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = variable.get_value()
    return out


def _nnx_state(module, variables) -> dict:
    """Linen variables (string keys) -> the nested dict `nnx.update` takes (NNX's keys)."""
    from flax import nnx

    flat = {}
    for path, variable in _variables(module):
        node = variables[_collection(variable)]
        for key in path:
            node = node[str(key)]
        flat[path] = node
    return nnx.traversals.unflatten_mapping(flat)
