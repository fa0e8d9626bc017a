"""Tables: "csv:PATH", "parquet:PATH" and "sklearn:NAME" -> a feature vector per row.

    table -> label column(s) + feature columns -> seeded split (stratified by label for
    classification) -> preprocessing fitted on the TRAIN rows only -> every split encoded

Example: {"features": float32 [F], "label": ...} with F = numeric columns, then
categorical columns. Numeric columns are standardized with the train mean and standard
deviation (population, as scikit-learn's StandardScaler); a missing value becomes the train
mean (data.missing="mean", i.e. 0 after standardizing) or is an error ("error").
Categorical columns (data.categorical_columns, and any column with no numeric value) hold
their index in a vocabulary of the train values, as a float: 0 is reserved for unknown and
missing values, the train values are 1..V in sorted order. `tabular_mlp` embeds them.
Numbers written with thousands separators ("1,234.5") are numbers; ISO 8601 dates and times
("2024-03-01", "2024-03-01T12:30") are numeric days since 1970-01-01 (UTC); other date
formats (day and month ambiguous) stay categorical and are flagged, as are categorical
columns whose every train value is distinct (an identifier). data_report.json's "columns"
says what each column became and why.

The task comes from `task`, or from the label column when unset (one distinct value is
refused: there is nothing to learn): two distinct values ->
binary, integers with at most MAX_CLASSES distinct values or strings -> classification,
other numbers -> regression, several label columns -> multilabel. Labels: class index
int32 [] (binary: 1 is the later of the two sorted values), float32 [K] targets in
original units (regression), float32 {0, 1} [L] (multilabel).

With data.text_column the example is that column's text instead, as tokens (bytes, or
data.tokenizer's ids) right-padded to data.seq_len: {"tokens": int32 [seq_len], "label": ...}
(see `jaxdl.data.textfolder`).

`Source.task_fields` carries what the model and head need from the train split: input
layout and output width for the model; class counts or target mean/std for the head.
"""

from __future__ import annotations

import codecs
import csv
import datetime
import io
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxdl.data.records import Identity, Source, file_fingerprint, opt, split_rows
from jaxdl.errors import UserError

MAX_CLASSES = 20
MISSING = {"", "na", "n/a", "nan", "null", "none", "?"}
SKLEARN_DATASETS = ("breast_cancer", "wine", "iris", "diabetes")
MISSING_POLICIES = ("mean", "error")
TASKS = ("classification", "binary", "multilabel", "regression")

Column = list  # raw values of one column: str, float or None (missing)


# ---- reading -------------------------------------------------------------------------------


PARQUET_MAGIC = b"PAR1"
DELIMITERS = ",;\t|"
_BINARY = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image"}


def _not_text(head: bytes) -> str | None:
    """What a file that is no CSV text is, from its first bytes; None for text."""
    if head.startswith(PARQUET_MAGIC):
        return "a Parquet file"
    for magic, kind in _BINARY.items():
        if head.startswith(magic):
            return kind
    return "a binary file" if b"\0" in head else None


def _delimiter(text: str) -> str:
    """The delimiter of a CSV text, sniffed among DELIMITERS from its first lines (","
    when the sniffer cannot tell)."""
    sample = "\n".join(text.splitlines()[:50])
    try:
        return csv.Sniffer().sniff(sample, delimiters=DELIMITERS).delimiter
    except csv.Error:
        return ","


