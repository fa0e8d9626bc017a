"""Declarative weight mapping: a foreign state dict -> a jaxdl variable tree, strictly.

A family's import is a table of `Rule`s (target path regex -> source key template +
transform), in the manner of MaxText's ``utils/ckpt_conversion``::

    RULES = [
        Rule(r"params/block_(\\d+)/attn/query/kernel", "h.{0}.attn.c_attn.weight", split(1, 0, 3)),
        Rule(r"params/embed/embedding", "wte.weight"),
    ]
    variables, report = convert(state_dict, jax.eval_shape(model.init, rng, x), RULES,
                                ignore=[r"h\\.\\d+\\.attn\\.bias"])

`convert` is strict: every target leaf is filled by exactly one rule (the first whose regex
fully matches its path), every transformed array has the target's shape, and every source
key is used by some rule or matched by an `ignore` regex. Anything else is one `UserError`
listing every offending key. Models built with ``scan_layers`` keep their blocks stacked
under one prefix (``params/blocks/...`` with a leading layer axis); `convert`'s `stacked`
argument names that prefix and the per-layer prefix the rules are written against
(``{"params/blocks": "params/block_{}"}``), so one table serves both layouts.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxdl.checkpoint.deferred import Deferred, stack_layers
from jaxdl.core import tree as tree_lib
from jaxdl.errors import UserError
from jaxdl.finetune.surgery import CATEGORIES  # import_report.json reads like init_report.json

Transform = Callable[[np.ndarray, tuple[int, ...]], np.ndarray]


def identity(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The source array as it is."""
    return x


