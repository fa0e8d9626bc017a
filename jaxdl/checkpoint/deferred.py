"""Leaves that are made while the checkpoint writes them, one at a time.

An import converts a whole model (SmolLM2: 538 MB of float32; a Llama-3-8B: 32 GB), and
Orbax writes a state only once every leaf exists, so a state built first and saved after
holds the whole model in memory. A `Deferred` leaf says what the array will be (shape,
dtype) and how to make it; a `Checkpointer(..., deferred=True)` makes each such leaf when
its write starts, writes it and drops it, so the save holds two leaves at a time (the one
being written and the next, being made). What lands on disk is an ordinary numpy leaf of
the TrainState: restores and readers see no difference.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import future


@dataclasses.dataclass(frozen=True, eq=False)
class Deferred:
    """An array of `shape` and `dtype` that `make()` returns when it is written."""

    make: Callable[[], np.ndarray]
    shape: tuple[int, ...]
    dtype: np.dtype

    def stand_in(self) -> np.ndarray:
        """A read-only array of the leaf's shape and dtype that takes no memory (one zero
        broadcast), for code that looks at shapes only (an optimizer's init)."""
        return np.broadcast_to(np.zeros((), self.dtype), self.shape)


def made(leaf: Any) -> Any:
    """``leaf.make()`` for a `Deferred` leaf, any other leaf as it is."""
    return leaf.make() if isinstance(leaf, Deferred) else leaf


def stack_layers(layers: Sequence[Any]) -> Any:
    """Per-layer leaves of one shape as one [L, ...] leaf (an nn.scan model's layout):
    a `Deferred` made layer by layer when they are, else a numpy array."""
    if not isinstance(layers[0], Deferred):
        return np.stack([np.asarray(x) for x in layers])
    first = layers[0]

    def make() -> np.ndarray:
        out = np.empty((len(layers), *first.shape), first.dtype)
        for i, layer in enumerate(layers):
            out[i] = made(layer)
        return out

    return Deferred(make, (len(layers), *first.shape), first.dtype)


def unstack_layers(leaf: Any) -> list[Any]:
    """A stacked [L, ...] leaf as L per-layer leaves. Deferred layers share one read of
    the whole leaf, kept until the last of them is made (reading it once per layer
    would read it L times)."""
    if not isinstance(leaf, Deferred):
        return list(np.asarray(leaf))
    whole: dict[str, np.ndarray] = {}
    left = [leaf.shape[0]]

    def layer(i: int) -> Deferred:
        def make() -> np.ndarray:
            if "value" not in whole:
                whole["value"] = leaf.make()
            out = np.array(whole["value"][i])
            left[0] -= 1
            if left[0] <= 0:
                whole.clear()
            return out

        return Deferred(make, tuple(leaf.shape[1:]), leaf.dtype)

    return [layer(i) for i in range(leaf.shape[0])]


def split_layers(flat: Mapping[str, Any], stacked: Mapping[str, str]) -> dict[str, Any]:
    """Flat {path: leaf} with each leaf under a prefix of `stacked` ({stacked prefix:
    per-layer template}, ``Llama.STACKED``) split into its layers' paths (`unstack_layers`);
    the other leaves as they are."""
    out: dict[str, Any] = {}
    for path, leaf in flat.items():
        prefix = next((p for p in stacked if path.startswith(p + "/")), None)
        if prefix is None:
            out[path] = leaf
            continue
        for i, layer in enumerate(unstack_layers(leaf)):
            out[stacked[prefix].format(i) + path[len(prefix) :]] = layer
    return out


class _DeferredHandler(ocp.type_handlers.NumpyHandler):
    """Orbax's numpy handler, made to write its values one after another, each made just
    before its write (Orbax hands a handler every leaf of its type at once and the numpy
    handler writes them all concurrently, after copying them)."""

    def __init__(self):
        super().__init__(deepcopy_host_arrays=False)

    async def serialize(
        self,
        values: Sequence[Deferred],
        infos: Sequence[Any],
        args: Sequence[ocp.SaveArgs] | None = None,
    ) -> list[future.Future]:
        args = args or [ocp.SaveArgs()] * len(values)

        async def one_at_a_time() -> None:
            # the next leaf is made (in a thread) while this one is written: two leaves
            # are held at a time, and conversion and disk overlap
            loop = asyncio.get_running_loop()
            made = [loop.run_in_executor(None, v.make) for v in values[:1]]
            for k, (value, info, arg) in enumerate(zip(values, infos, args, strict=True)):
                array = await made.pop()
                if k + 1 < len(values):
                    made.append(loop.run_in_executor(None, values[k + 1].make))
                assert array.shape == tuple(value.shape) and array.dtype == value.dtype, (
                    f"{info.name}: made {array.shape} {array.dtype}, declared "
                    f"{value.shape} {value.dtype}"
                )
                await self._background_serialize([array], [info], [arg])
                del array

        return [future.CommitFutureAwaitingContractedSignals(one_at_a_time(), name="deferred")]


def type_handler_registry() -> Any:
    """Orbax's standard type handlers plus `Deferred` leaves (written as numpy arrays)."""
    handlers = ocp.type_handlers
    standard = [(ty, handlers.get_type_handler(ty)) for ty in handlers.supported_types()]
    return handlers.create_type_handler_registry((Deferred, _DeferredHandler()), *standard)