def read_csv(
    path: Path, field: str = "data.source", delimiter: str = "", encoding: str = "utf-8"
) -> dict[str, Column]:
    """CSV with a header row -> {column: raw string values} (missing values -> None).

    ``field`` names where the path came from in error messages. A UTF-8 byte order mark is
    skipped; ``delimiter`` "" sniffs one of DELIMITERS (data.delimiter sets it).
    """
    if not path.is_file():
        raise UserError(f"{field}: no CSV file at {path}. Fix: pass the path of a CSV file.")
    if len(delimiter) > 1:
        raise UserError(
            f'data.delimiter: expected one character (or "" to sniff it), found '
            f"{delimiter!r}. Fix: e.g. data.delimiter=';'."
        )
    raw = path.read_bytes()
    other = _not_text(raw[:4096])
    if other is not None:
        fix = f"use parquet:{path}" if other == "a Parquet file" else "pass a CSV file"
        if field == "INPUT":
            fix = "pass a CSV (or .parquet) file of the rows to predict"
        raise UserError(f"{field}: {path} is {other}, expected CSV text. Fix: {fix}.")
    try:
        codec = "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding
        text = raw.decode(codec)
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise UserError(
            f"{field}: {path} is not {encoding} text (byte 0x{raw[err.start]:02x} on line "
            f"{line}). Fix: save it as UTF-8, or set data.encoding (e.g. latin-1)."
        ) from None
    except LookupError:
        raise UserError(
            f"data.encoding: unknown encoding {encoding!r}. Fix: e.g. utf-8 or latin-1."
        ) from None
    sep = delimiter or _delimiter(text)
    rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=sep))  # quoted newlines
    if len(rows) < 2 or not rows[0]:
        raise UserError(
            f"{field}: {path} has {len(rows)} lines, expected a header (on the first line) and "
            "at least one row."
        )
    header = [h.strip() for h in rows[0]]
    odd = [d for d in DELIMITERS if d != sep and d in rows[0][0]]
    if len(header) == 1 and odd:
        raise UserError(
            f"{field}: {path} reads as one column {header[0][:60]!r} with delimiter {sep!r}; "
            f"its header holds {odd[0]!r}. Fix: set data.delimiter={odd[0]!r}."
        )
    if len(set(header)) != len(header):
        dupes = sorted({h for h in header if header.count(h) > 1})
        raise UserError(f"{field}: {path} repeats column names {dupes}. Fix: rename them.")
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise UserError(
                f"{field}: {path} line {line} has {len(row)} fields, the header has "
                f"{len(header)} (delimiter {sep!r}). Fix: quote fields that contain the "
                "delimiter, repair the row, or set data.delimiter."
            )
    return {
        name: [None if v.strip().lower() in MISSING else v.strip() for v in col]
        for name, col in zip(header, zip(*rows[1:], strict=True), strict=True)
    }


def read_parquet(path: Path, field: str = "data.source") -> dict[str, Column]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(
            "data.source: parquet: needs pyarrow, which is not installed. Fix: pip install pyarrow."
        ) from None
    if not path.is_file():
        raise UserError(f"{field}: no Parquet file at {path}. Fix: pass the path of one.")
    with path.open("rb") as f:
        head = f.read(4096)
    if not head.startswith(PARQUET_MAGIC):
        other = _not_text(head)
        kind = other or "text (a CSV?)"
        fix = f"use csv:{path}" if other is None else "pass a Parquet file"
        raise UserError(f"{field}: {path} is {kind}, expected a Parquet file. Fix: {fix}.")
    table = pq.read_table(path).to_pydict()
    return {name: [_missing_to_none(v) for v in col] for name, col in table.items()}


def _missing_to_none(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str) and value.strip().lower() in MISSING:
        return None
    return value


def read_sklearn(name: str) -> tuple[dict[str, Column], str]:
    """A scikit-learn bundled dataset -> (columns, label column "target").

    Classification targets become their class names (breast_cancer: "benign" /
    "malignant", so the positive class is "malignant").
    """
    import sklearn.datasets

    if name not in SKLEARN_DATASETS:
        raise UserError(
            f"data.source: expected sklearn:NAME with NAME in {list(SKLEARN_DATASETS)}, found "
            f"'sklearn:{name}'. Fix: pick one of them."
        )
    bunch = getattr(sklearn.datasets, f"load_{name}")()
    columns = {str(f): bunch.data[:, j].tolist() for j, f in enumerate(bunch.feature_names)}
    names = getattr(bunch, "target_names", None)
    target = bunch.target.tolist()
    columns["target"] = [str(names[t]) for t in target] if names is not None else target
    return columns, "target"


