"""From a resolved config to everything a step needs: model, task, optimizer, state.

The phases run in the order of DESIGN.md: model init -> optional pretrained restore ->
LoRA adapters -> partition plan -> optimizer over the trainable part -> TrainState.
Pure construction: nothing here writes files (the trainer does that).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxdl.checkpoint import deferred
from jaxdl.core import adapters, heads, quant
from jaxdl.core import tree as tree_lib
from jaxdl.core.optim import make_optimizer, opt_state_slots
from jaxdl.core.state import TrainState
from jaxdl.errors import UserError
from jaxdl.finetune import lora, partition
from jaxdl.models import create_model
from jaxdl.models.registry import option_names


@dataclasses.dataclass
class Setup:
    model: nn.Module
    head: heads.Head
    tx: optax.GradientTransformation
    state: TrainState
    plan: dict[str, partition.LeafPlan]
    plan_rows: list[dict]
    init_report: dict | None
    lora_cfg: dict | None
    batch_spec: dict[str, tuple[tuple[int, ...], Any]]  # per-example shapes the model was built for
    layout: Any = None  # jaxdl.parallel.sharding.Layout when built on a mesh


def check_vocabulary(model, kind: str, vocab_size: int) -> None:
    """A language model's embedding must cover its tokenizer's ids: larger ids index past
    the table and come back as NaN logits that would blame the learning rate."""
    model_vocab = getattr(getattr(model, "spec", None), "vocab_size", None)
    if kind in ("lm", "sft") and None not in (model_vocab, vocab_size) and vocab_size > model_vocab:
        raise UserError(
            f"data.tokenizer: its vocabulary has {vocab_size} ids, model.vocab_size is "
            f"{model_vocab}. Fix: use the tokenizer that came with the model (an imported "
            "workdir's tokenizer.json: data.tokenizer='base' with init_from) or raise "
            "model.vocab_size."
        )


def lora_config(cfg: ml_collections.ConfigDict) -> dict | None:
    """cfg.lora as a dict, ``quantize`` (None: a float base) filled in; None without LoRA."""
    return None if cfg.lora is None else {"quantize": None, **dict(cfg.lora)}


def saves_frozen(lora_cfg: Mapping | None) -> bool:
    """Whether checkpoints hold the frozen params: a full run's, and a QLoRA run's quantized
    base (it is what the adapters trained on; a LoRA run's float base lives in init_from)."""
    return lora_cfg is None or lora_cfg.get("quantize") is not None


def quantize_frozen(
    frozen: dict, kind: str | None, layer_axes: Mapping[str, int] | None = None
) -> dict:
    """The frozen tree with its kernels (2-D, or stacked over layers: ``layer_axes``) stored
    quantized (`jaxdl.core.quant`); a quantized run's ``frozen`` is emptied as its kernels
    are done (its float copies freed)."""
    if kind is None:
        return frozen
    stored = quant.quantize_kernels(
        frozen, kind, consume=True, made=deferred.made, layer_axes=layer_axes
    )
    if not quant.has_quantized(stored):
        raise UserError(
            f"lora.quantize={kind!r}: no frozen 2-D kernel to quantize (the partition plan "
            "trains every kernel). Fix: freeze the base (drop `partition`) or lora.quantize=None."
        )
    return stored


def with_data_fields(model_cfg: Mapping, fields: Mapping) -> dict:
    """model config with the data's fields laid over it, for the options the model takes."""
    accepted = option_names(model_cfg["name"]) or set()
    return {**model_cfg, **{k: v for k, v in fields.items() if k in accepted}}


def sample_input(example_spec: Mapping[str, tuple], input_key: str, batch: int = 1) -> jax.Array:
    shape, dtype = example_spec[input_key]
    return jnp.zeros((batch, *shape), dtype)


def init_variables(model: nn.Module, sample: jax.Array, seed: int) -> dict:
    """Fresh model variables as host arrays, computed once under jit.

    Initialisation runs on one device (the mesh places the result), so it uses the
    non-partitionable threefry, which XLA compiles faster on CPU (benchmarks/README.md);
    the values stay a pure function of the seed.
    """
    rngs = {"params": jax.random.PRNGKey(seed), "dropout": jax.random.PRNGKey(seed + 1)}
    with jax.threefry_partitionable(False):
        variables = _jitted_init(model)(rngs, sample)
    return jax.tree.map(np.asarray, dict(variables))


def shapes_of(tree: Any) -> Any:
    """``tree`` with jax.ShapeDtypeStruct leaves: its structure without holding its arrays."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(_shape(x), x.dtype), tree)


def _shape(x: Any) -> tuple[int, ...]:
    # a Deferred leaf has a shape but is no array (np.shape would see a scalar object)
    return tuple(x.shape) if isinstance(x, deferred.Deferred) else np.shape(x)


def to_device_consuming(tree: dict) -> dict:
    """``jax.tree.map(jnp.asarray, tree)``, popping each host leaf from ``tree`` once it is
    on the device, so a large base is not held twice (host numpy and device copy)."""
    out = {}
    for key in list(tree):
        value = tree.pop(key)
        if isinstance(value, dict):
            out[key] = to_device_consuming(value)
        else:
            out[key] = None if value is None else jnp.asarray(deferred.made(value))
    return out


def abstract_variables(model: nn.Module, sample: jax.Array) -> dict:
    """The shapes and dtypes of `init_variables`' result (jax.ShapeDtypeStruct leaves),
    computed without allocating them."""
    rngs = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}
    with jax.threefry_partitionable(False):
        return dict(jax.eval_shape(_jitted_init(model), rngs, sample))


def fill_fresh(variables: dict, model: nn.Module, sample: jax.Array, seed: int) -> dict:
    """`variables` with every leaf still abstract (the checkpoint did not supply it: a new
    head, a reinit rule) taken from the fresh init, which is computed only when one is."""
    flat = tree_lib.flatten(variables)
    missing = [p for p, v in flat.items() if isinstance(v, jax.ShapeDtypeStruct)]
    if not missing:
        return variables
    fresh = tree_lib.flatten(init_variables(model, sample, seed))
    flat.update({p: fresh[p] for p in missing})
    return tree_lib.unflatten(flat)


def _jitted_init(model: nn.Module):
    """One compiled init per distinct model: a sweep's members (or the runs of one process)
    that differ only in seed reuse it instead of compiling it again (6 s each, here)."""
    try:
        return _cached_init(model)
    except TypeError:  # a model with an unhashable option (e.g. a list): compile anew
        return jax.jit(lambda r, x: model.init(r, x, train=False))


@functools.lru_cache(maxsize=16)
def _cached_init(model: nn.Module):
    return jax.jit(lambda r, x: model.init(r, x, train=False))


def build(
    cfg: ml_collections.ConfigDict,
    *,
    kind: str,
    example_spec: Mapping[str, tuple],
    num_classes: int,
    total_steps: int,
    restore_fn=None,
    mesh: jax.sharding.Mesh | None = None,
    task_fields: Mapping[str, Mapping] | None = None,
) -> Setup:
    """Build model, task, optimizer and initial TrainState for ``cfg``.

    ``restore_fn(init_from, variables) -> (variables, report)`` loads pretrained weights
    (`jaxdl.finetune.surgery.restore_pretrained`); it is called only when init_from is set.
    With a ``mesh`` the state is created sharded (`jaxdl.parallel.sharding`) and ``Setup.layout``
    says where each leaf lives. ``task_fields`` (`Data.task_fields`) are what the data fixes:
    model options it accepts (a table's columns, output width) and head constants.
    """
    model = create_model(with_data_fields(cfg.model, (task_fields or {}).get("model", {})))
    head = heads.make_head(kind, cfg.loss, num_classes, **(task_fields or {}).get("head", {}))
    if head.input_key not in example_spec:
        raise UserError(
            f"data.source: a {kind} task needs batches with {head.input_key!r}, the data has "
            f"{sorted(example_spec)}. Fix: pair the model with a matching data source."
        )
    check_vocabulary(model, kind, num_classes)
    sample = sample_input(example_spec, head.input_key)
    init_report = None
    lora_cfg = lora_config(cfg)
    quantizing = lora_cfg is not None and lora_cfg["quantize"] is not None
    if cfg.init_from.checkpoint:
        default_restore = restore_fn is None
        if default_restore:
            from jaxdl.finetune.surgery import restore_pretrained as restore_fn
        init_from = cfg.init_from.to_dict()
        init_from["step"] = None if init_from["step"] < 0 else init_from["step"]
        # Restored over the model's shapes: a fresh init of the leaves the checkpoint
        # supplies would double the peak memory of fine-tuning a large base.
        # QLoRA: the checkpoint's leaves are read one group at a time as the frozen kernels
        # are quantized, so the float base is never held whole (its size is what QLoRA
        # is there to avoid)
        options = {}
        if default_restore:
            # a per-layer checkpoint (an import's) restores into a scan_layers model too
            options["stacked"] = getattr(model, "STACKED", None)
            options["deferred"] = quantizing
        variables, init_report = restore_fn(init_from, abstract_variables(model, sample), **options)
        variables = fill_fresh(variables, model, sample, cfg.seed)
    else:
        variables = init_variables(model, sample, cfg.seed)

    params = {"params": variables["params"]}
    model_state = {k: v for k, v in variables.items() if k != "params"}
    layer_axes = None
    if lora_cfg is not None:
        # layers stacked by nn.scan get one adapter (and one quantization) per layer
        layer_axes = adapters.layer_axes(
            lambda v: model.apply(v, sample, train=False), abstract_variables(model, sample)
        )
        params["lora"] = lora.init_adapters(
            jax.random.PRNGKey(cfg.seed + 2),
            params,
            rank=int(lora_cfg["rank"]),
            targets=lora_cfg["targets"],
            layer_axes=layer_axes,
        )
        if cfg.init_from.get("adapter"):
            from jaxdl.interop.peft import read_adapter

            params["lora"] = read_adapter(
                cfg.init_from.adapter, params["lora"], cfg.model.to_dict(), lora_cfg
            )
    elif cfg.init_from.get("adapter"):
        raise UserError(
            "init_from.adapter: a PEFT adapter needs a LoRA run, found lora=None. Fix: set "
            "lora.rank, lora.alpha and lora.targets to the adapter's r, lora_alpha and modules."
        )

    rules = (
        partition.default_rules(lora=lora_cfg is not None)
        if cfg.partition is None
        else [(regex, dict(fields)) for regex, fields in cfg.partition]
    )
    plan = partition.make_plan(params, rules)
    trainable, frozen = partition.split(params, plan)
    param_shapes = shapes_of(params)
    trainable_shapes = shapes_of(trainable)  # for the optimizer's closures, which outlive it
    # From here trainable / frozen alone hold the arrays, so a float kernel is freed as soon
    # as it is quantized or on the device: a large base is held once, not two or three times.
    del params, variables
    frozen = quantize_frozen(frozen, None if lora_cfg is None else lora_cfg["quantize"], layer_axes)

    def lr_mults(step):
        return partition.lr_mult_tree(plan, trainable_shapes, step)

    tx = make_optimizer(
        cfg.optimizer,
        total_steps,
        lr_mults=lr_mults,
        wd_mults=partition.wd_mult_tree(plan, trainable_shapes),
    )

    def init_state(trainable, frozen, model_state):
        rng = jax.random.PRNGKey(cfg.seed + 3)
        return TrainState.create(trainable, tx, rng, frozen=frozen, model_state=model_state)

    stored_bytes = quant.quantized_bytes(frozen)
    layout = None
    if mesh is None:
        parts = (trainable, frozen, model_state)
        del trainable, frozen, model_state
        state = init_state(*(to_device_consuming(p) for p in parts))
    else:
        from jaxdl.parallel import sharding

        parts = jax.tree.map(deferred.made, (trainable, frozen, model_state))
        state, layout = sharding.create_state(init_state, parts, mesh)
    rows = partition.plan_rows(
        plan,
        param_shapes,
        base_lr=float(cfg.optimizer.learning_rate),
        opt_state_slots=opt_state_slots(cfg.optimizer),
        stored_bytes=stored_bytes,
    )
    return Setup(
        model=model,
        head=head,
        tx=tx,
        state=state,
        plan=plan,
        plan_rows=rows,
        init_report=init_report,
        lora_cfg=lora_cfg,
        batch_spec=dict(example_spec),
        layout=layout,
    )
