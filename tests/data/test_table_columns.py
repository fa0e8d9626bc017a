"""Table column inference that does not guess wrong: a label with one value is refused;
thousands separators and ISO dates are numbers; ambiguous dates and identifiers are flagged;
data_report.json says what each column became and why."""

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
