"""Pretrained restore with surgery: fit a checkpoint's leaves onto a freshly initialised model.

`restore_pretrained` is the fine-tuning entry point: rename rules map checkpoint paths to
model paths, re-initialised leaves (a new head) keep their fresh init, a ViT position table
is resampled to another image size, and in strict mode any leaf that is neither loaded nor
explicitly re-initialised is refused in one line. A model built with ``scan_layers`` restores
a checkpoint of per-layer leaves (an import's), and an unscanned one a scanned run's: the
layers are stacked or split to the model's layout first. The report (`init_report.json`)
says what happened to every leaf.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxdl.checkpoint.deferred import Deferred, split_layers, stack_layers
from jaxdl.checkpoint.read import load_checkpoint
from jaxdl.core import tree as tree_lib
from jaxdl.errors import UserError

CATEGORIES = (
    "loaded",
    "renamed",
    "reinitialized",
    "missing",
    "unexpected",
    "ignored",
    "shape_mismatch",
    "dtype_cast",
)


def _compile(patterns: Any, key: str) -> list[re.Pattern]:
    try:
        return [re.compile(p) for p in patterns]
    except (re.error, TypeError) as err:
        raise UserError(
            f"{key}: expected a list of regexes, found {patterns!r} ({err}). Fix: use e.g. "
            "['params/head/.*']."
        ) from err


def _rename_rules(rules: Any) -> list[tuple[re.Pattern, str]]:
    pairs = list(rules or [])
    if not all(isinstance(r, (list, tuple)) and len(r) == 2 for r in pairs):
        raise UserError(
            f"init_from.rename: expected a list of (regex, replacement) pairs, found {pairs!r}. "
            "Fix: e.g. [('params/encoder/(.*)', r'params/backbone/\\1')]."
        )
    regexes = _compile([r[0] for r in pairs], "init_from.rename")
    return [(rx, str(r[1])) for rx, r in zip(regexes, pairs, strict=True)]


def _renamed(ckpt: dict[str, Any], rules: list[tuple[re.Pattern, str]]) -> tuple[dict, dict]:
    """Apply the first matching rename rule to each checkpoint path -> (leaves, old->new)."""
    out: dict[str, Any] = {}
    renamed: dict[str, str] = {}
    for old, value in ckpt.items():
        new = next((rx.sub(repl, old) for rx, repl in rules if rx.search(old)), old)
        if new in out:
            raise UserError(
                f"init_from.rename: two checkpoint leaves map to {new!r} (one is {old!r}). "
                "Fix: make the rename rules map distinct paths to distinct targets."
            )
        out[new] = value
        if new != old:
            renamed[old] = new
    return out, renamed


def _shape(x: Any) -> list[int]:
    # a Deferred leaf has a shape but is no array (np.shape would see a scalar object)
    return [int(d) for d in (x.shape if isinstance(x, Deferred) else np.shape(x))]


def _cast(value: Any, dtype: np.dtype) -> Any:
    if not isinstance(value, Deferred):
        return value.astype(dtype, copy=False)
    if value.dtype == dtype:
        return value
    return Deferred(lambda: value.make().astype(dtype), value.shape, dtype)


def _in_model_layout(
    ckpt: dict[str, Any], model: Mapping[str, Any], stacked: Mapping[str, str]
) -> list[list[str]]:
    """Restack `ckpt`'s layers (in place) to `model`'s layout, for each {stacked prefix:
    per-layer template} of `stacked` where the two differ. A leaf whose layers are not
    all there, or differ in shape, is left as it is: the strict check then names it.
    Returns [[from, to]] of the prefixes moved."""
    moved = []
    for prefix, template in stacked.items():
        in_model = [p for p in model if p.startswith(prefix + "/")]
        in_ckpt = [p for p in ckpt if p.startswith(prefix + "/")]
        per_layer_model = any(p.startswith(template.format(0) + "/") for p in model)
        if in_model and not in_ckpt:  # a scanned model, a per-layer checkpoint
            stacked_any = False
            for path in in_model:
                rest = path[len(prefix) :]
                keys = [template.format(i) + rest for i in range(_shape(model[path])[0])]
                if all(k in ckpt for k in keys) and len({str(_shape(ckpt[k])) for k in keys}) == 1:
                    ckpt[path] = stack_layers([ckpt.pop(k) for k in keys])
                    stacked_any = True
            if stacked_any:
                moved.append([template.format("{i}"), prefix])
        elif in_ckpt and not in_model and per_layer_model:
            ckpt.update(split_layers({p: ckpt.pop(p) for p in in_ckpt}, {prefix: template}))
            moved.append([prefix, template.format("{i}")])
    return moved


def restore_pretrained(
    init_from: Mapping,
    variables: dict,
    *,
    deferred: bool = False,
    stacked: Mapping[str, str] | None = None,
) -> tuple[dict, dict]:
    """Load a checkpoint's weights into freshly initialised ``variables``.

    init_from: {"checkpoint": path, "step": int | None, "rename": [(regex, repl)],
    "reinit": [regex], "strict": bool}. Rename rules (first ``re.search`` match, applied
    with ``re.sub``) map checkpoint paths to model paths; model leaves whose path
    ``re.fullmatch``es a reinit regex keep their fresh init (checkpoint leaves with no model
    leaf that match one are "ignored", not "unexpected"). Loaded leaves are numpy, cast to
    the model's dtype. Returns (variables, report); the report is JSON-able.

    Strict (default): any missing, unexpected or shape-mismatched leaf not covered by reinit
    raises one ValueError listing them all.

    ``deferred``: loaded leaves are `jaxdl.checkpoint.deferred.Deferred`s, each read (and
    cast) when made, for a caller that shrinks each as it comes (QLoRA's setup quantizes
    the frozen kernels) and so never holds the float model; adapters' steps load whole.

    ``stacked``: the model's {stacked prefix: per-layer template} (``Llama.STACKED``); a
    checkpoint in the other layout is stacked or split to the model's before matching
    (the report's "restacked" says which).
    """
    source = init_from.get("checkpoint")
    if not source:
        raise UserError(
            "init_from.checkpoint: expected a checkpoint path, found "
            f"{source!r}. Fix: set init_from.checkpoint=WORKDIR of the pretrained run."
        )
    rules = _rename_rules(init_from.get("rename"))
    reinit = _compile(list(init_from.get("reinit") or []), "init_from.reinit")
    strict = bool(init_from.get("strict", True))
    loaded_vars, step_dir, step = load_checkpoint(
        source, init_from.get("step"), "init_from.checkpoint", deferred=deferred
    )
    ckpt, renamed = _renamed(tree_lib.flatten(loaded_vars), rules)
    model = tree_lib.flatten(variables)
    restacked = _in_model_layout(ckpt, model, stacked or {})

    def covered(path: str) -> bool:
        return any(rx.fullmatch(path) for rx in reinit)

    report: dict[str, Any] = {"source": str(step_dir), "step": step}
    report.update({k: [] for k in CATEGORIES})
    report["renamed"] = renamed
    report["resampled"] = []  # ViT position tables fitted to another image size
    report["restacked"] = restacked  # layers stacked for nn.scan, or split from it
    out: dict[str, Any] = {}
    for path, fresh in model.items():
        out[path] = fresh
        if path in ckpt and not covered(path):
            resized = _resampled_posemb(path, ckpt[path], fresh, model)
            if resized is not None:
                report["resampled"].append([path, _shape(ckpt[path]), _shape(fresh)])
                ckpt[path] = resized
        if covered(path):
            report["reinitialized"].append(path)
        elif path not in ckpt:
            report["missing"].append(path)
        elif _shape(ckpt[path]) != _shape(fresh):
            report["shape_mismatch"].append([path, _shape(ckpt[path]), _shape(fresh)])
        else:
            value, dtype = ckpt[path], np.dtype(fresh.dtype)
            if value.dtype != dtype:
                report["dtype_cast"].append([path, str(value.dtype), str(dtype)])
            out[path] = _cast(value, dtype)
            report["loaded"].append(path)
    for path in sorted(ckpt.keys() - model.keys()):
        report["ignored" if covered(path) else "unexpected"].append(path)
    for key in ("loaded", "reinitialized", "missing", "shape_mismatch", "dtype_cast"):
        report[key].sort()

    problems = _problems(report)
    if strict and problems:
        offending = [e[0] for e in report["shape_mismatch"]] + report["missing"]
        hint = re.escape((offending + report["unexpected"])[0].rsplit("/", 1)[0]) + "/.*"
        raise UserError(
            f"init_from.checkpoint: {step_dir} (step {step}) does not fit the model: "
            f"{'; '.join(problems)}. Fix: add these paths to init_from.reinit (e.g. "
            f"'{hint}'), map renamed layers with init_from.rename, or set "
            "init_from.strict=False."
        )
    return tree_lib.unflatten(out), report


def _resampled_posemb(path: str, value: Any, fresh: Any, model: Mapping[str, Any]):
    """A ViT position table [1, T, D] of another image size resampled to the model's grid
    (`jaxdl.models.vit.resample_posemb`), or None for any other leaf."""
    if not path.endswith("/pos_embed") or len(_shape(value)) != 3 or len(_shape(fresh)) != 3:
        return None
    if _shape(value) == _shape(fresh):
        return None
    from jaxdl.models.vit import resample_posemb

    if isinstance(value, Deferred):
        value = value.make()
    num_prefix = int(path[: -len("pos_embed")] + "cls" in model)  # the class token's row
    return resample_posemb(np.asarray(value), tuple(_shape(fresh)), num_prefix)


def _problems(report: Mapping[str, Any]) -> list[str]:
    """Strict-mode offences, one phrase per category, every path listed."""
    out = []
    if report["shape_mismatch"]:
        items = ", ".join(
            f"{p} checkpoint {tuple(c)} vs model {tuple(m)}" for p, c, m in report["shape_mismatch"]
        )
        out.append(f"{len(report['shape_mismatch'])} shape mismatch: {items}")
    if report["missing"]:
        out.append(
            f"{len(report['missing'])} missing from the checkpoint: " + ", ".join(report["missing"])
        )
    if report["unexpected"]:
        out.append(
            f"{len(report['unexpected'])} unexpected (in the checkpoint, not the model): "
            + ", ".join(report["unexpected"])
        )
    return out


def format_report(report: Mapping[str, Any]) -> str:
    """The init report as a table: one row per category with its count and paths."""
    lines = [f"init_from {report['source']} (step {report['step']})"]
    lines.extend(f"  restacked      {old} -> {new}" for old, new in report.get("restacked") or [])
    for name in CATEGORIES:
        entries = report.get(name) or []
        if name == "renamed":
            shown = [f"{old} -> {new}" for old, new in dict(entries).items()]
        elif name == "shape_mismatch":
            shown = [f"{p}  checkpoint {tuple(c)} vs model {tuple(m)}" for p, c, m in entries]
        elif name == "dtype_cast":
            shown = [f"{p}  {src} -> {dst}" for p, src, dst in entries]
        else:
            shown = [] if name == "loaded" else list(entries)
        lines.append(f"  {name:<15}{len(entries):>6}")
        lines.extend(f"{'':>23}{s}" for s in shown)
    return "\n".join(lines)