def transpose(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Reverse the axes: torch Linear [out, in] -> Flax Dense kernel [in, out]."""
    return np.transpose(x)


def oihw_to_hwio(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """torch Conv2d weight [O, I, H, W] -> Flax Conv kernel [H, W, I, O]."""
    return np.transpose(x, (2, 3, 1, 0))


def reshape(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Same elements, the target's shape (e.g. a [1, N, D] table stored as [N, D])."""
    return np.reshape(x, shape)


def split(axis: int, index: int, parts: int) -> Transform:
    """Part `index` of `parts` equal pieces along `axis` (a fused qkv weight -> q, k or v)."""

    def take(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if x.shape[axis] % parts:
            raise UserError(
                f"source array of shape {x.shape}: expected axis {axis} divisible into "
                f"{parts} equal parts. Fix: check that the checkpoint is of this architecture."
            )
        return np.split(x, parts, axis=axis)[index]

    take.__name__ = f"split({axis}, {index}, {parts})"
    return take


def chain(*transforms: Transform) -> Transform:
    """Apply `transforms` left to right."""

    def run(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        for t in transforms:
            x = t(x, shape)
        return x

    run.__name__ = " then ".join(getattr(t, "__name__", "?") for t in transforms)
    return run


class Renamed(Mapping):
    """`source` under the keys `rename` gives its keys (a view: tensors are read, or stood
    in for, by the source when they are looked up)."""

    def __init__(self, source: Mapping[str, Any], rename: Callable[[str], str]):
        self.source = source
        self._keys = {rename(k): k for k in source}
        if hasattr(source, "stand_in"):
            self.stand_in = lambda key: source.stand_in(self._keys[key])

    def __getitem__(self, key: str) -> Any:
        return self.source[self._keys[key]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One target leaf family: `target` regex (fully matching a target path) -> `source`
    key template filled with the regex's groups (``"h.{0}.mlp.c_fc.weight"``), then
    `transform(source_array, target_shape)`."""

    target: str
    source: str
    transform: Transform = identity


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in np.shape(x))


def _unstack(
    flat: dict[str, Any], stacked: Mapping[str, str]
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Split stacked leaves [L, ...] into per-layer pseudo leaves named by `stacked`'s
    templates. Returns (per-layer flat targets, {stacked path: [per-layer paths]})."""
    out: dict[str, Any] = {}
    groups: dict[str, list[str]] = {}
    for path, leaf in flat.items():
        prefix = next((p for p in stacked if path.startswith(p + "/")), None)
        if prefix is None:
            out[path] = leaf
            continue
        rest = path[len(prefix) :]
        layers = []
        for i in range(leaf.shape[0]):
            layer_path = stacked[prefix].format(i) + rest
            out[layer_path] = jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
            layers.append(layer_path)
        groups[path] = layers
    return out, groups


def _deferred(
    source: Mapping[str, np.ndarray],
    key: str,
    transform: Transform,
    shape: tuple[int, ...],
    dtype: np.dtype,
) -> Deferred:
    def make() -> np.ndarray:
        value = np.asarray(transform(np.asarray(source[key]), shape))
        return np.ascontiguousarray(value.astype(dtype, copy=False))

    return Deferred(make, shape, dtype)


def convert(
    source: Mapping[str, np.ndarray],
    target: Any,
    rules: Sequence[Rule],
    ignore: Sequence[str] = (),
    stacked: Mapping[str, str] | None = None,
    defer: bool = False,
) -> tuple[dict, dict]:
    """Fill `target`'s leaves from `source` by `rules`.

    source: {key: array} (a state dict as numpy). target: a nested dict of
    `jax.ShapeDtypeStruct` (``jax.eval_shape(model.init, ...)``), paths "params/...",
    "batch_stats/...". ignore: regexes of source keys deliberately left out (buffers such
    as GPT-2's ``attn.bias``). stacked: {stacked prefix: per-layer prefix template} for
    scanned layers (see the module docstring). defer: when `source` can
    stand in for its tensors without reading them (``source.stand_in(key)``: an array of
    the tensor's shape and dtype that takes no memory; `SafetensorsView`, GGUF's `HfView`),
    every leaf becomes a `jaxdl.checkpoint.deferred.Deferred` that reads and converts its
    tensor when the checkpoint writes it, so an import never holds the model; the checks
    below run on the stand-ins first.

    Returns (variables: nested dict of contiguous arrays, or Deferred, in the target's dtypes;
    report: JSON-able, with the init_report categories; "renamed" maps each target path to
    its source key, "dtype_cast" lists [path, source dtype, target dtype], "ignored" the
    ignored source keys).
    Raises one UserError naming every unfilled target leaf, missing or unused source key and
    shape mismatch.
    """
    flat, groups = _unstack(tree_lib.flatten(target), stacked or {})
    compiled = [(re.compile(r.target), r) for r in rules]
    ignores = [re.compile(p) for p in ignore]
    report: dict[str, Any] = {k: [] for k in CATEGORIES}
    report["renamed"] = {}
    values: dict[str, np.ndarray] = {}
    used: set[str] = set()
    unfilled: list[str] = []
    absent: list[str] = []
    for path, leaf in flat.items():
        match = next(((m, r) for rx, r in compiled if (m := rx.fullmatch(path))), None)
        if match is None:
            unfilled.append(path)
            continue
        m, rule = match
        key = rule.source.format(*m.groups())
        if key not in source:
            absent.append(f"{key} (for {path})")
            continue
        used.add(key)
        lazy = defer and hasattr(source, "stand_in")
        raw = source.stand_in(key) if lazy else np.asarray(source[key])
        value = np.asarray(rule.transform(raw, _shape(leaf)))
        if _shape(value) != _shape(leaf):
            report["shape_mismatch"].append([path, list(_shape(value)), list(_shape(leaf))])
            continue
        dtype = np.dtype(leaf.dtype)
        if value.dtype != dtype:
            report["dtype_cast"].append([path, str(value.dtype), str(dtype)])
        if lazy:
            values[path] = _deferred(source, key, rule.transform, _shape(leaf), dtype)
        else:
            value = value.astype(dtype, copy=False)
            values[path] = np.ascontiguousarray(value)
        report["renamed"][path] = key
        report["loaded"].append(path)
    unused = sorted(k for k in source if k not in used and not any(i.fullmatch(k) for i in ignores))
    report["ignored"] = sorted(k for k in source if k not in used and k not in unused)
    report["missing"] = unfilled + absent
    report["unexpected"] = unused
    problems = []
    if unfilled:
        problems.append(f"{len(unfilled)} target leaves match no rule: {', '.join(unfilled)}")
    if absent:
        problems.append(f"{len(absent)} source keys missing: {', '.join(absent)}")
    if report["shape_mismatch"]:
        problems.append(
            f"{len(report['shape_mismatch'])} shape mismatch: "
            + ", ".join(
                f"{p} source {tuple(s)} vs model {tuple(t)}" for p, s, t in report["shape_mismatch"]
            )
        )
    if unused:
        problems.append(f"{len(unused)} source keys unused: {', '.join(unused)}")
    if problems:
        raise UserError(
            f"weights do not fit the model: {'; '.join(problems)}. Fix: check that the "
            "checkpoint is of the architecture named (and its config.json matches it)."
        )
    for stacked_path, layers in groups.items():
        values[stacked_path] = stack_layers([values.pop(p) for p in layers])
        report["renamed"][stacked_path] = [report["renamed"].pop(p) for p in layers]
    report["loaded"] = sorted(report["renamed"])
    return tree_lib.unflatten(values), report
