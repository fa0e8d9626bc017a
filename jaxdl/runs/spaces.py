"""Search spaces of `jaxdl sweep --param KEY=SPACE`, and the trials drawn from them.

KEY=[v1,v2,...]       grid values (random search draws from them uniformly)
KEY=choice(v1,v2,...) the same, as a categorical
KEY=uniform(a,b)      float in [a, b)
KEY=loguniform(a,b)   float, log-uniform in [a, b)
KEY=int(a,b)          integer in [a, b] (inclusive)
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxdl.errors import UserError

KINDS = ("list", "choice", "uniform", "loguniform", "int")


@dataclasses.dataclass(frozen=True)
class Space:
    key: str
    kind: str  # one of KINDS
    values: tuple  # list/choice: the values; uniform/loguniform/int: (low, high)
    text: str  # as given, for sweep.json and error messages

    @property
    def discrete(self) -> bool:
        return self.kind in ("list", "choice")

    def sample(self, rng: np.random.Generator) -> Any:
        if self.discrete:
            return self.values[int(rng.integers(len(self.values)))]
        low, high = self.values
        if self.kind == "int":
            return int(rng.integers(low, high + 1))
        if self.kind == "loguniform":
            return float(math.exp(rng.uniform(math.log(low), math.log(high))))
        return float(rng.uniform(low, high))


def _bad(text: str, found: str) -> UserError:
    return UserError(
        f"--param {text}: expected KEY=SPACE with SPACE one of [v1,v2,...], choice(v1,...), "
        f"uniform(a,b), loguniform(a,b), int(a,b); found {found}. "
        "Fix: e.g. --param optimizer.learning_rate=loguniform(1e-4,1e-1)."
    )


def parse_param(text: str) -> Space:
    """'KEY=SPACE' -> Space; a space that does not parse is a UserError."""
    if "=" not in text:
        raise _bad(text, "no '='")
    key, body = (part.strip() for part in text.split("=", 1))
    key = key.removeprefix("config.")
    try:
        node = ast.parse(body, mode="eval").body
    except SyntaxError:
        raise _bad(text, f"{body!r}, which does not parse") from None
    if isinstance(node, ast.List | ast.Tuple):
        values = _literals(text, node.elts)
        if not values:
            raise _bad(text, "an empty list")
        return Space(key, "list", tuple(values), body)
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise _bad(text, repr(body))
    name = node.func.id
    if name not in KINDS[1:] or node.keywords:
        raise _bad(text, f"{name}(...)")
    args = _literals(text, node.args)
    if name == "choice":
        if not args:
            raise _bad(text, "choice() with no values")
        return Space(key, "choice", tuple(args), body)
    numeric = all(isinstance(a, int | float) and not isinstance(a, bool) for a in args)
    if len(args) != 2 or not numeric or not args[0] < args[1]:
        raise _bad(text, f"{name}{tuple(args)} (needs two numbers, low < high)")
    if name == "loguniform" and args[0] <= 0:
        raise _bad(text, f"loguniform{tuple(args)} (needs low > 0)")
    if name == "int" and not all(isinstance(a, int) for a in args):
        raise _bad(text, f"int{tuple(args)} (needs integers)")
    return Space(key, name, tuple(args), body)


def _literals(text: str, nodes: Sequence[ast.expr]) -> list:
    try:
        return [ast.literal_eval(n) for n in nodes]
    except ValueError:
        raise _bad(text, "a value that is not a literal (number, string, bool)") from None


def check_keys(spaces: Sequence[Space]) -> None:
    """Refuse a key given twice: its trials would repeat, or one space would hide another."""
    seen: dict[str, str] = {}
    for s in spaces:
        if s.key in seen:
            raise UserError(
                f"--param {s.key}: expected each key once, found it twice ({s.key}={seen[s.key]} "
                f"and {s.key}={s.text}). Fix: give all its values in one space, e.g. "
                f"--param {s.key}=[v1,v2,...]."
            )
        seen[s.key] = s.text


def grid_size(spaces: Sequence[Space]) -> int | None:
    """Trials in the grid of `spaces` (None when a space is continuous: no grid)."""
    if not all(s.discrete for s in spaces):
        return None
    return math.prod(len(s.values) for s in spaces)


def count_trials(spaces: Sequence[Space], strategy: str, trials: int | None) -> int:
    """How many trials a sweep runs: ``trials`` (--trials), else the whole grid for "grid"
    and 16 otherwise. 0 or fewer, or more than a grid holds, is refused."""
    size = grid_size(spaces) if strategy == "grid" else None
    whole = "the whole grid" if size is not None else "16 trials"
    if trials is not None and trials < 1:
        raise UserError(
            f"--trials: expected >= 1, found {trials}. Fix: drop --trials to run {whole}, or "
            "pass a positive count."
        )
    if size is not None and trials is not None and trials > size:
        raise UserError(
            f"--trials: expected at most {size} (the grid of --param values holds {size} "
            f"trials), found {trials}. Fix: drop --trials to run the whole grid, pass "
            f"--trials {size} or fewer, or use --strategy random to draw {trials} trials."
        )
    if trials is not None:
        return trials
    return size if size is not None else 16


def make_trials(
    spaces: Sequence[Space], strategy: str, trials: int | None, seed: int
) -> list[dict[str, Any]]:
    """Trial parameters: the grid's product (in order), or ``trials`` random draws."""
    if strategy == "grid":
        continuous = [s.key for s in spaces if not s.discrete]
        if continuous:
            raise UserError(
                f"--strategy grid: expected lists or choice(...) only, found continuous spaces "
                f"for {continuous}. Fix: give lists of values, or use --strategy random."
            )
        grid = [
            dict(zip([s.key for s in spaces], combo, strict=True))
            for combo in itertools.product(*(s.values for s in spaces))
        ]
        return grid if trials is None else grid[:trials]
    if strategy != "random":
        raise UserError(f"--strategy: expected grid or random, found {strategy!r}.")
    rng = np.random.default_rng(seed)
    return [{s.key: s.sample(rng) for s in spaces} for _ in range(trials or 16)]


def describe(spaces: Sequence[Space]) -> Mapping[str, str]:
    return {s.key: s.text for s in spaces}
