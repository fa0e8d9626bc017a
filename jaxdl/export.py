"""Deployment: a trained workdir -> one `jax.export` artifact + JSON sidecar; load; predict.

    export_workdir("runs/digits_cnn", "digits.jaxexport")       # + digits.jaxexport.json
    predictor = load("digits.jaxexport")
    probs = predictor.predict(raw_pixels)                         # [B, C], any B

The artifact is `jax.export`'s serialized StableHLO of ``predict(x_raw)``: parameters are
embedded as constants (LoRA merged; int8 with ``quantize="int8"``, dequantized inside the
function), the batch dimension is symbolic, and the pure-array part of the evaluation
preprocessing runs inside it:

    classification  x: float32 [B, H, W, C] raw pixel values (the dataset's own units, e.g.
                    0..16 for digits, 0..255 for 8-bit images) -> / pixel_scale -> normalize
                    -> model -> softmax probabilities [B, num_classes]
    lm              tokens int32 [B, T] (right-padded), lengths int32 [B] -> next-token
                    probabilities [B, V] after position lengths - 1 (causal: padding after
                    it changes nothing)

Geometric preprocessing (resize, center crop) is not an array op the artifact can repeat
bit-for-bit (Pillow's antialiased resize), so `predict_files` does it on the host from the
sidecar's description; both are linear, so doing them on raw pixels before the scaling
matches the training pipeline up to float rounding (exactly when there is none, as for
digits). The sidecar ``MODEL.jaxexport.json`` holds everything else a caller needs: model
name, input shape and dtype, preprocessing, class names or vocabulary, jax and format
versions, platforms, quantization, and the artifact's sha256 (a corrupt copy is refused).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdl.quantize import dequantize, quantize_params

FORMAT = "jaxdl.export"
FORMAT_VERSION = 1
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
QUANTIZATIONS = ("int8",)
_HOST_OPS = ("resize", "center_crop")  # done by predict_files, before the artifact
_LABEL_OPS = ("one_hot",)  # act on labels only: nothing to export
_FIX = "Fix: re-export with `jaxdl export`."


def sidecar_path(path: str | Path) -> Path:
    """MODEL.jaxexport -> MODEL.jaxexport.json"""
    return Path(f"{path}.json")


# ---- the exported functions ----------------------------------------------------------------


def _params_of(variables: Mapping, quantized: bool):
    params = variables["params"]
    return dequantize(params) if quantized else params


def classifier_fn(
    model,
    variables: Mapping,
    *,
    pixel_scale: float,
    normalize: Sequence[tuple[Sequence[float], Sequence[float]]] = (),
    quantized: bool = False,
):
    """predict(x float32 [B, H, W, C] raw pixels) -> softmax probabilities [B, C]."""

    def predict(x):
        x = x.astype(jnp.float32) / jnp.float32(pixel_scale)
        for mean, std in normalize:
            x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
        params = _params_of(variables, quantized)
        logits = model.apply({**variables, "params": params}, x, train=False)
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

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
            raise ValueError(
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
    from jaxdl.data.sources import image_size

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
        "decode_size": decode_size,
        "resize": resize,
        "pixel_scale": scale,
        "encoding": (
            f"file pixel value p = the dataset's raw value, model input = p / {scale:g}"
            + (
                "; digits PNGs hold the raw 0..16 values, as the dataset does"
                if source == "digits"
                else ""
            )
        ),
    }


# ---- export --------------------------------------------------------------------------------


def _check_platforms(platforms: Sequence[str]) -> tuple[str, ...]:
    platforms = tuple(platforms)
    bad = [p for p in platforms if p not in PLATFORMS]
    if not platforms or bad:
        raise ValueError(
            f"--platform: expected some of {list(PLATFORMS)}, found "
            f"{list(platforms)}. Fix: e.g. --platform cpu --platform cuda."
        )
    return platforms


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


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
    normalize: Sequence[tuple] = (),
    metadata: Mapping | None = None,
) -> dict:
    """Serialize `model` with `variables` ({"params", ...}) to out_path + sidecar.

    input_shape: one example's shape ((H, W, C) images, (T,) tokens). Returns the sidecar.
    """
    platforms = _check_platforms(platforms)
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ValueError(f"--quantize: expected one of {list(QUANTIZATIONS)}, found {quantize!r}.")
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
    else:
        fn = classifier_fn(
            model,
            variables,
            pixel_scale=pixel_scale,
            normalize=normalize,
            quantized=quantize is not None,
        )
        specs = (jax.ShapeDtypeStruct((batch, *input_shape), jnp.float32),)
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
            "name": "inputs" if kind == "lm" else "image",
            "shape": [None, *map(int, input_shape)],
            "dtype": "int32" if kind == "lm" else "float32",
        },
        "output": {
            "shape": [None, int(exported.out_avals[0].shape[-1])],
            "meaning": "next-token probabilities" if kind == "lm" else "softmax probabilities",
        },
        "quantization": quantization,
        "artifact_bytes": len(blob),
        "artifact_sha256": hashlib.sha256(blob).hexdigest(),
        **(metadata or {}),
    }
    if kind == "lm":
        meta["input"]["lengths"] = {"shape": [None], "dtype": "int32"}
    _write_atomic(out_path, blob)
    _write_atomic(
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
    from jaxdl import steps

    _check_platforms(platforms)
    state = setup.state
    if params is None:
        params = steps.model_params(state.params, state.frozen, setup.lora_cfg)
    variables = {"params": params, **state.model_state}
    spec_shape = tuple(data.example_spec[setup.task.input_key][0])
    meta: dict[str, Any] = {"model": str(cfg.model.name), "step": int(state.step)}
    if workdir is not None:
        meta["workdir"] = str(Path(workdir).resolve())
    kwargs: dict[str, Any] = {}
    if data.kind == "lm":
        meta["preprocessing"] = {"source": data.preprocessing}
        meta["vocabulary"] = {
            "tokenizer": data.preprocessing.get("tokenizer"),
            "vocab_size": int(data.num_classes),
        }
    else:
        host, normalize = split_transforms(data.preprocessing.get("transforms", []))
        image_file = _image_file_spec(cfg, data, spec_shape, host)
        kwargs = {
            "pixel_scale": image_file["pixel_scale"],
            "normalize": [(op["mean"], op["std"]) for op in normalize],
        }
        meta["preprocessing"] = {
            "source": data.preprocessing,
            "image_file": image_file,
            "host": host,
            "in_artifact": [
                {"name": "scale", "divide_by": image_file["pixel_scale"]},
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


def export_workdir(
    workdir: str | Path,
    out_path: str | Path,
    *,
    platforms: Sequence[str] = ("cpu",),
    quantize: str | None = None,
) -> dict:
    """The latest checkpoint of a `jaxdl train` workdir -> artifact + sidecar; the sidecar."""
    from jaxdl.evaluate import restore_run

    _check_platforms(platforms)
    cfg, setup, data = restore_run(workdir)
    return export_run(
        cfg, setup, data, out_path, platforms=platforms, quantize=quantize, workdir=workdir
    )


# ---- load ----------------------------------------------------------------------------------


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in str(text).split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit()) or "0"
        parts.append(int(digits))
    return tuple(parts)


def check_compatible(path: str | Path, meta: Mapping) -> None:
    """Refuse artifacts of another format version, a newer jax (export is not forward
    compatible) or a calling convention this jax cannot run."""
    convention = meta.get("calling_convention_version", -1)
    ok = (
        meta.get("format_version") == FORMAT_VERSION
        and _version(meta.get("jax_version", "0")) <= _version(jax.__version__)
        and jax.export.minimum_supported_calling_convention_version
        <= convention
        <= jax.export.maximum_supported_calling_convention_version
    )
    if not ok:
        raise ValueError(
            f"{path}: built with jax {meta.get('jax_version')} (format "
            f"{meta.get('format_version')}); this is jax {jax.__version__} "
            f"(format {FORMAT_VERSION}). {_FIX}"
        )


def read_metadata(path: str | Path) -> dict:
    """The sidecar of an artifact, checked for format and version."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"MODEL: {path} does not exist. Fix: pass the .jaxexport file "
            "written by `jaxdl export`."
        )
    side = sidecar_path(path)
    if not side.is_file():
        raise FileNotFoundError(
            f"MODEL: {side} (the sidecar of {path}) does not exist. Fix: "
            "keep the .json next to the artifact, or re-export with "
            "`jaxdl export`."
        )
    try:
        meta = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"MODEL: {side} is not valid JSON ({err}). {_FIX}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(
            f'MODEL: {side} is not a jaxdl export sidecar (expected "format": "{FORMAT}"). {_FIX}'
        )
    check_compatible(path, meta)
    return meta