# ---- column typing -------------------------------------------------------------------------


def _as_float(value: Any) -> float | None:
    """A raw value as a float, or None when it is not a number."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float | np.number):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


_THOUSANDS = re.compile(r"[+-]?\d{1,3}(,\d{3})+(\.\d*)?")
_DECIMAL_COMMA = re.compile(r"[+-]?\d+,\d+")  # 1,5 (not 1,500: thousands)
_OTHER_DATE = re.compile(r"\d{1,2}[/.-]\d{1,2}[/.-]\d{2,4}")  # 01/02/2024: which is the month?
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
# Text columns kept as categories that were likely meant otherwise: (pattern, flag).
_DOUBTFUL = (
    (
        _OTHER_DATE,
        "dates like {!r}, day and month ambiguous, kept as categories. Fix: write them as "
        "YYYY-MM-DD to use them as dates",
    ),
    (
        _DECIMAL_COMMA,
        "numbers with a decimal comma like {!r}, kept as categories. Fix: write them with a "
        "decimal point to use them as numbers",
    ),
)


def _thousands(value: Any) -> float | None:
    """ "1,234,567.5" -> 1234567.5; plain numbers as `_as_float`; else None."""
    if isinstance(value, str) and _THOUSANDS.fullmatch(value):
        return float(value.replace(",", ""))
    return _as_float(value)


def _iso_days(value: Any) -> float | None:
    """An ISO 8601 date or date-time -> days since 1970-01-01 UTC (naive = UTC); else None."""
    if not isinstance(value, str) or _as_float(value) is not None:
        return None
    try:
        moment = datetime.datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return (moment - _EPOCH).total_seconds() / 86400


# How a numeric column's values are written: "plain", "thousands" or "iso_date".
NUMBER_FORMATS = {"plain": _as_float, "thousands": _thousands, "iso_date": _iso_days}
WRITTEN = {"plain": "numbers", "thousands": "numbers like 1,234.5", "iso_date": "YYYY-MM-DD dates"}


def column_kind(values: Column, listed: bool) -> dict[str, str]:
    """What a feature column becomes, and why: {"became": "numeric" | "categorical",
    "why", "format" (numeric: a key of NUMBER_FORMATS), "flag" (a doubtful guess)}."""
    if listed:
        return {"became": "categorical", "why": "listed in data.categorical_columns"}
    present = [v for v in values if v is not None]
    if all(_as_float(v) is not None for v in present):
        why = "numbers" if present else "no values (missing everywhere)"
        return {"became": "numeric", "why": why, "format": "plain"}
    if all(_thousands(v) is not None for v in present):
        why = "numbers with thousands separators (1,234)"
        return {"became": "numeric", "why": why, "format": "thousands"}
    if any(_as_float(v) is not None for v in present):  # numeric_column names the odd value
        return {"became": "numeric", "why": "numbers", "format": "plain"}
    if all(_iso_days(v) is not None for v in present):
        why = "ISO 8601 dates: days since 1970-01-01"
        return {"became": "numeric", "why": why, "format": "iso_date"}
    for pattern, flag in _DOUBTFUL:
        if all(isinstance(v, str) and pattern.fullmatch(v) for v in present):
            flag = flag.format(present[0])
            return {"became": "categorical", "why": "no numeric values", "flag": flag}
    return {"became": "categorical", "why": "no numeric values"}


def columns_report(
    kinds: Mapping[str, dict], vocab: Mapping[str, list], train_rows: int
) -> dict[str, dict]:
    """`column_kind` of each feature column, categorical ones with their train levels; a
    column whose every train value is distinct is flagged (an identifier or free text)."""
    out = {}
    for name, kind in kinds.items():
        entry = dict(kind)
        if kind["became"] == "categorical":
            entry["levels"] = levels = len(vocab[name])
            if levels >= MAX_CLASSES and levels == train_rows and "flag" not in entry:
                entry["flag"] = (
                    f"every train value is distinct ({levels} levels): an identifier or free "
                    "text, which an embedding cannot learn from. Fix: drop it with "
                    "data.feature_columns, or classify it with data.text_column"
                )
        out[name] = entry
    return out


def _row_name(i: int, where: str) -> str:
    # CSV data rows start on line 2 (after the header).
    return f"line {i + 2} of {where}" if where.endswith(".csv") else f"row {i} of {where}"


def numeric_column(
    name: str, values: Column, where: str, fmt: str = "plain", fix: str | None = None
) -> np.ndarray:
    """float64 [N], NaN where missing; `fmt` is how numbers are written (NUMBER_FORMATS); a
    value that is not one is a one-line error ending in `fix` (default: for a feature
    column of a training table)."""
    if fix is None:
        fix = f"correct the value, or list {name!r} in data.categorical_columns"
    parse = NUMBER_FORMATS[fmt]
    out = np.full(len(values), np.nan)
    for i, v in enumerate(values):
        if v is None:
            continue
        x = parse(v)
        if x is None or not math.isfinite(x):
            kind = "a date column" if fmt == "iso_date" else "numeric"
            raise UserError(
                f"data: column {name!r} is {kind} but holds {v!r} at {_row_name(i, where)}. "
                f"Fix: {fix}."
            )
        out[i] = x
    return out


# ---- the label and the task ----------------------------------------------------------------


def _sort_values(values: set) -> list:
    """Distinct label values in order: numerically when all are numbers."""
    if all(_as_float(v) is not None for v in values):
        return sorted(values, key=lambda v: _as_float(v))
    return sorted(values, key=str)


def infer_task(label_columns: Sequence[str], columns: Mapping[str, Column]) -> tuple[str, str]:
    """(task, why) from the label column(s) alone."""
    if len(label_columns) > 1:
        return "multilabel", f"{len(label_columns)} label columns"
    name = label_columns[0]
    present = [v for v in columns[name] if v is not None]
    distinct = {str(v) if _as_float(v) is None else _as_float(v) for v in present}
    if len(distinct) == 2:
        return "binary", f"label column {name!r} has 2 distinct values"
    numbers = [_as_float(v) for v in present]
    if any(x is None for x in numbers):
        return "classification", f"label column {name!r} holds strings"
    if all(float(x).is_integer() for x in numbers) and len(distinct) <= MAX_CLASSES:
        return "classification", f"label column {name!r} has {len(distinct)} integer values"
    return "regression", f"label column {name!r} holds numbers"


def _check_label_present(name: str, values: Column, task: str, where: str) -> None:
    for i, v in enumerate(values):
        if v is None or (_as_float(v) is not None and not math.isfinite(_as_float(v))):
            kind = "regression target" if task == "regression" else "label"
            raise UserError(
                f"data.label_column: the {kind} {name!r} is missing/NaN at "
                f"{_row_name(i, where)}. Fix: drop or fill that row."
            )


def encode_labels(
    task: str, label_columns: Sequence[str], columns: Mapping[str, Column], where: str
) -> tuple[np.ndarray, list[str] | None]:
    """(labels, class names): int32 [N] ids, or float32 [N, K] targets / [N, L] 0-1 labels."""
    for name in label_columns:
        _check_label_present(name, columns[name], task, where)
    if task == "regression":
        fix = "correct the value, or set task='classification' if the labels are classes"
        y = np.stack([numeric_column(n, columns[n], where, fix=fix) for n in label_columns], 1)
        constant = [n for n, col in zip(label_columns, y.T, strict=True) if np.all(col == col[0])]
        if constant:
            raise UserError(
                f"data.label_column: the regression target {constant[0]!r} holds one value "
                f"({y[0, label_columns.index(constant[0])]:g}) in every row of {where}: "
                "nothing to learn. Fix: pick the column to predict."
            )
        return y.astype(np.float32), None
    if task == "multilabel":
        fix = "encode each label as 0/1"
        y = np.stack([numeric_column(n, columns[n], where, fix=fix) for n in label_columns], 1)
        bad = sorted(set(np.unique(y).tolist()) - {0.0, 1.0})
        if bad:
            raise UserError(
                f"data.label_column: multilabel columns must hold 0 or 1, found {bad[:5]}. "
                "Fix: encode each label as 0/1."
            )
        return y.astype(np.float32), list(label_columns)
    (name,) = label_columns
    keys = [str(v) if _as_float(v) is None else _as_float(v) for v in columns[name]]
    classes = _sort_values(set(keys))
    if len(classes) < 2:
        raise UserError(
            f"data.label_column: {name!r} holds one value ({columns[name][0]!r}) in all "
            f"{len(keys)} rows of {where}: a {task} model would have nothing to learn. Fix: "
            "pick the column to predict, or add rows of the other classes."
        )
    if task == "binary" and len(classes) != 2:
        raise UserError(
            f"task: 'binary' needs a label column with 2 values, {name!r} has {len(classes)}. "
            "Fix: set task='classification' or pick another label column."
        )
    index = {c: i for i, c in enumerate(classes)}
    names = [str(int(c)) if isinstance(c, float) and c.is_integer() else str(c) for c in classes]
    return np.asarray([index[k] for k in keys], np.int32), names


# ---- split and preprocessing ---------------------------------------------------------------


def check_missing(columns: Mapping[str, Column], where: str) -> None:
    """data.missing="error": refuse the first missing feature value, in any split."""
    for name, values in columns.items():
        gaps = [i for i, v in enumerate(values) if v is None]
        if gaps:
            raise UserError(
                f"data.missing: 'error', and column {name!r} is missing at "
                f"{_row_name(gaps[0], where)}. Fix: fill it or set data.missing=mean."
            )


def fit_preprocessing(
    numeric: Mapping[str, np.ndarray],
    categorical: Mapping[str, Column],
    train: np.ndarray,
    missing: str,
    where: str,
    formats: Mapping[str, str],
) -> dict[str, Any]:
    """Statistics of the TRAIN rows only: numeric mean/std, categorical vocabularies;
    `formats`: how each numeric column's numbers are written (`column_kind`)."""
    means, stds = [], []
    for name, values in numeric.items():
        x = values[train]
        present = x[~np.isnan(x)]
        if not len(present):
            raise UserError(
                f"data: column {name!r} has no value in the train split. Fix: drop it via "
                "data.feature_columns."
            )
        std = float(present.std())
        means.append(float(present.mean()))
        stds.append(std if std > 0 else 1.0)
    vocabs = {}
    for name, values in categorical.items():
        vocabs[name] = sorted({str(values[i]) for i in train if values[i] is not None})
    return {
        "numeric": {
            "columns": list(numeric),
            "mean": means,
            "std": stds,
            "formats": [formats[name] for name in numeric],
        },
        "categorical": {"columns": list(categorical), "vocab": vocabs},
        "missing": missing,
    }


