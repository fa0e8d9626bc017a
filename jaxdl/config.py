"""Configs: Python files with ``get_config()``, dotted overrides, strict validation.

An experiment file returns a partial ``ml_collections.ConfigDict``; it is laid over
`default_config()`, so every run's resolved config (written to ``config.json``) names every
knob. A key that the defaults do not know is an error, except inside ``model`` (whose
options belong to the model class and are checked by `jaxdl.models.create_model`).
"""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from jaxdl.errors import UserError
from jaxdl.fileio import read_json
from jaxdl.userfile import run_user_file

# Sections whose keys are free-form: each is validated by the component that reads it.
_OPEN_SECTIONS = ("model",)
# Keys whose value is a free-form structure (lists of rules, dicts of options).
_FREE_VALUES = (
    "partition",
    "lora",
    "mesh",
    "tasks",
    "data.transforms",
    "data.train_transforms",
    "loss.class_weights",
)


def default_config() -> ml_collections.ConfigDict:
    """Every config key jaxdl knows, with its default."""
    c = ml_collections.ConfigDict()
    c.seed = 42
    c.model = ml_collections.ConfigDict({"name": "mlp", "num_classes": 10})
    # The Python file whose import registers model.name (@jaxdl.register_model), for a model
    # defined outside jaxdl; "" for a built-in one. Filled in when the config registered it.
    c.model_file = ""
    # "" infers it: from the source (images: classification, text: lm) or a table's label.
    c.task = ""  # "classification" | "binary" | "multilabel" | "regression" | "lm" | "sft"

    c.data = ml_collections.ConfigDict()
    c.data.source = "digits"  # "none": a model without data (an imported one)
    c.data.batch_size = 32
    c.data.eval_batch_size = 0  # 0: same as batch_size
    # Larger images are refused before decoding (decompression bombs): Pillow's default cap.
    c.data.max_image_pixels = 89_478_485
    c.data.data_dir = ""  # "": ~/.cache/jaxdl/tfds or $JAXDL_DATA_DIR
    c.data.val_fraction = 0.1
    c.data.image_size = 0  # 0: the source's native size
    c.data.channels = 0  # 0: the source's native channels
    c.data.transforms = []  # eval-time (deterministic) transforms, e.g. ["normalize(unit)"]
    c.data.train_transforms = []  # extra training-only augmentation
    c.data.num_workers = 0
    c.data.prefetch = 2
    c.data.cache_mb = 256  # decoded splits up to this size are kept in memory (0: never)
    c.data.skip_bad_files = False
    c.data.seq_len = 128
    c.data.tokenizer = "bytes"  # language models: "bytes" or the path of a tokenizer.json
    c.data.max_bytes = 0  # 0: the source's default cap
    c.data.train_split = "train"
    c.data.eval_split = "val"
    c.data.test_split = "test"
    c.data.shape = []  # synthetic sources: example shape
    c.data.num_examples = 0  # synthetic sources: 0 = default size
    c.data.classes = []  # labels to keep, relabelled 0..k-1 in this order; [] = all
    c.data.examples_per_class = 0  # 0 = all; N = the first N train examples per class
    c.data.class_names = []  # source "none": the names of the model's outputs
    # Tables (csv:, parquet:, sklearn:); statistics come from the train split only.
    c.data.label_column = ""  # "a,b,c": several 0/1 columns, a multilabel task
    c.data.feature_columns = []  # [] = every column but the label(s)
    c.data.categorical_columns = []  # besides columns with no numeric value
    c.data.missing = "mean"  # | "error"
    # The held-out test part: 0 = the source's default (tables 0.2; text: none, said so)
    c.data.test_fraction = 0.0
    c.data.text_column = ""  # tables: classify this column's text (bytes) instead
    c.data.delimiter = ""  # CSV: "" sniffs one of , ; tab |
    c.data.encoding = "utf-8"  # CSV (a UTF-8 byte order mark is skipped)
    # Chat data (jsonl:, parquet: with task "sft"), see jaxdl/data/chat.py.
    c.data.format = ""  # "messages" | "prompt_completion" | "alpaca"; "": from the keys
    c.data.train_on = "assistant"  # | "all": which tokens carry the loss
    c.data.packing = False  # pack several examples into each row of seq_len

    c.loss = ml_collections.ConfigDict()
    # | "mse" | "sigmoid_cross_entropy"; binary/multilabel/regression: this default means
    # the task's own loss (sigmoid cross-entropy, mse), "huber" for regression
    c.loss.name = "softmax_cross_entropy"
    c.loss.label_smoothing = 0.0
    c.loss.l1 = 0.0
    c.loss.l2 = 0.0
    c.loss.class_weights = None  # "balanced" | [w_0, ..., w_C-1]

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adam"  # sgd | momentum | adam | adamw | rmsprop
    c.optimizer.learning_rate = 1e-3
    c.optimizer.momentum = 0.9
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.0
    c.optimizer.schedule = "constant"  # constant | step | exponential | cosine | warmup_cosine
    c.optimizer.warmup_steps = 0
    c.optimizer.decay_steps = 0  # 0: the run's total steps
    c.optimizer.decay_rate = 0.1  # step/exponential decay factor
    c.optimizer.step_every = 0  # step decay period in steps (0: a third of the run)
    c.optimizer.end_lr_fraction = 0.0  # cosine floor, as a fraction of learning_rate
    c.optimizer.grad_clip_norm = 0.0  # 0: no clipping
    c.optimizer.accumulate_steps = 1  # >1: K micro-batches of data.batch_size per step (exact)

    c.num_steps = 0  # exactly one of num_steps / num_epochs is > 0
    c.num_epochs = 0
    c.log_every = 50
    c.steps_per_call = 1  # K > 1: K train steps per jitted call (lax.scan), see README
    c.eval_every = 0  # 0: once per epoch
    c.checkpoint_every = 0  # 0: only at the end
    c.keep_checkpoints = 3
    c.best_metric = "val_accuracy"  # "" disables the best copy
    c.early_stopping = ml_collections.ConfigDict({"patience": 0, "min_delta": 0.0})

    c.init_from = ml_collections.ConfigDict()
    c.init_from.checkpoint = ""
    c.init_from.step = -1  # -1: latest
    c.init_from.rename = []
    c.init_from.reinit = []
    c.init_from.strict = True
    c.init_from.adapter = ""  # a PEFT LoRA folder: the run's adapters start from it

    c.partition = None  # list of (regex, {"trainable", "lr_mult", "wd_mult", "unfreeze_at"})
    c.lora = None  # {"rank", "alpha", "targets", "quantize": None | "int8" | "nf4" (QLoRA)}
    c.mesh = {"data": -1, "fsdp": 1, "tensor": 1}
    c.tasks = None  # multi-task fine-tuning: list of {"name", overrides...}
    # FedAvg (jaxdl.runs.federated): clients 0 = off; alpha 0 = IID shards, > 0 Dirichlet
    c.federated = ml_collections.ConfigDict(
        {"clients": 0, "rounds": 10, "local_steps": 10, "alpha": 0.0, "clients_per_round": 0}
    )
    # Experiment trackers (jaxdl.training.trackers): a comma list of tensorboard, wandb,
    # mlflow, trackio, jsonl. "" leaves a setting to the tracker's own default (and env vars:
    # WANDB_MODE, WANDB_DIR, MLFLOW_TRACKING_URI, TRACKIO_DIR); run names default to the
    # workdir's name.
    c.trackers = "tensorboard"
    c.wandb = ml_collections.ConfigDict(
        {"project": "jaxdl", "entity": "", "mode": "", "name": "", "tags": []}
    )
    c.mlflow = ml_collections.ConfigDict(
        {"tracking_uri": "", "experiment": "jaxdl", "run_name": ""}
    )
    c.trackio = ml_collections.ConfigDict({"project": "jaxdl", "name": ""})
    c.jsonl = ml_collections.ConfigDict({"path": ""})  # "": WORKDIR/events.jsonl
    return c


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Load ``path`` (a .py with get_config() or a config.json), apply overrides, validate."""
    path = resolve_config_path(path)
    if path.suffix == ".json":
        user = read_json(path)
    else:
        user = _get_config_from_module(path)
    cfg = merge_config(default_config(), user)
    for item in overrides:
        apply_override(cfg, item)
    validate(cfg)
    _register_model_file(cfg)
    return cfg


def _register_model_file(cfg: ml_collections.ConfigDict) -> None:
    """A config names the file of its user-registered model, so that a later process (a
    resume, `jaxdl evaluate`, `load_model`) can import it again."""
    from jaxdl.models.registry import import_model_file, model_source

    name = cfg.model.get("name")
    if cfg.model_file:
        import_model_file(cfg.model_file, name)
    else:
        cfg.model_file = model_source(name)


def shipped_configs() -> dict[str, Path]:
    """The configs in the wheel (`jaxdl/configs/NAME.py`), by NAME."""
    folder = Path(__file__).resolve().parent / "configs"
    return {p.stem: p for p in sorted(folder.glob("*.py")) if not p.stem.startswith("_")}


def resolve_config_path(path: str | Path) -> Path:
    """A config file: a path that exists, else the NAME of a config shipped in the wheel."""
    found = Path(path)
    if found.is_file():
        return found
    shipped = shipped_configs()
    if str(path) in shipped:
        return shipped[str(path)]
    raise UserError(
        f"--config: no file at {path}, and no shipped config of that name "
        f"(shipped: {sorted(shipped)}). Fix: pass a path to a config .py or one of those names."
    )


def _get_config_from_module(path: Path) -> Any:
    """Run the config file and its get_config() (errors as `run_user_file` reports them)."""

    def get_config(module):
        if not hasattr(module, "get_config"):
            raise UserError(
                f"--config: {path} defines no get_config(). Fix: add one returning a dict."
            )
        return module.get_config()

    config = run_user_file(path, f"jaxdl_config_{path.stem}", flag="--config", then=get_config)
    if not isinstance(config, Mapping | ml_collections.ConfigDict):
        raise UserError(
            f"--config: get_config() in {path} returned {type(config).__name__} "
            f"({str(config)[:40]!r}), expected a dict or ml_collections.ConfigDict. Fix: end "
            "get_config() with `return config`."
        )
    return config


def _to_plain(value: Any) -> Any:
    if isinstance(value, ml_collections.ConfigDict):
        return value.to_dict()
    return value


def merge_config(base: ml_collections.ConfigDict, user: Mapping[str, Any], prefix: str = ""):
    """Lay ``user`` over ``base``; unknown keys raise with the known ones listed."""
    for key, value in _to_plain(user).items():
        name = f"{prefix}{key}"
        if key not in base:
            if prefix.rstrip(".") in _OPEN_SECTIONS:
                base[key] = value
                continue
            raise UserError(
                f"config.{name}: unknown key. Expected one of {sorted(base.keys())}. "
                "Fix: check the spelling against jaxdl.config.default_config()."
            )
        current = base[key]
        if name in _OPEN_SECTIONS:  # the experiment's model section replaces the default whole
            base[key] = ml_collections.ConfigDict(dict(_to_plain(value)))
            continue
        if isinstance(current, ml_collections.ConfigDict) and name not in _FREE_VALUES:
            if not isinstance(value, Mapping | ml_collections.ConfigDict):
                raise UserError(f"config.{name}: expected a dict, found {value!r}.")
            merge_config(current, value, prefix=f"{name}.")
        else:
            base[key] = _check_type(name, current, value)
    return base


def _check_type(name: str, current: Any, value: Any) -> Any:
    """Values keep the default's type (ints widen to floats); free-form values pass."""
    if current is None or name in _FREE_VALUES or value is None:
        return value
    if isinstance(current, bool):
        ok = isinstance(value, bool)
    elif isinstance(current, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(current, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(current, str):
        ok = isinstance(value, str)
    elif isinstance(current, list | tuple):
        ok = isinstance(value, list | tuple)
        value = list(value) if ok else value
    else:
        ok = True
    if not ok:
        raise UserError(
            f"config.{name}: expected {type(current).__name__}, found {value!r} "
            f"({type(value).__name__}). Fix: give a {type(current).__name__} value."
        )
    return value


def parse_override(text: str) -> tuple[str, str]:
    """'--config.a.b=VALUE' or 'a.b=VALUE' -> ('a.b', 'VALUE')."""
    body = text.removeprefix("--").removeprefix("config.")
    if "=" not in body:
        raise UserError(f"{text}: expected --config.KEY=VALUE. Fix: add '=VALUE'.")
    key, raw = body.split("=", 1)
    return key, raw


def find_section(
    cfg: ml_collections.ConfigDict, key: str
) -> tuple[ml_collections.ConfigDict, str, str]:
    """'a.b.c' -> (the ConfigDict holding c, "c", "a.b"); a missing section is an error."""
    *parents, leaf = key.split(".")
    node = cfg
    for i, part in enumerate(parents):
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            raise UserError(
                f"config.{key}: unknown key ('{'.'.join(parents[: i + 1])}' is not a section). "
                "Fix: check the spelling against jaxdl.config.default_config()."
            )
        node = node[part]
    return node, leaf, ".".join(parents)


def apply_override(cfg: ml_collections.ConfigDict, text: str) -> None:
    """Apply one '--config.KEY=VALUE', parsing VALUE to the type the key already has."""
    key, raw = parse_override(text)
    node, leaf, section = find_section(cfg, key)
    if leaf not in node and section not in _OPEN_SECTIONS:
        raise UserError(
            f"config.{key}: unknown key. Expected one of {sorted(node.keys())}. "
            "Fix: check the spelling against jaxdl.config.default_config()."
        )
    current = node[leaf] if leaf in node else None
    value = _parse_value(key, current, raw)
    if key in _OPEN_SECTIONS and isinstance(value, dict):  # a whole new model section
        node[leaf] = ml_collections.ConfigDict(value)
        return
    if isinstance(current, ml_collections.ConfigDict) and key not in _FREE_VALUES:
        raise UserError(f"config.{key}: is a section; override one of its keys instead.")
    if leaf in node and isinstance(node[leaf], ml_collections.ConfigDict):
        node[leaf] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
    else:
        node[leaf] = _check_type(key, current, value)


def _parse_value(key: str, current: Any, raw: str) -> Any:
    if isinstance(current, str):
        return raw
    if isinstance(current, bool):
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise UserError(f"config.{key}: expected bool (true/false), found {raw!r}.")
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if current is None:
            return raw  # an open-section string option, e.g. model.activation=gelu
        kind = type(current).__name__
        raise UserError(
            f"config.{key}: expected {kind}, found {raw!r}. Fix: pass a {kind} literal."
        ) from None


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Cross-field checks that no single key can make."""
    if cfg.init_from.reinit and not cfg.init_from.checkpoint and not cfg.tasks:
        raise UserError(
            f"config.init_from.reinit: set to {list(cfg.init_from.reinit)} but "
            "init_from.checkpoint is empty, so nothing would be restored. Fix: pass "
            "--config.init_from.checkpoint=WORKDIR (or drop init_from.reinit)."
        )
    if (cfg.num_steps > 0) == (cfg.num_epochs > 0):
        raise UserError(
            f"config: expected exactly one of num_steps / num_epochs > 0, found "
            f"num_steps={cfg.num_steps}, num_epochs={cfg.num_epochs}. Fix: set one of them."
        )
    for key in ("data.batch_size", "log_every", "optimizer.accumulate_steps", "steps_per_call"):
        if cfg[key.split(".")[0]] is not None and _get(cfg, key) < 1:
            raise UserError(f"config.{key}: expected >= 1, found {_get(cfg, key)}.")
    defaults = default_config()
    for key, low in _LOWER_BOUNDS.items():
        value = _get(cfg, key)
        if value < low:
            raise UserError(
                f"config.{key}: expected an int >= {low}, found {value}. Fix: set it to "
                f"{_get(defaults, key)} (the default) or another value >= {low}."
            )
    from jaxdl.data.chat import check_options
    from jaxdl.training.trackers import parse_names

    check_options(cfg.data)
    parse_names(cfg.trackers)
    if cfg.wandb.mode not in ("", "online", "offline", "disabled", "shared"):
        raise UserError(
            f"config.wandb.mode: expected online, offline or disabled (or empty: WANDB_MODE, "
            f"else W&B's default), found {cfg.wandb.mode!r}. Fix: --config.wandb.mode=offline."
        )
    if cfg.optimizer.learning_rate <= 0:
        raise UserError(
            f"config.optimizer.learning_rate: expected > 0, found {cfg.optimizer.learning_rate}."
        )
    alpha = cfg.federated.alpha
    if not alpha >= 0:  # NaN too
        raise UserError(
            f"config.federated.alpha: expected 0 (IID client shards) or a Dirichlet "
            f"concentration > 0 (smaller = more label skew), found {alpha}. Fix: set "
            "--config.federated.alpha=0.1, or 0 for IID shards."
        )
    if cfg.lora is not None:
        from jaxdl.core.quant import check_kind

        lora = dict(cfg.lora)
        missing = {"rank", "alpha", "targets"} - lora.keys()
        extra = lora.keys() - {"rank", "alpha", "targets", "quantize"}
        if missing and "quantize" in lora:
            raise UserError(
                f"config.lora.quantize: a quantized base needs LoRA adapters to train, found "
                f"lora={lora!r} without {sorted(missing)}. Fix: set lora.rank, lora.alpha and "
                "lora.targets too (QLoRA), or lora=None."
            )
        if missing or extra:
            raise UserError(
                f"config.lora: expected keys rank, alpha, targets (and optionally quantize); "
                f"missing {sorted(missing)}, unknown {sorted(extra)}."
            )
        check_kind(lora.get("quantize"))


# Sizes and counts a negative value would turn into a confusing failure far from the config
# (e.g. "__len__() should return >= 0" for a negative eval batch); 0 means "the default".
_LOWER_BOUNDS = {
    "data.eval_batch_size": 0,
    "data.image_size": 0,
    "data.channels": 0,
    "data.num_workers": 0,
    "data.prefetch": 0,
    "data.max_bytes": 0,
    "data.num_examples": 0,
    "data.seq_len": 1,
    "data.max_image_pixels": 1,
    "federated.clients": 0,
    "federated.clients_per_round": 0,
}


def _get(cfg: ml_collections.ConfigDict, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def to_json(cfg: ml_collections.ConfigDict) -> str:
    """The resolved config as canonical JSON (what config.json holds)."""
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=list)
