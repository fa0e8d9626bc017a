"""Run a `jaxdl export` artifact without the model's code: load, check, predict files.

    predictor = load("digits.jaxexport")
    probs = predictor.predict(raw_pixels)                         # [B, C], any B
    predict_files("digits.jaxexport", ["a.png", "b.png"], top_k=3)

Geometric preprocessing (resize, center crop) happens here on the host, from the sidecar's
description (see `jaxdl.deploy.export`), before the artifact's own pure-array preprocessing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxdl.deploy.artifact import FORMAT, FORMAT_VERSION, REEXPORT, sidecar_path
from jaxdl.errors import UserError


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
        raise UserError(
            f"{path}: built with jax {meta.get('jax_version')} (format "
            f"{meta.get('format_version')}); this is jax {jax.__version__} "
            f"(format {FORMAT_VERSION}). {REEXPORT}"
        )


def read_metadata(path: str | Path) -> dict:
    """The sidecar of an artifact, checked for format and version."""
    path = Path(path)
    if not path.is_file():
        found = "is a directory" if path.is_dir() else "does not exist"
        raise UserError(
            f"MODEL: {path} {found}. Fix: pass the .jaxexport file written by `jaxdl export`."
        )
    side = sidecar_path(path)
    if not side.is_file():
        raise UserError(
            f"MODEL: {side} (the sidecar of {path}) does not exist. Fix: "
            "keep the .json next to the artifact, or re-export with "
            "`jaxdl export`."
        )
    try:
        meta = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"MODEL: {side} is not valid JSON ({err}). {REEXPORT}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(
            f'MODEL: {side} is not a jaxdl export sidecar (expected "format": "{FORMAT}"). '
            + REEXPORT
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
            raise UserError(
                f"x: expected shape [B, {', '.join(map(str, self.input_shape))}] "
                f"(what {self.path.name} was exported for), found {list(x.shape)}. "
                "Fix: resize the inputs, or use `predict_files` for image files."
            )
        if self.kind == "lm":
            if lengths is None:
                lengths = np.full((x.shape[0],), x.shape[1], np.int32)
            out = self._call(x.astype(np.int32), np.asarray(lengths, np.int32))
        else:
            dtype = np.int32 if self.metadata["input"]["dtype"] == "int32" else np.float32
            out = self._call(x.astype(dtype))
        return np.asarray(out)

    def generate(self, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation: the artifact applied once per new token on the last T tokens."""
        (window,) = self.input_shape
        tokens = [int(t) for t in prompt]
        if not tokens:
            raise UserError("INPUT: the prompt is empty. Fix: give at least one byte of text.")
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
    """Load an artifact written by `jaxdl export`; refuses corrupt or incompatible files."""
    path = Path(path)
    meta = read_metadata(path)
    blob = path.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != meta.get("artifact_sha256"):
        raise UserError(
            f"MODEL: {path} is corrupt (sha256 {digest[:12]}... differs from "
            f"{str(meta.get('artifact_sha256'))[:12]}... in its sidecar). Fix: copy "
            "it again or re-export with `jaxdl export`."
        )
    try:
        exported = jax.export.deserialize(bytearray(blob))
    except Exception as err:  # flatbuffers raises assorted errors on bad bytes
        raise UserError(
            f"MODEL: {path} cannot be deserialized ({type(err).__name__}). {REEXPORT}"
        ) from None
    here = jax.export.default_export_platform()
    if here not in exported.platforms:
        raise UserError(
            f"MODEL: {path} was exported for platforms {list(exported.platforms)}, "
            f"this machine runs {here!r}. Fix: re-export with `jaxdl export "
            f"--platform {here}`."
        )
    return Predictor(path=path, metadata=meta, exported=exported)


# ---- predicting files ----------------------------------------------------------------------