def encode_features(
    prep: Mapping[str, Any], columns: Mapping[str, Column], where: str = "the input"
) -> np.ndarray:
    """Raw columns -> float32 [N, F] with fitted preprocessing (`fit_preprocessing`).

    Training has checked its own rows already: a bad value here is in new rows (`where`),
    which must be written as the training table was."""
    num, cat = prep["numeric"], prep["categorical"]
    parts = []
    formats = num.get("formats") or ["plain"] * len(num["columns"])  # older sidecars: plain
    for name, mean, std, fmt in zip(num["columns"], num["mean"], num["std"], formats, strict=True):
        fix = f"write {name!r} as in the training table ({WRITTEN[fmt]}), or leave it empty"
        x = numeric_column(name, columns[name], where, fmt, fix=fix)
        parts.append((np.where(np.isnan(x), mean, x) - mean) / std)
    for name in cat["columns"]:
        index = {v: i + 1 for i, v in enumerate(cat["vocab"][name])}  # 0: unknown / missing
        parts.append(np.asarray([index.get(str(v), 0) for v in columns[name]], np.float64))
    return np.stack(parts, axis=1).astype(np.float32)


class TableRecords:
    """Rows of a split: {"features": float32 [F], "label": int32 [] or float32 [K]}."""

    def __init__(self, features: np.ndarray, labels: np.ndarray):
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {"features": self.features[i], "label": self.labels[i]}


