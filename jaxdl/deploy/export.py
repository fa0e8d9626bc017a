"""Deployment: a trained workdir -> one `jax.export` artifact + JSON sidecar.

    jaxdl.training.evaluate.export_workdir("runs/digits_cnn", "digits.jaxexport")  # + .json

Running an artifact is `jaxdl.deploy.predict` (load, predict, predict_files).

The artifact is `jax.export`'s serialized StableHLO of ``predict(x_raw)``: parameters are
embedded as constants (LoRA merged; int8 with ``quantize="int8"``, dequantized inside the
function), the batch dimension is symbolic, and the pure-array part of the evaluation
preprocessing runs inside it:

    classification  x: float32 [B, H, W, C] raw pixel values (the dataset's own units:
                    0..255 for 8-bit images, digits included) -> / pixel_scale -> snapped
                    to the source's levels if it has them (digits: 17) -> normalize
                    -> model -> softmax probabilities [B, num_classes]
    lm              tokens int32 [B, T] (right-padded), lengths int32 [B] -> next-token
                    probabilities [B, V] after position lengths - 1 (causal: padding after
                    it changes nothing)
    text classes    tokens int32 [B, T] (bytes, right-padded with 0) -> softmax [B, C]
    tables          features float32 [B, F] (rows encoded with the train split's statistics,
                    which the sidecar holds: `predict_files` encodes CSV rows) -> softmax
                    [B, C] (classification), sigmoid [B, 1] / [B, L] (binary, multilabel),
                    targets [B, K] in original units (regression)

Geometric preprocessing (resize, center crop) is not an array op the artifact can repeat
bit-for-bit (Pillow's antialiased resize), so `predict_files` does it on the host from the
sidecar's description; both are linear, so doing them on raw pixels before the scaling
matches the training pipeline up to float rounding (exactly when there is none, as for
digits). The sidecar ``MODEL.jaxexport.json`` holds everything else a caller needs: model
name, input shape and dtype, preprocessing, class names or vocabulary, jax and format
versions, platforms, quantization, and the artifact's sha256 (a corrupt copy is refused).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdl.deploy.artifact import FORMAT, FORMAT_VERSION, sidecar_path
from jaxdl.deploy.quantize import dequantize, quantize_params
from jaxdl.errors import UserError
from jaxdl.fileio import atomic_write_bytes

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
QUANTIZATIONS = ("int8",)
_HOST_OPS = ("resize", "center_crop")  # done by predict_files, before the artifact
_LABEL_OPS = ("one_hot",)  # act on labels only: nothing to export
_OUTPUT_MEANING = {
    "lm": "next-token probabilities",
    "image": "softmax probabilities",
    "classification": "softmax probabilities",
    "binary": "probability of the positive class (class_names[1])",
    "multilabel": "probability of each label",
    "regression": "targets in their original units",
}


# ---- the exported functions ----------------------------------------------------------------


def _params_of(variables: Mapping, quantized: bool):
    params = variables["params"]
    return dequantize(params) if quantized else params


def classifier_fn(
    model,
    variables: Mapping,
    *,
    pixel_scale: float,
    levels: int | None = None,
    normalize: Sequence[tuple[Sequence[float], Sequence[float]]] = (),
    quantized: bool = False,
):
    """predict(x float32 [B, H, W, C] raw pixels) -> softmax probabilities [B, C].

    ``levels``: snap the scaled pixels to that many levels, as the source decodes
    (`jaxdl.data.records.quantize_levels`).
    """

    def predict(x):
        x = x.astype(jnp.float32) / jnp.float32(pixel_scale)
        if levels:
            x = jnp.round(x * jnp.float32(levels - 1)) / jnp.float32(levels - 1)
        for mean, std in normalize:
            x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
        params = _params_of(variables, quantized)
        logits = model.apply({**variables, "params": params}, x, train=False)
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

    return predict


def table_fn(
    model,
    variables: Mapping,
    *,
    kind: str,
    target: Mapping[str, Sequence[float]] | None = None,
    quantized: bool = False,
):
    """predict(features float32 [B, F]) -> probabilities, or regression targets in original
    units (``target``: the train "target_mean" / "target_std")."""

    def predict(x):
        params = _params_of(variables, quantized)
        out = model.apply({**variables, "params": params}, x, train=False).astype(jnp.float32)
        if kind == "classification":
            return jax.nn.softmax(out, axis=-1)
        if kind in ("binary", "multilabel"):
            return jax.nn.sigmoid(out)
        assert kind == "regression" and target is not None, kind
        std = jnp.asarray(target["target_std"], jnp.float32)
        return out * std + jnp.asarray(target["target_mean"], jnp.float32)

    return predict


def lm_fn(model, variables: Mapping, *, quantized: bool = False):
    """predict(tokens int32 [B, T], lengths int32 [B]) -> next-token probabilities [B, V]."""

    def predict(tokens, lengths):
        params = _params_of(variables, quantized)
        logits = model.apply({**variables, "params": params}, tokens, train=False)  # [B, T, V]
        last = jnp.clip(lengths - 1, 0, tokens.shape[1] - 1)
        logits = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

    return predict


# ---- preprocessing: what runs where --------------------------------------------------------


def split_transforms(transforms: Sequence[Mapping]) -> tuple[list[dict], list[dict]]:
    """The eval transforms (their `describe()` dicts) -> (host ops, in-artifact normalizes).

    Normalization is per-channel affine, so it commutes with (linear, weight-sum-1) resizes
    and crops: running it after the host ops is exact whatever the configured order.
    """
    host, normalize = [], []
    for op in transforms:
        name = op.get("name")
        if name in _HOST_OPS:
            host.append(dict(op))
        elif name == "normalize":
            normalize.append(dict(op))
        elif name not in _LABEL_OPS:
            raise UserError(
                f"data.transforms: cannot export transform {name!r} ({op}); "
                f"export supports {sorted(_HOST_OPS + _LABEL_OPS + ('normalize',))}. "
                "Fix: remove it from data.transforms or retrain without it."
            )
    return host, normalize


def _image_file_spec(cfg, data, input_shape: Sequence[int], host: Sequence[Mapping]) -> dict:
    """How an image file becomes the artifact's input (see `load_image`).

    decode_size is the size the source decodes to: data.image_size when set (the source
    resizes to it), the model input size when no host op changes it, else None (the
    source's native size, whatever the file has).
    """
    from jaxdl.data.images import DEFAULT_MAX_PIXELS
    from jaxdl.data.records import image_size, opt

    prep = data.preprocessing
    scale = float(prep.get("pixel_scale", 1.0))
    source = str(prep.get("source", ""))
    configured = image_size(cfg.data)
    if source.startswith("imagefolder:"):
        # The imagefolder source converts and resizes 8-bit images with Pillow.
        decode_size, resize = [int(s) for s in prep["image_size"]], "pillow_uint8"
    elif configured is not None:
        decode_size, resize = list(configured), "float"
    else:
        decode_size, resize = (None if host else [int(s) for s in input_shape[:2]]), None
    channels = int(input_shape[-1])
    return {
        "mode": "L" if channels == 1 else "RGB",
        "max_image_pixels": int(opt(cfg.data, "max_image_pixels", DEFAULT_MAX_PIXELS)),
        "decode_size": decode_size,
        "resize": resize,
        "pixel_scale": scale,
        "encoding": f"file pixel value p = the dataset's raw value, model input = p / {scale:g}",
    }


# ---- export --------------------------------------------------------------------------------


def _input_name(kind: str, table: Mapping | None, tokens: bool) -> str:
    if kind == "lm":
        return "inputs"
    return "tokens" if tokens else "features" if table is not None else "image"


def _check_platforms(platforms: Sequence[str]) -> tuple[str, ...]:
    platforms = tuple(platforms)
    bad = [p for p in platforms if p not in PLATFORMS]
    if not platforms or bad:
        raise UserError(
            f"--platform: expected some of {list(PLATFORMS)}, found "
            f"{list(platforms)}. Fix: e.g. --platform cpu --platform cuda."
        )
    return platforms


@contextlib.contextmanager
def _no_builder_paths() -> Iterator[None]:
    """Source locations in the artifact name files, not the builder's directories.

    By default the StableHLO carries every op's full Python traceback with absolute paths:
    the artifact would leak where it was built and its size would depend on the checkout's
    path. One frame per op, file basename only, keeps the locations useful for debugging.
    """
    options = {
        "jax_include_full_tracebacks_in_locations": False,
        "jax_hlo_source_file_canonicalization_regex": r".*/",
    }
    saved = {name: getattr(jax.config, name) for name in options}
    try:
        for name, value in options.items():
            jax.config.update(name, value)
        yield
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)


def export_model(
    model,
    variables: Mapping,
    out_path: str | Path,
    *,
    kind: str,
    input_shape: Sequence[int],
    platforms: Sequence[str] = ("cpu",),
    quantize: str | None = None,
    pixel_scale: float = 1.0,
    levels: int | None = None,
    normalize: Sequence[tuple] = (),
    metadata: Mapping | None = None,
    table: Mapping | None = None,
    tokens: bool = False,
) -> dict:
    """Serialize `model` with `variables` ({"params", ...}) to out_path + sidecar.

    input_shape: one example's shape ((H, W, C) images, (T,) tokens, (F,) table rows).
    ``table`` (tables only): {"target_mean", "target_std"} for regression, else {}.
    ``tokens``: a text classifier over int32 token rows. Returns the sidecar.
    """
    platforms = _check_platforms(platforms)
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise UserError(f"--quantize: expected one of {list(QUANTIZATIONS)}, found {quantize!r}.")
    variables = jax.tree.map(np.asarray, jax.device_get(dict(variables)))
    quantization = None
    if quantize == "int8":
        qparams, report = quantize_params(variables["params"])
        variables = {**variables, "params": qparams}
        quantization = {k: v for k, v in report.items() if k != "quantized"}
        quantization["kernels"] = len(report["quantized"])
    batch = jax.export.symbolic_shape("b")[0]
    if kind == "lm":
        fn = lm_fn(model, variables, quantized=quantize is not None)
        specs = (
            jax.ShapeDtypeStruct((batch, *input_shape), jnp.int32),
            jax.ShapeDtypeStruct((batch,), jnp.int32),
        )
    elif table is not None or tokens:
        fn = table_fn(model, variables, kind=kind, target=table, quantized=quantize is not None)
        dtype = jnp.int32 if tokens else jnp.float32
        specs = (jax.ShapeDtypeStruct((batch, *input_shape), dtype),)
    else:
        fn = classifier_fn(
            model,
            variables,
            pixel_scale=pixel_scale,
            levels=levels,
            normalize=normalize,
            quantized=quantize is not None,
        )
        specs = (jax.ShapeDtypeStruct((batch, *input_shape), jnp.float32),)
    with _no_builder_paths():
        exported = jax.export.export(jax.jit(fn), platforms=platforms)(*specs)
    blob = bytes(exported.serialize())

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "jax_version": jax.__version__,
        "calling_convention_version": int(exported.calling_convention_version),
        "platforms": list(platforms),
        "kind": kind,
        "input": {
            "name": _input_name(kind, table, tokens),
            "shape": [None, *map(int, input_shape)],
            "dtype": "int32" if kind == "lm" or tokens else "float32",
        },
        "output": {
            "shape": [None, int(exported.out_avals[0].shape[-1])],
            "meaning": _OUTPUT_MEANING[kind if table is not None or kind == "lm" else "image"],
        },
        "quantization": quantization,
        "artifact_bytes": len(blob),
        "artifact_sha256": hashlib.sha256(blob).hexdigest(),
        **(metadata or {}),
    }
    if kind == "lm":
        meta["input"]["lengths"] = {"shape": [None], "dtype": "int32"}
    atomic_write_bytes(out_path, blob)
    atomic_write_bytes(
        sidecar_path(out_path), (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()
    )
    return meta


def export_run(
    cfg,
    setup,
    data,
    out_path: str | Path,
    *,
    params: Mapping | None = None,
    platforms: Sequence[str] = ("cpu",),
    quantize: str | None = None,
    workdir: str | Path | None = None,
) -> dict:
    """Export a built run (`restore_run`'s cfg, setup, data); `params` replaces the state's
    full model params (e.g. pruned ones). Returns the sidecar."""
    from jaxdl.core import steps

    _check_platforms(platforms)
    state = setup.state
    if params is None:
        params = steps.model_params(state.params, state.frozen, setup.lora_cfg)
    variables = {"params": params, **state.model_state}
    spec_shape = tuple(data.example_spec[setup.head.input_key][0])
    meta: dict[str, Any] = {"model": str(cfg.model.name), "step": int(state.step)}
    if workdir is not None:
        meta["workdir"] = str(Path(workdir).resolve())
    kwargs: dict[str, Any] = {}
    if data.preprocessing.get("input") == "features":  # a table: rows encoded on the host
        meta["preprocessing"] = {"source": data.preprocessing}
        meta["class_names"] = data.class_names or data.preprocessing["label_columns"]
        kwargs = {"table": data.preprocessing["target"]}
    elif data.preprocessing.get("input") == "tokens":  # texts (textfolder:, data.text_column)
        meta["preprocessing"] = {"source": data.preprocessing}
        meta["class_names"] = data.class_names or data.preprocessing["label_columns"]
        kwargs = {"tokens": True, "table": data.preprocessing.get("target")}
    elif data.kind == "lm":
        meta["preprocessing"] = {"source": data.preprocessing}
        meta["vocabulary"] = {
            "tokenizer": data.preprocessing.get("tokenizer"),
            "vocab_size": int(data.num_classes),
        }
    else:
        host, normalize = split_transforms(data.preprocessing.get("transforms", []))
        image_file = _image_file_spec(cfg, data, spec_shape, host)
        levels = data.preprocessing.get("levels")
        kwargs = {
            "pixel_scale": image_file["pixel_scale"],
            "levels": levels,
            "normalize": [(op["mean"], op["std"]) for op in normalize],
        }
        meta["preprocessing"] = {
            "source": data.preprocessing,
            "image_file": image_file,
            "host": host,
            "in_artifact": [
                {"name": "scale", "divide_by": image_file["pixel_scale"]},
                *([{"name": "quantize", "levels": levels}] if levels else []),
                *normalize,
                {"name": "softmax"},
            ],
        }
        meta["class_names"] = (
            list(data.class_names)
            if data.class_names
            else [str(i) for i in range(data.num_classes)]
        )
    return export_model(
        setup.model,
        variables,
        out_path,
        kind=data.kind,
        input_shape=spec_shape,
        platforms=platforms,
        quantize=quantize,
        metadata=meta,
        **kwargs,
    )