def load_image(
    path: str | Path, meta: Mapping, *, max_image_pixels: int | None = None
) -> np.ndarray:
    """An image file -> float32 [H, W, C] raw pixels, the artifact's input for one example.

    Pillow reads the file and converts it to the model's mode ("L" or "RGB"); a file whose
    size differs from what the source decodes is resized only where the training
    preprocessing resizes too (data.image_size, image folders, or a resize transform);
    then the host transforms (resize, center crop) run as in training. Images over
    `max_image_pixels` (default: the training run's data.max_image_pixels) are refused
    before decoding; 16-bit images are scaled to 8 bits, as in training.
    """
    from PIL import Image

    from jaxdl.data.images import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, open_image
    from jaxdl.data.records import convert_channels
    from jaxdl.data.transforms import parse_transform, resize_image

    path = Path(path)
    spec, host = meta["preprocessing"]["image_file"], meta["preprocessing"]["host"]
    height, width, channels = meta["input"]["shape"][1:]
    check_input_file(path, "image files", f"{path}/*.png")
    if max_image_pixels is None:
        max_image_pixels = int(spec.get("max_image_pixels", DEFAULT_MAX_PIXELS))
    pillow = spec["resize"] == "pillow_uint8"  # as the imagefolder source reads files
    try:
        img = open_image(
            path,
            spec["mode"],
            max_pixels=max_image_pixels,
            field="max_image_pixels",
            keep_8bit=not pillow,
        )
        if pillow:
            height_width = tuple(spec["decode_size"])
            if img.size != height_width[::-1]:
                img = img.resize(height_width[::-1], Image.Resampling.BILINEAR)
        image = np.asarray(img).astype(np.float32)
    except UserError:  # over the pixel cap
        raise
    except (OSError, ValueError, SyntaxError) as err:  # what Pillow raises on bad files
        kinds = ", ".join(s.lstrip(".").upper() for s in IMAGE_SUFFIXES)
        raise UserError(
            f"INPUT: cannot read {path} as an image ({type(err).__name__}: "
            f"{err}). Fix: pass an image file ({kinds})."
        ) from None
    if image.ndim == 2:
        image = image[..., None]
    if spec["pixel_scale"] > 255:  # a 16-bit dataset: files are read as 8-bit, full = full
        image = image * np.float32(spec["pixel_scale"] / 255)
    image = convert_channels(image, channels)
    peak = float(image.max(initial=0.0))
    if peak > spec["pixel_scale"]:
        raise UserError(
            f"INPUT: {path} has pixel values up to {peak:g}; the model takes raw "
            f"values in [0, {spec['pixel_scale']:g}] ({spec['encoding']}). Fix: "
            f"write the image with values scaled to 0..{spec['pixel_scale']:g}."
        )
    resized_later = bool(host) and host[0]["name"] == "resize"
    decode_size = None if spec["decode_size"] is None else tuple(spec["decode_size"])
    if decode_size is not None and image.shape[:2] != decode_size and not resized_later:
        if spec["resize"] is None:
            raise UserError(
                f"INPUT: {path} is {image.shape[0]}x{image.shape[1]} (HxW); the "
                f"model takes {decode_size[0]}x{decode_size[1]} images and its "
                "preprocessing does not resize. Fix: resize the image to "
                f"{decode_size[0]}x{decode_size[1]} first."
            )
        image = resize_image(image, decode_size)
    for op in host:
        image = parse_transform(op)({"image": image}, None)["image"]
    if image.shape != (height, width, channels):
        raise UserError(
            f"INPUT: {path} becomes {image.shape[0]}x{image.shape[1]} after the "
            f"model's preprocessing, the model takes {height}x{width}. Fix: give "
            f"images of the training size."
        )
    return image


def check_input_file(path: Path, what: str, example: str) -> None:
    """Refuse a missing path or a directory, in one line naming it."""
    if path.is_dir():
        raise UserError(
            f"INPUT: {path} is a directory; expected {what}. Fix: pass the files, e.g. {example}."
        )
    if not path.is_file():
        raise UserError(f"INPUT: {path} does not exist. Fix: pass {what}.")


def _top_k(probs: np.ndarray, labels: Sequence[str], k: int) -> list[dict]:
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"class": labels[i], "prob": float(probs[i])} for i in order]


def format_predictions(results: Sequence[Mapping]) -> str:
    """One line per input: "path: class (prob), ..." or "path: continuation"."""
    lines = []
    for r in results:
        name = f"{r['input']}:{r['row']}" if "row" in r else r["input"]  # a table's row
        if "continuation" in r:
            lines.append(f"{name}: {r['continuation']!r}")
        elif "top_k" in r:
            ranked = ", ".join(f"{c['class']} ({c['prob']:.4f})" for c in r["top_k"])
            lines.append(f"{name}: {ranked}")
        else:  # binary, multilabel, regression
            shown = {k: v for k, v in r.items() if k not in ("input", "row")}
            lines.append(f"{name}: {json.dumps(shown)}")
    return "\n".join(lines)