# ---- the source ----------------------------------------------------------------------------


def _label_columns(cfg: Mapping, default: str | None, columns: Mapping[str, Column]) -> list[str]:
    spec = opt(cfg, "label_column", default)
    names = [spec] if isinstance(spec, str) else list(spec or [])
    names = [n.strip() for name in names for n in name.split(",") if n.strip()]
    if not names:
        raise UserError(
            f"data.label_column: expected the name of a column to predict, found none. Fix: "
            f"--config.data.label_column=COL, one of {list(columns)[:20]}."
        )
    for name in names:
        if name not in columns:
            raise UserError(
                f"data.label_column: expected one of the columns {list(columns)[:20]}, found "
                f"{name!r}. Fix: check the spelling (names are case-sensitive)."
            )
    return names


def _checked_text_column(name: str, columns: Mapping[str, Column], labels: Sequence[str]) -> str:
    if name not in columns or name in labels:
        raise UserError(
            f"data.text_column: expected a column among {list(columns)[:20]} (not the label), "
            f"found {name!r}. Fix: check the spelling."
        )
    return name


def table_source(spec: str, cfg: Mapping, *, seed: int, task: str | None = None) -> Source:
    """ "csv:PATH" / "parquet:PATH" / "sklearn:NAME" -> a Source of `TableRecords`.

    With data.text_column the rows are texts instead: {"tokens": int32 [seq_len], "label"}
    (bytes, right-padded, as "textfolder:"), for the transformer's classify head.
    """
    prefix, _, rest = spec.partition(":")
    default_label = None
    if prefix == "sklearn":
        columns, default_label = read_sklearn(rest)
        where = spec
    else:
        path = Path(rest).expanduser()
        if prefix == "csv":
            text = {k: str(opt(cfg, k, d)) for k, d in (("delimiter", ""), ("encoding", "utf-8"))}
            columns = read_csv(path, **text)
        else:
            columns = read_parquet(path)
        where = str(path)
    label_columns = _label_columns(cfg, default_label, columns)
    if task and task not in TASKS:
        raise UserError(
            f"task: a table trains one of {list(TASKS)}, found {task!r}. Fix: set task to one "
            "of them, or leave it unset to infer it from the label column."
        )
    why = "set by config.task"
    if not task:
        task, why = infer_task(label_columns, columns)
    labels, class_names = encode_labels(task, label_columns, columns, where)
    text_column = opt(cfg, "text_column", "")
    if text_column:
        features = [_checked_text_column(text_column, columns, label_columns)]
    else:
        features = list(opt(cfg, "feature_columns", [])) or [
            c for c in columns if c not in label_columns
        ]
    listed = list(opt(cfg, "categorical_columns", []))
    for name in [*features, *listed]:
        if name not in columns or name in label_columns:
            raise UserError(
                f"data.feature_columns: expected feature columns among {list(columns)[:20]} "
                f"(not the label), found {name!r}. Fix: check data.feature_columns and "
                "data.categorical_columns."
            )
    kinds = {} if text_column else {c: column_kind(columns[c], c in listed) for c in features}
    categorical = [c for c, kind in kinds.items() if kind["became"] == "categorical"]
    formats = {c: kind["format"] for c, kind in kinds.items() if kind["became"] == "numeric"}
    numeric = {c: numeric_column(c, columns[c], where, fmt) for c, fmt in formats.items()}
    missing = opt(cfg, "missing", "mean")
    if missing not in MISSING_POLICIES:
        raise UserError(
            f"data.missing: expected one of {list(MISSING_POLICIES)}, found {missing!r}."
        )
    if missing == "error" and not text_column:  # a missing text is an empty text: an error
        check_missing({c: columns[c] for c in features}, where)

    stratify = task in ("classification", "binary")
    rows = split_rows(
        len(labels),
        labels if stratify else None,
        val_fraction=float(opt(cfg, "val_fraction", 0.1)),
        test_fraction=float(opt(cfg, "test_fraction", 0.2)),
        seed=seed,
    )
    if text_column:
        from jaxdl.data.textfolder import TokenRecords, encode_text, pad_id
        from jaxdl.lm.tokenizer import load_tokenizer

        seq_len = int(opt(cfg, "seq_len", 128))
        tokenizer = load_tokenizer(opt(cfg, "tokenizer", "bytes"))
        tokens = np.stack(
            [
                encode_text(
                    str(v or "").encode(),
                    seq_len,
                    f"{text_column!r} at {_row_name(i, where)}",
                    tokenizer,
                )
                for i, v in enumerate(columns[text_column])
            ]
        )
        splits = {k: TokenRecords(tokens[idx], labels[idx]) for k, idx in rows.items()}
        prep = {"text_column": text_column, "tokenizer": tokenizer.name, "seq_len": seq_len}
        prep["pad_id"] = pad_id(tokenizer)
    else:
        prep = fit_preprocessing(
            numeric, {c: columns[c] for c in categorical}, rows["train"], missing, where, formats
        )
        encoded = encode_features(prep, columns)
        splits = {k: TableRecords(encoded[idx], labels[idx]) for k, idx in rows.items()}
    report = {c: {"became": "label", "why": why} for c in label_columns}
    if text_column:
        report[text_column] = {"became": "text", "why": "data.text_column"}
    else:
        vocab = prep["categorical"]["vocab"]
        report.update(columns_report(kinds, vocab, len(rows["train"])))
    for name in columns:
        report.setdefault(name, {"became": "ignored", "why": "not in data.feature_columns"})

    train_labels = labels[rows["train"]]
    head: dict[str, Any] = {"input_key": "tokens" if text_column else "features"}
    if stratify:
        head["class_counts"] = np.bincount(train_labels, minlength=len(class_names)).tolist()
        outputs = 1 if task == "binary" else len(class_names)
    elif task == "regression":
        head["target_mean"] = train_labels.mean(axis=0).astype(float).tolist()
        std = train_labels.std(axis=0).astype(float)
        head["target_std"] = np.where(std > 0, std, 1.0).tolist()
        outputs = labels.shape[1]
    else:
        outputs = labels.shape[1]
    model: dict[str, Any] = {"num_classes": outputs}
    if text_column:
        model["pad_id"] = prep["pad_id"]
    else:
        model["num_numeric"] = len(numeric)
        model["vocab_sizes"] = [len(prep["categorical"]["vocab"][c]) + 1 for c in categorical]
    description = {
        "source": spec,
        "input": head["input_key"],
        "task": task,
        "task_reason": why,
        "label_columns": label_columns,
        "class_names": class_names,
        "preprocessing": prep,
        "target": {k: head[k] for k in ("target_mean", "target_std") if k in head},
        "columns": report,
    }
    if prefix != "sklearn":
        description["fingerprint"] = file_fingerprint(path)
    if prefix == "csv":  # how predict reads new rows: the same encoding (and delimiter)
        description["csv"] = text
    return Source(
        task,
        splits,
        Identity(),
        len(class_names) if class_names is not None and task != "multilabel" else outputs,
        class_names,
        description,
        split_names={k: f"{k} rows of {spec} (seed {seed})" for k in rows},
        task_fields={"model": model, "head": head},
    )
