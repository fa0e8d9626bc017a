"""Partition rules -> a per-leaf plan: which parameters train, and how fast.

The tree being partitioned is ``{"params": model_params}`` plus ``{"lora": adapters}``
when LoRA is on, so paths look like ``params/backbone/Conv_0/kernel`` and
``lora/params/head/kernel/a``. Rules (config key ``partition``) are a list of
``(regex, {"trainable", "lr_mult", "wd_mult", "unfreeze_at"})`` pairs; each regex is
matched with ``re.fullmatch`` on the path and the first match wins, e.g.::

    [("params/backbone/.*", {"lr_mult": 0.1, "unfreeze_at": 500}),
     (".*/bias", {"wd_mult": 0.0}),
     (".*", {})]

Coverage is checked both ways: a leaf matched by no rule and a rule that wins no leaf
are errors, so a typo in a regex cannot silently freeze (or train) the wrong thing.

Gradual unfreezing is a learning-rate factor of 0 before ``unfreeze_at``: the leaf is
trainable from step 0 (it has optimizer state, so the state layout never changes and a
resumed run is exact), but its updates are multiplied by 0 until then.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdl.core import tree as tree_lib
from jaxdl.errors import UserError
from jaxdl.tables import text_table

Tree = Mapping[str, Any]
Rule = tuple[str, Mapping[str, Any]]

_DEFAULTS = {"trainable": True, "lr_mult": 1.0, "wd_mult": 1.0, "unfreeze_at": 0}
_MAX_LISTED = 10


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """How one parameter leaf is trained. ``rule`` (the regex that matched) names its group."""

    trainable: bool
    lr_mult: float
    wd_mult: float
    unfreeze_at: int
    rule: str


def default_rules(lora: bool) -> list[Rule]:
    """Rules used when the config gives none: all trainable, or only the adapters with LoRA."""
    if lora:
        return [("lora/.*", {}), (".*", {"trainable": False})]
    return [(".*", {})]


def _options(regex: str, options: Any) -> dict[str, Any]:
    """Validate one rule's options and fill in the defaults."""
    if hasattr(options, "to_dict"):  # ml_collections.ConfigDict
        options = options.to_dict()
    if not isinstance(options, Mapping):
        raise UserError(
            f"partition rule {regex!r}: expected a dict of options, found {options!r}; "
            f"write e.g. ({regex!r}, {{'trainable': False}})"
        )
    unknown = sorted(set(options) - set(_DEFAULTS))
    if unknown:
        raise UserError(
            f"partition rule {regex!r}: unknown field(s) {unknown}; "
            f"allowed fields are {sorted(_DEFAULTS)}"
        )
    opts = {**_DEFAULTS, **options}
    if not isinstance(opts["trainable"], bool):
        raise UserError(
            f"partition rule {regex!r}: 'trainable' must be True or False, "
            f"found {opts['trainable']!r}"
        )
    for key in ("lr_mult", "wd_mult"):
        value = opts[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise UserError(
                f"partition rule {regex!r}: {key!r} must be a number >= 0, found {value!r}"
            )
        opts[key] = float(value)
    step = opts["unfreeze_at"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise UserError(
            f"partition rule {regex!r}: 'unfreeze_at' must be an int step >= 0, found {step!r}"
        )
    if step > 0 and not opts["trainable"]:
        raise UserError(
            f"partition rule {regex!r}: 'unfreeze_at'={step} needs 'trainable': True "
            "(the leaf must have optimizer state to start training later); drop one of the two"
        )
    return opts


def _parse_rules(rules: Sequence[Any]) -> list[tuple[str, re.Pattern[str], dict[str, Any]]]:
    parsed = []
    for rule in rules:
        if isinstance(rule, (str, bytes)) or not isinstance(rule, Sequence) or len(rule) != 2:
            raise UserError(
                f"partition: each rule must be a (regex, options) pair, found {rule!r}; "
                "write e.g. ('params/backbone/.*', {'trainable': False})"
            )
        regex, options = rule
        try:
            pattern = re.compile(regex)
        except (re.error, TypeError) as err:
            raise UserError(f"partition rule {regex!r}: not a valid regex ({err})") from err
        parsed.append((regex, pattern, _options(regex, options)))
    return parsed


def _listing(paths: Sequence[str]) -> str:
    shown = ", ".join(paths[:_MAX_LISTED])
    more = f" and {len(paths) - _MAX_LISTED} more" if len(paths) > _MAX_LISTED else ""
    return f"{shown}{more}"


def make_plan(tree: Tree, rules: Sequence[Rule] | None = None) -> dict[str, LeafPlan]:
    """Assign every leaf of ``tree`` the options of the first rule whose regex fullmatches its path.

    ``rules=None`` uses `default_rules`, with LoRA when ``tree`` has "lora" leaves.
    Raises ValueError when a leaf is matched by no rule, or a rule wins no leaf.
    """
    paths = list(tree_lib.flatten(tree))
    if rules is None:
        rules = default_rules(lora=any(p.startswith("lora/") for p in paths))
    parsed = _parse_rules(rules)
    if not parsed:
        raise UserError(
            "partition: the rule list is empty; give at least a catch-all rule ('.*', {}) "
            "or leave `partition` unset for the defaults"
        )

    plan: dict[str, LeafPlan] = {}
    unmatched = []
    matched_by: dict[str, int] = {regex: 0 for regex, _, _ in parsed}
    for path in paths:
        winner = None
        for regex, pattern, opts in parsed:
            if pattern.fullmatch(path):
                matched_by[regex] += 1
                if winner is None:
                    winner = LeafPlan(rule=regex, **opts)
        if winner is None:
            unmatched.append(path)
        else:
            plan[path] = winner
    if unmatched:
        raise UserError(
            f"partition: {len(unmatched)} parameter(s) matched by no rule: "
            f"{_listing(unmatched)}; add a catch-all rule ('.*', {{...}}) at the end"
        )

    won = {leaf.rule for leaf in plan.values()}
    for regex, _, _ in parsed:
        if regex in won:
            continue
        if matched_by[regex] == 0:
            raise UserError(
                f"partition rule {regex!r} matches no parameter (regexes use re.fullmatch on "
                f"paths such as {_listing(paths[:3])}); fix the regex or remove the rule"
            )
        raise UserError(
            f"partition rule {regex!r} matches {matched_by[regex]} parameter(s) but earlier "
            "rules take all of them (first match wins); move it before them or remove it"
        )
    return plan


def split(tree: Tree, plan: Mapping[str, LeafPlan]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``tree`` -> (trainable_tree, frozen_tree), same paths; `jaxdl.core.tree.merge` inverts it."""
    flat = tree_lib.flatten(tree)
    assert flat.keys() == plan.keys(), "plan was made for a different tree"
    trainable = {p: leaf for p, leaf in flat.items() if plan[p].trainable}
    frozen = {p: leaf for p, leaf in flat.items() if not plan[p].trainable}
    return tree_lib.unflatten(trainable), tree_lib.unflatten(frozen)


def _map_trainable(fn: Any, plan: Mapping[str, LeafPlan], trainable_tree: Tree) -> Any:
    """Tree shaped like ``trainable_tree`` with ``fn(leaf_plan)`` at each leaf."""

    def leaf_fn(key_path: tuple[Any, ...], _: Any) -> Any:
        path = tree_lib.path_str(key_path)
        assert path in plan and plan[path].trainable, f"{path} is not a trainable leaf of the plan"
        return fn(plan[path])

    return jax.tree_util.tree_map_with_path(leaf_fn, trainable_tree)


def lr_mult_tree(plan: Mapping[str, LeafPlan], trainable_tree: Tree, step: Any) -> Any:
    """Per-leaf learning-rate factor at ``step``: ``lr_mult``, or 0 before ``unfreeze_at``.

    Returns float32 scalars in the structure of ``trainable_tree`` (or of any tree with the
    same paths, e.g. optimizer updates). ``step`` may be a traced int, so this runs under jit;
    multiply the final updates by it so weight decay also waits for ``unfreeze_at``.
    """
    step = jnp.asarray(step)
    return _map_trainable(
        lambda lp: jnp.where(step >= lp.unfreeze_at, lp.lr_mult, 0.0).astype(jnp.float32),
        plan,
        trainable_tree,
    )


def wd_mult_tree(plan: Mapping[str, LeafPlan], trainable_tree: Tree) -> Any:
    """Per-leaf weight-decay factor (float32 scalars) in the structure of ``trainable_tree``."""
    return _map_trainable(lambda lp: jnp.float32(lp.wd_mult), plan, trainable_tree)


def plan_rows(
    plan: Mapping[str, LeafPlan],
    tree: Tree,
    *,
    base_lr: float,
    opt_state_slots: int,
    stored_bytes: Mapping[str, int] | None = None,
) -> list[dict[str, Any]]:
    """One JSON-ready row per group (rule), in order of first leaf.

    ``opt_state_bytes`` = trainable scalars * ``opt_state_slots`` (e.g. 2 for Adam's moments,
    0 for SGD) * the leaf's itemsize (4 for float32); 0 for a frozen group. ``lr`` is
    ``base_lr * lr_mult`` once unfrozen, 0 for a frozen group. ``param_bytes``: what the
    group's leaves take in the state, ``stored_bytes[path]`` for a leaf stored otherwise
    than as its array (a QLoRA base's quantized kernels, counted in ``quantized_leaves``).
    """
    stored_bytes = stored_bytes or {}
    flat = tree_lib.flatten(tree)
    assert flat.keys() == plan.keys(), "plan was made for a different tree"
    rows: dict[str, dict[str, Any]] = {}
    for path, leaf in flat.items():
        lp = plan[path]
        row = rows.setdefault(
            lp.rule,
            {
                "group": lp.rule,
                "leaves": 0,
                "params": 0,
                "trainable": lp.trainable,
                "lr": float(base_lr) * lp.lr_mult if lp.trainable else 0.0,
                "lr_mult": lp.lr_mult,
                "wd_mult": lp.wd_mult,
                "unfreeze_at": lp.unfreeze_at,
                "param_bytes": 0,
                "quantized_leaves": 0,
                "opt_state_bytes": 0,
            },
        )
        size = math.prod(leaf.shape)  # arrays or jax.ShapeDtypeStruct
        row["leaves"] += 1
        row["params"] += size
        row["param_bytes"] += stored_bytes.get(path, size * np.dtype(leaf.dtype).itemsize)
        row["quantized_leaves"] += path in stored_bytes
        if lp.trainable:
            row["opt_state_bytes"] += size * opt_state_slots * np.dtype(leaf.dtype).itemsize
    return list(rows.values())


_COLUMNS = (
    ("group", "group"),
    ("leaves", "leaves"),
    ("params", "params"),
    ("trainable", "trainable"),
    ("lr", "lr"),
    ("wd_mult", "wd_mult"),
    ("unfreeze_at", "unfreeze_at"),
    ("param_bytes", "bytes"),
    ("opt_state_bytes", "opt_bytes"),
)


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Aligned text table of `plan_rows`, with a total line."""
    total = {
        "group": "total",
        "leaves": sum(r["leaves"] for r in rows),
        "params": sum(r["params"] for r in rows),
        "trainable": "",
        "lr": "",
        "wd_mult": "",
        "unfreeze_at": "",
        "param_bytes": sum(r.get("param_bytes", 0) for r in rows),
        "opt_state_bytes": sum(r["opt_state_bytes"] for r in rows),
    }
    header = [title for _, title in _COLUMNS]
    cells = [[_cell(row[key]) for key, _ in _COLUMNS] for row in [*rows, total]]
    return text_table(header, cells, footer=1)