def predict_files(
    artifact: str | Path | Predictor,
    inputs: Sequence[str | Path],
    top_k: int = 5,
    max_new_tokens: int = 64,
    max_image_pixels: int | None = None,
) -> list[dict]:
    """Predict image (or, for LMs, text) files with an artifact, in one batch.

    ``max_image_pixels``: refuse larger images (default: the run's data.max_image_pixels).

    classification: [{"input", "top_k": [{"class", "prob"}, ...]}] most likely first.
    lm: each file's text is a prompt; [{"input", "continuation", "top_k"}] where the
    continuation is greedy (`Predictor.generate`) and top_k ranks the first next token (text
    through the run's tokenizer: bytes, or the tokenizer.json its export recorded).
    """
    predictor = artifact if isinstance(artifact, Predictor) else load(artifact)
    if top_k < 1:
        raise UserError(f"--top-k: expected an integer >= 1, found {top_k}.")
    if predictor.metadata["input"]["name"] == "features":
        return predict_table_files(predictor, inputs, top_k=top_k)
    labels = predictor.labels
    if predictor.metadata["input"]["name"] == "tokens":  # a text classifier
        from jaxdl.data.textfolder import encode_text
        from jaxdl.lm.tokenizer import load_tokenizer

        (seq_len,) = predictor.input_shape
        # the run's data.tokenizer, recorded by export: "bytes" or its tokenizer.json
        source = predictor.metadata.get("preprocessing", {}).get("source", {})
        tokenizer = load_tokenizer(source.get("tokenizer"))
        rows = []
        for path in map(Path, inputs):
            if not path.is_file():
                raise UserError(f"INPUT: {path} does not exist. Fix: pass text files.")
            rows.append(encode_text(path.read_bytes(), seq_len, str(path), tokenizer))
        outputs = predictor.predict(np.stack(rows))
        return [
            {"input": str(path), **_result(predictor.kind, row, labels, top_k)}
            for path, row in zip(inputs, outputs, strict=True)
        ]
    results = []
    if predictor.kind == "lm":
        from jaxdl.lm.tokenizer import load_tokenizer

        # the run's data.tokenizer, recorded by export: "bytes" or its tokenizer.json
        tokenizer = load_tokenizer(predictor.metadata.get("vocabulary", {}).get("tokenizer"))
        if tokenizer.name != "bytes":
            labels = [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]
        for path in inputs:
            path = Path(path)
            check_input_file(path, "text files holding the prompts", f"{path}/*.txt")
            prompt = list(tokenizer.encode(path.read_text(encoding="utf-8", errors="replace")))
            new = predictor.generate(prompt, max_new_tokens)
            window = predictor.input_shape[0]
            context = np.zeros((1, window), np.int32)
            context[0, : len(prompt[-window:])] = prompt[-window:]
            first = predictor.predict(context, [len(prompt[-window:])])[0]
            results.append(
                {
                    "input": str(path),
                    "continuation": tokenizer.decode(new),
                    "top_k": _top_k(first, labels, top_k),
                }
            )
        return results
    images = np.stack(
        [load_image(p, predictor.metadata, max_image_pixels=max_image_pixels) for p in inputs]
    )
    probs = predictor.predict(images)
    for path, row in zip(inputs, probs, strict=True):
        results.append({"input": str(path), "top_k": _top_k(row, labels, top_k)})
    return results


def predict_table_files(
    predictor: Predictor, inputs: Sequence[str | Path], top_k: int = 5
) -> list[dict]:
    """Rows of CSV (or .parquet) files -> one result per row, in file and row order.

    Each row is encoded as in training, with the train split's statistics from the
    sidecar (standardization, imputation, vocabularies; a label column may be present and
    is ignored). classification and binary: {"class", "top_k"} (binary: the class at
    P(class_names[1]) >= 0.5, both classes ranked); multilabel: {"labels" (prob >= 0.5), "probs"};
    regression: {"prediction"} (one value per label column, original units).
    """
    from jaxdl.data.tabular import encode_features, read_csv, read_parquet

    source = predictor.metadata["preprocessing"]["source"]
    prep, names = source["preprocessing"], predictor.labels
    needed = prep["numeric"]["columns"] + prep["categorical"]["columns"]
    results = []
    text = source.get("csv", {})  # the training CSV's encoding and delimiter ("" sniffs)
    for path in map(Path, inputs):
        if path.suffix == ".parquet":
            columns = read_parquet(path, field="INPUT")
        else:
            columns = read_csv(path, field="INPUT", **text)
        missing = [c for c in needed if c not in columns]
        if missing:
            raise UserError(
                f"INPUT: {path} lacks the feature columns {missing[:10]} the model was trained "
                f"on. Fix: give a CSV with a header naming {needed[:10]}..."
            )
        out = predictor.predict(encode_features(prep, columns, str(path)))
        for i, row in enumerate(out):
            results.append(
                {"input": str(path), "row": i, **_result(predictor.kind, row, names, top_k)}
            )
    return results


def _result(kind: str, row: np.ndarray, names: Sequence[str], top_k: int) -> dict[str, Any]:
    """One example's artifact output as JSON fields, by task kind (see predict_table_files)."""
    if kind == "binary":  # P(class_names[1]) -> both classes' probabilities
        row = np.asarray([1.0 - float(row[0]), float(row[0])])
        kind = "classification"
    if kind == "classification":
        return {"class": names[int(np.argmax(row))], "top_k": _top_k(row, names, top_k)}
    if kind == "multilabel":
        pairs = list(zip(names, map(float, row), strict=True))
        return {"labels": [n for n, p in pairs if p >= 0.5], "probs": dict(pairs)}
    values = [float(v) for v in row]
    return {"prediction": values[0] if len(values) == 1 else values}