@dataclasses.dataclass
class Predictor:
    """A loaded artifact. `predict` runs it; `generate` continues text (LMs)."""

    path: Path
    metadata: dict
    exported: jax.export.Exported

    def __post_init__(self):
        self._call = jax.jit(self.exported.call)  # compiled once per batch size

    @property
    def kind(self) -> str:
        return self.metadata["kind"]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One example's shape, e.g. (8, 8, 1) or (T,)."""
        return tuple(self.metadata["input"]["shape"][1:])

    @property
    def labels(self) -> list[str]:
        """Class names, or for byte LMs the printable form of each byte."""
        if self.kind == "lm":
            return [
                repr(chr(i))[1:-1] if i < 128 else f"\\x{i:02x}"
                for i in range(self.metadata["output"]["shape"][-1])
            ]
        return list(self.metadata["class_names"])

    def predict(self, x: Any, lengths: Any = None) -> np.ndarray:
        """Classification: x [B, *input_shape] raw pixels -> probabilities [B, C].

        LM: x int32 tokens [B, T] right-padded, lengths [B] (default T) -> next-token
        probabilities [B, V].
        """
        x = np.asarray(x)
        if x.ndim != len(self.input_shape) + 1 or x.shape[1:] != self.input_shape:
            raise ValueError(
                f"x: expected shape [B, {', '.join(map(str, self.input_shape))}] "
                f"(what {self.path.name} was exported for), found {list(x.shape)}. "
                "Fix: resize the inputs, or use `predict_files` for image files."
            )
        if self.kind == "lm":
            if lengths is None:
                lengths = np.full((x.shape[0],), x.shape[1], np.int32)
            out = self._call(x.astype(np.int32), np.asarray(lengths, np.int32))
        else:
            out = self._call(x.astype(np.float32))
        return np.asarray(out)

    def generate(self, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation: the artifact applied once per new token on the last T tokens."""
        (window,) = self.input_shape
        tokens = [int(t) for t in prompt]
        if not tokens:
            raise ValueError("INPUT: the prompt is empty. Fix: give at least one byte of text.")
        new = []
        for _ in range(max_new_tokens):
            context = tokens[-window:]
            padded = np.zeros((1, window), np.int32)
            padded[0, : len(context)] = context
            probs = self.predict(padded, np.asarray([len(context)], np.int32))
            token = int(np.argmax(probs[0]))
            tokens.append(token)
            new.append(token)
        return new


def load(path: str | Path) -> Predictor:
    """Load an artifact written by `export_workdir`; refuses corrupt or incompatible files."""
    path = Path(path)
    meta = read_metadata(path)
    blob = path.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != meta.get("artifact_sha256"):
        raise ValueError(
            f"MODEL: {path} is corrupt (sha256 {digest[:12]}... differs from "
            f"{str(meta.get('artifact_sha256'))[:12]}... in its sidecar). Fix: copy "
            "it again or re-export with `jaxdl export`."
        )
    try:
        exported = jax.export.deserialize(bytearray(blob))
    except Exception as err:  # flatbuffers raises assorted errors on bad bytes
        raise ValueError(
            f"MODEL: {path} cannot be deserialized ({type(err).__name__}). {_FIX}"
        ) from None
    here = jax.export.default_export_platform()
    if here not in exported.platforms:
        raise ValueError(
            f"MODEL: {path} was exported for platforms {list(exported.platforms)}, "
            f"this machine runs {here!r}. Fix: re-export with `jaxdl export "
            f"--platform {here}`."
        )
    return Predictor(path=path, metadata=meta, exported=exported)


# ---- predicting files ----------------------------------------------------------------------


def load_image(path: str | Path, meta: Mapping) -> np.ndarray:
    """An image file -> float32 [H, W, C] raw pixels, the artifact's input for one example.

    Pillow reads the file and converts it to the model's mode ("L" or "RGB"); a file whose
    size differs from what the source decodes is resized only where the training
    preprocessing resizes too (data.image_size, image folders, or a resize transform);
    then the host transforms (resize, center crop) run as in training.
    """
    from PIL import Image

    from jaxdl.data.sources import convert_channels
    from jaxdl.data.transforms import parse_transform, resize_image

    path = Path(path)
    spec, host = meta["preprocessing"]["image_file"], meta["preprocessing"]["host"]
    height, width, channels = meta["input"]["shape"][1:]
    if not path.is_file():
        raise FileNotFoundError(f"INPUT: {path} does not exist. Fix: pass image files.")
    try:
        with Image.open(path) as img:
            img.load()
            if spec["resize"] == "pillow_uint8":  # as the imagefolder source reads files
                img = img.convert(spec["mode"])
                height_width = tuple(spec["decode_size"])
                if img.size != height_width[::-1]:
                    img = img.resize(height_width[::-1], Image.Resampling.BILINEAR)
            elif img.mode not in ("L", "RGB"):
                img = img.convert(spec["mode"])
            image = np.asarray(img).astype(np.float32)
    except (OSError, ValueError, SyntaxError) as err:  # what Pillow raises on bad files
        raise ValueError(
            f"INPUT: cannot read {path} as an image ({type(err).__name__}: "
            f"{err}). Fix: pass a PNG, JPEG or BMP file."
        ) from None
    if image.ndim == 2:
        image = image[..., None]
    image = convert_channels(image, channels)
    peak = float(image.max(initial=0.0))
    if peak > spec["pixel_scale"]:
        raise ValueError(
            f"INPUT: {path} has pixel values up to {peak:g}; the model takes raw "
            f"values in [0, {spec['pixel_scale']:g}] ({spec['encoding']}). Fix: "
            f"write the image with values scaled to 0..{spec['pixel_scale']:g}."
        )
    resized_later = bool(host) and host[0]["name"] == "resize"
    decode_size = None if spec["decode_size"] is None else tuple(spec["decode_size"])
    if decode_size is not None and image.shape[:2] != decode_size and not resized_later:
        if spec["resize"] is None:
            raise ValueError(
                f"INPUT: {path} is {image.shape[0]}x{image.shape[1]} (HxW); the "
                f"model takes {decode_size[0]}x{decode_size[1]} images and its "
                "preprocessing does not resize. Fix: resize the image to "
                f"{decode_size[0]}x{decode_size[1]} first."
            )
        image = resize_image(image, decode_size)
    for op in host:
        image = parse_transform(op)({"image": image}, None)["image"]
    if image.shape != (height, width, channels):
        raise ValueError(
            f"INPUT: {path} becomes {image.shape[0]}x{image.shape[1]} after the "
            f"model's preprocessing, the model takes {height}x{width}. Fix: give "
            f"images of the training size."
        )
    return image


def _top_k(probs: np.ndarray, labels: Sequence[str], k: int) -> list[dict]:
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"class": labels[i], "prob": float(probs[i])} for i in order]


def format_predictions(results: Sequence[Mapping]) -> str:
    """One line per input: "path: class (prob), ..." or "path: continuation"."""
    lines = []
    for r in results:
        if "continuation" in r:
            lines.append(f"{r['input']}: {r['continuation']!r}")
        else:
            ranked = ", ".join(f"{c['class']} ({c['prob']:.4f})" for c in r["top_k"])
            lines.append(f"{r['input']}: {ranked}")
    return "\n".join(lines)


def predict_files(
    artifact: str | Path | Predictor,
    inputs: Sequence[str | Path],
    top_k: int = 5,
    max_new_tokens: int = 64,
) -> list[dict]:
    """Predict image (or, for LMs, text) files with an artifact, in one batch.

    classification: [{"input", "top_k": [{"class", "prob"}, ...]}] most likely first.
    lm: each file's text is a prompt; [{"input", "continuation", "top_k"}] where the
    continuation is greedy (`Predictor.generate`) and top_k ranks the first next byte.
    """
    predictor = artifact if isinstance(artifact, Predictor) else load(artifact)
    if top_k < 1:
        raise ValueError(f"--top-k: expected an integer >= 1, found {top_k}.")
    labels = predictor.labels
    results = []
    if predictor.kind == "lm":
        from jaxdl.generate import decode, encode

        for path in inputs:
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(
                    f"INPUT: {path} does not exist. Fix: pass text files holding the prompts."
                )
            prompt = list(encode(path.read_text(encoding="utf-8", errors="replace")))
            new = predictor.generate(prompt, max_new_tokens)
            window = predictor.input_shape[0]
            context = np.zeros((1, window), np.int32)
            context[0, : len(prompt[-window:])] = prompt[-window:]
            first = predictor.predict(context, [len(prompt[-window:])])[0]
            results.append(
                {
                    "input": str(path),
                    "continuation": decode(new),
                    "top_k": _top_k(first, labels, top_k),
                }
            )
        return results
    images = np.stack([load_image(p, predictor.metadata) for p in inputs])
    probs = predictor.predict(images)
    for path, row in zip(inputs, probs, strict=True):
        results.append({"input": str(path), "top_k": _top_k(row, labels, top_k)})
    return results
