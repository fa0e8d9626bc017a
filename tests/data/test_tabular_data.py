"""Table sources: splits, train-only statistics (leakage), task inference, one-line errors;
column inference that does not guess wrong (one-valued labels refused, thousands separators
and ISO dates parsed, ambiguous dates and identifiers flagged in data_report.json)."""

import csv
import datetime

import numpy as np
import pytest

from jaxdl.data import build_data
from jaxdl.data.pipeline import format_report
from jaxdl.data.tabular import encode_features, read_csv
from jaxdl.errors import UserError


def _write(path, header, rows):
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _table(n=60, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        x = rng.normal(5, 2)
        rows.append([f"{x:.4f}", ["red", "green", "blue"][i % 3], str(i % 4), f"{3 * x:.3f}"])
    return ["x", "color", "n", "y"], rows


def _data(path, **cfg):
    return build_data({"source": f"csv:{path}", "label_column": "y", **cfg}, seed=0)


def test_breast_cancer_split_is_stratified_and_standardized_on_train():
    data = build_data({"source": "sklearn:breast_cancer"}, seed=0, task="binary")
    assert data.kind == "binary"
    assert data.split_sizes == {"train": 398, "val": 57, "test": 114}
    assert data.class_names == ["benign", "malignant"]  # 1 = malignant, the positive class
    train = data.source.splits["train"]
    np.testing.assert_allclose(train.features.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(train.features.std(0), 1, atol=1e-4)
    rates = [data.source.splits[s].labels.mean() for s in ("train", "val", "test")]
    assert max(rates) - min(rates) < 0.02  # 212 / 569 malignant in each split
    assert data.task_fields["model"] == {"num_classes": 1, "num_numeric": 30, "vocab_sizes": []}
    assert data.task_fields["head"]["class_counts"] == [249, 149]


def test_statistics_use_the_train_rows_only(tmp_path):
    """Changing val/test rows (values, new categories, gaps) changes nothing fitted."""
    header, rows = _table()
    a = _data(_write(tmp_path / "a.csv", header, rows), task="regression")
    held_out = np.concatenate([a.source.splits["val"].labels, a.source.splits["test"].labels])
    changed = [list(r) for r in rows]
    for i, row in enumerate(changed):
        if any(np.isclose(float(row[3]), held_out[:, 0], atol=1e-4)):
            changed[i] = ["1000", "purple", "", row[3]]  # y (the split key) kept
    b = _data(_write(tmp_path / "b.csv", header, changed), task="regression")
    assert sum(r != c for r, c in zip(rows, changed, strict=True)) >= 15
    assert a.preprocessing["preprocessing"] == b.preprocessing["preprocessing"]
    assert a.task_fields == b.task_fields
    np.testing.assert_array_equal(
        a.source.splits["train"].features, b.source.splits["train"].features
    )
    prep = b.preprocessing["preprocessing"]
    assert prep["categorical"]["vocab"]["color"] == ["blue", "green", "red"]
    mean, std = prep["numeric"]["mean"][0], prep["numeric"]["std"][0]
    x = b.source.splits["test"].features
    np.testing.assert_allclose(x[:, 0].max(), (1000 - mean) / std, rtol=1e-5)
    assert set(x[:, 2].tolist()) == {0.0}  # "purple": unknown -> the reserved index
    # A gap in numeric column "n" takes the train mean: 0 after standardizing.
    assert x[:, 1].min() == pytest.approx(0.0, abs=1e-6)


def test_encode_features_reproduces_the_split_rows(tmp_path):
    header, rows = _table()
    data = _data(_write(tmp_path / "t.csv", header, rows), task="regression")
    columns = {h: [r[j] for r in rows] for j, h in enumerate(header)}
    encoded = encode_features(data.preprocessing["preprocessing"], columns)
    test = data.source.splits["test"]
    targets = np.asarray([float(r[3]) for r in rows])
    rows_of_test = [int(np.argmin(np.abs(targets - y[0]))) for y in test.labels]
    np.testing.assert_array_equal(encoded[rows_of_test], test.features)


@pytest.mark.parametrize(
    ("label", "values", "task"),
    [
        ("y", ["yes", "no"], "binary"),
        ("y", ["0", "1", "2"], "classification"),
        ("y", ["a", "b", "c", "d"], "classification"),
        ("y", ["1.5", "2.25", "7.0"], "regression"),
    ],
)
def test_task_is_inferred_from_the_label_column(tmp_path, label, values, task):
    rows = [[str(i), values[i % len(values)]] for i in range(60)]
    data = build_data(
        {"source": f"csv:{_write(tmp_path / 't.csv', ['x', label], rows)}", "label_column": label},
        seed=0,
    )
    assert data.kind == task


def test_multilabel_from_several_label_columns(tmp_path):
    rows = [[str(i), str(i % 2), str(i // 2 % 2)] for i in range(40)]
    path = _write(tmp_path / "m.csv", ["x", "a", "b"], rows)
    data = build_data({"source": f"csv:{path}", "label_column": "a,b"}, seed=0)
    assert data.kind == "multilabel"
    assert data.example_spec["label"] == ((2,), np.dtype("float32"))
    assert data.task_fields["model"]["num_classes"] == 2


@pytest.mark.parametrize(
    ("header", "rows", "cfg", "message"),
    [
        (["x", "y"], [["1", "a"]] * 9, {"label_column": "z"}, "expected one of the columns"),
        (
            ["x", "y"],
            [[str(i), str(i % 2)] for i in range(8)] + [["abc", "1"]],
            {},
            "column 'x' is numeric but holds 'abc' at line 10",
        ),
        (
            ["x", "y"],
            [[str(i), f"{i * 1.5}"] for i in range(8)] + [["9", "nan"]],
            {"task": "regression"},
            "regression target 'y' is missing/NaN at line 10",
        ),
        (
            ["x", "y"],
            [[str(i), str(i % 2)] for i in range(8)] + [["9", "2"]],
            {},
            "needs at least 3 rows per class",
        ),
        (["x", "y"], [["1", "0"], ["2", "1", "3"]], {}, "line 3 has 3 fields, the header has 2"),
        (
            ["x", "y"],
            [["", "0"]] + [[str(i), str(i % 2)] for i in range(29)],
            {"missing": "error"},
            "data.missing: 'error', and column 'x' is missing at line 2",
        ),
    ],
)
def test_bad_tables_are_one_line_errors(tmp_path, header, rows, cfg, message):
    path = _write(tmp_path / "bad.csv", header, rows)
    task = cfg.pop("task", None)
    with pytest.raises(UserError) as err:
        build_data({"source": f"csv:{path}", "label_column": "y", **cfg}, seed=0, task=task)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_parquet_reads_like_csv(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    header, rows = _table()
    table = pa.table({h: [r[j] for r in rows] for j, h in enumerate(header)})
    pq.write_table(table, tmp_path / "t.parquet")
    a = _data(_write(tmp_path / "t.csv", header, rows), task="regression")
    b = build_data(
        {"source": f"parquet:{tmp_path / 't.parquet'}", "label_column": "y"},
        seed=0,
        task="regression",
    )
    np.testing.assert_array_equal(a.source.splits["val"].features, b.source.splits["val"].features)


def _rows(n=60):
    rng = np.random.default_rng(0)
    start = datetime.date(2023, 1, 1)
    rows = []
    for i in range(n):
        amount = float(rng.integers(500, 2_000_000)) + 0.25
        day = start + datetime.timedelta(days=int(rng.integers(0, 700)))
        rows.append(
            [
                f"{amount:,.2f}",  # "1,234,567.25"
                day.isoformat(),
                day.strftime("%d/%m/%Y"),
                f"id-{i:05d}",
                ["a", "b"][i % 2],
                ["yes", "no"][int(amount > 1e6)],
            ]
        )
    return ["amount", "opened", "opened_local", "customer", "group", "y"], rows


def test_each_column_becomes_what_its_values_say(tmp_path):
    header, rows = _rows()
    path = _write(tmp_path / "t.csv", header, rows)
    data = build_data({"source": f"csv:{path}", "label_column": "y"}, seed=0)
    columns = data.report["columns"]
    became = {name: c["became"] for name, c in columns.items()}
    assert became == {
        "amount": "numeric",
        "opened": "numeric",
        "opened_local": "categorical",
        "customer": "categorical",
        "group": "categorical",
        "y": "label",
    }
    assert "thousands separators" in columns["amount"]["why"]
    assert "days since 1970-01-01" in columns["opened"]["why"]
    assert "YYYY-MM-DD" in columns["opened_local"]["flag"]
    assert "every train value is distinct" in columns["customer"]["flag"]
    assert "flag" not in columns["group"] and columns["group"]["levels"] == 2
    assert "column 'customer' became categorical" in format_report(data.report)

    prep = data.preprocessing["preprocessing"]
    assert prep["numeric"]["columns"] == ["amount", "opened"]
    assert prep["numeric"]["formats"] == ["thousands", "iso_date"]
    amounts = [float(r[0].replace(",", "")) for r in rows]
    days = [(datetime.date.fromisoformat(r[1]) - datetime.date(1970, 1, 1)).days for r in rows]
    x = encode_features(prep, read_csv(path))  # as predict encodes new rows
    mean, std = prep["numeric"]["mean"], prep["numeric"]["std"]
    expected = (np.stack([amounts, days], 1) - mean) / std  # the float32 features, in float64
    np.testing.assert_allclose(x[:, :2], expected, atol=1e-5)
    assert np.ptp(expected, axis=0).min() > 3  # spread out, not all one category


@pytest.mark.parametrize(
    "label, task, words",
    [
        ("yes", "", ["'y' holds one value ('yes') in all 30 rows", "nothing to learn"]),
        ("3", "", ["'y' holds one value ('3')"]),
        ("3", "classification", ["'y' holds one value ('3')"]),
        ("2.5", "regression", ["regression target 'y' holds one value (2.5)"]),
    ],
)
def test_a_label_with_one_value_is_refused(tmp_path, label, task, words):
    path = _write(tmp_path / "t.csv", ["x", "y"], [[str(i), label] for i in range(30)])
    with pytest.raises(UserError) as err:
        build_data({"source": f"csv:{path}", "label_column": "y"}, seed=0, task=task or None)
    for word in words:
        assert word in str(err.value)


def test_a_date_column_with_a_bad_value_names_it(tmp_path):
    rows = [[f"2024-01-{i % 28 + 1:02d}", str(i % 2)] for i in range(30)]
    rows[7][0] = "2024-02-31"
    path = _write(tmp_path / "t.csv", ["when", "y"], rows)
    data = build_data({"source": f"csv:{path}", "label_column": "y"}, seed=0)
    assert data.report["columns"]["when"]["became"] == "categorical"  # not all dates
    rows[7][0] = ""  # a gap: a date column with a missing value
    path = _write(tmp_path / "t.csv", ["when", "y"], rows)
    data = build_data({"source": f"csv:{path}", "label_column": "y"}, seed=0)
    assert data.report["columns"]["when"]["became"] == "numeric"
    bad = _write(tmp_path / "new.csv", ["when"], [["2024-01-05"], ["soon"]])
    message = "'when' is a date column but holds 'soon' at line 3 of .*new.csv. Fix: write"
    with pytest.raises(UserError, match=message):
        encode_features(data.preprocessing["preprocessing"], read_csv(bad), str(bad))


def _columns(path, **cfg):
    data = build_data({"source": f"csv:{path}", "label_column": "y", **cfg}, seed=0)
    return data.report["columns"]


def test_encodings_byte_order_marks_and_delimiters(tmp_path):
    rows = [[f"{i}.5", ["café", "thé", "eau"][i % 3], str(i % 2)] for i in range(30)]
    text = "x;drink;y\n" + "".join(";".join(r) + "\n" for r in rows)
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + text.encode())  # Excel's "CSV UTF-8", ; delimited
    assert set(_columns(bom)) == {"x", "drink", "y"}
    comma = tmp_path / "comma.csv"  # Excel in a decimal-comma locale
    comma.write_text(text.replace(".5;", ",5;"))
    assert "decimal comma like '0,5'" in _columns(comma)["x"]["flag"]

    latin = tmp_path / "latin.csv"
    latin.write_bytes(text.encode("latin-1"))
    with pytest.raises(UserError, match=r"latin.csv is not utf-8 text \(byte 0xe9 on line 2\)"):
        _columns(latin)
    data = build_data(
        {"source": f"csv:{latin}", "label_column": "y", "encoding": "latin-1"}, seed=0
    )
    assert data.preprocessing["preprocessing"]["categorical"]["vocab"]["drink"] == [
        "café",
        "eau",
        "thé",
    ]
    with pytest.raises(UserError, match=r"one column 'x;drink;y' .* Fix: set data.delimiter=';'"):
        _columns(bom, delimiter=",")
    with pytest.raises(UserError, match=r"data.delimiter: expected one character .* ';;'"):
        _columns(bom, delimiter=";;")
    quoted = tmp_path / "quoted.csv"  # a quoted field that holds a line break
    quoted.write_text(
        "x,note,y\n" + "".join(f'{i},"line\nbreak {i % 3}",{i % 2}\n' for i in range(30))
    )
    vocab = build_data({"source": f"csv:{quoted}", "label_column": "y"}, seed=0).preprocessing
    assert vocab["preprocessing"]["categorical"]["vocab"]["note"][0] == "line\nbreak 0"
    blank = tmp_path / "blank.csv"
    blank.write_text("\n" + text)
    with pytest.raises(UserError, match="expected a header \\(on the first line\\)"):
        _columns(blank)


def test_csv_and_parquet_swapped_name_the_right_prefix(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"x": list(range(30)), "y": [i % 2 for i in range(30)]}), table)
    with pytest.raises(
        UserError, match=f"t.parquet is a Parquet file, .* Fix: use parquet:{table}"
    ):
        build_data({"source": f"csv:{table}", "label_column": "y"}, seed=0)
    text = _write(tmp_path / "t.csv", ["x", "y"], [[str(i), str(i % 2)] for i in range(30)])
    with pytest.raises(UserError, match=f"is text \\(a CSV\\?\\), .* Fix: use csv:{text}"):
        build_data({"source": f"parquet:{text}", "label_column": "y"}, seed=0)
    assert build_data({"source": f"parquet:{table}", "label_column": "y"}, seed=0).kind == "binary"


def test_a_bad_regression_target_is_not_told_to_become_a_categorical_feature(tmp_path):
    rows = [[str(i), f"{i / 3:.3f}"] for i in range(30)] + [["1", "high"]]
    path = _write(tmp_path / "t.csv", ["x", "y"], rows)
    with pytest.raises(UserError) as err:
        build_data({"source": f"csv:{path}", "label_column": "y"}, seed=0, task="regression")
    assert "column 'y' is numeric but holds 'high' at line 32" in str(err.value)
    assert "set task='classification'" in str(err.value)
    assert "categorical_columns" not in str(err.value)
