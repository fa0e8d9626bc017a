"""A run remembers what it fitted and read: data_report.json keeps a table's train
statistics, vocabularies and classes, and the fingerprint of the file or folder. Export uses
only those (the data may change or vanish); evaluate and resume refuse data that changed
since training."""

import csv
import json
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from jaxdl.cli import main
from jaxdl.deploy.predict import predict_files
from jaxdl.errors import UserError

SHORT = ["--config.num_epochs=0", "--config.num_steps=12", "--config.log_every=6"]


def _rows(n, seed):
    sys.path.insert(0, "experiments")
    try:
        from make_tabular_csv import make_rows
    finally:
        sys.path.pop(0)
    return make_rows(n, seed=seed)


def _write(path, rows, mode="w"):
    with path.open(mode, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if mode == "w":
            writer.writeheader()
        writer.writerows(rows)


def _export(workdir, out):
    assert main(["export", "--workdir", str(workdir), "--out", str(out)]) == 0
    return json.loads(out.with_name(out.name + ".json").read_text())


def test_export_uses_the_fit_and_evaluate_refuses_a_changed_file(tmp_path, capsys):
    table, new = tmp_path / "loans.csv", tmp_path / "new.csv"
    _write(table, _rows(300, seed=0))
    _write(new, _rows(9, seed=5))
    workdir = tmp_path / "run"
    cfg = ["--config", "experiments/tabular_csv.py", "--workdir", str(workdir)]
    assert main(["train", *cfg, "--no-progress", f"--config.data.source=csv:{table}", *SHORT]) == 0
    fit = json.loads((workdir / "data_report.json").read_text())["fit"]
    assert fit["kind"] == "binary" and fit["class_names"] == ["no", "yes"]
    assert fit["preprocessing"]["fingerprint"]["bytes"] == table.stat().st_size
    before = _export(workdir, tmp_path / "a.jaxexport")
    probs = [r["top_k"] for r in predict_files(tmp_path / "a.jaxexport", [new])]
    assert main(["evaluate", "--workdir", str(workdir)]) == 0
    photo = tmp_path / "photo.png"
    Image.new("RGB", (4, 4)).save(photo)
    with pytest.raises(UserError, match="INPUT: .*photo.png is a PNG image, expected CSV text"):
        predict_files(tmp_path / "a.jaxexport", [photo])

    # Rows appended after training, with other incomes: other statistics if refitted.
    extra = _rows(200, seed=9)
    for row in extra:
        row["income"] = str(float(row["income"] or 0) * 10)
    _write(table, extra, mode="a")
    capsys.readouterr()
    after = _export(workdir, tmp_path / "b.jaxexport")
    assert after["preprocessing"]["source"] == before["preprocessing"]["source"]
    again = [r["top_k"] for r in predict_files(tmp_path / "b.jaxexport", [new])]
    assert again == probs

    assert main(["evaluate", "--workdir", str(workdir)]) == 2
    more = [*SHORT[:1], "--config.num_steps=24", SHORT[2]]
    assert main(["train", *cfg, "--no-progress", f"--config.data.source=csv:{table}", *more]) == 2
    evaluate, resume = capsys.readouterr().err.strip().splitlines()
    for line in (evaluate, resume):
        assert f"{table} changed since {workdir} trained on it" in line, line
        assert "Fix: restore it" in line

    table.unlink()  # export needs nothing but the workdir
    assert _export(workdir, tmp_path / "c.jaxexport")["preprocessing"] == after["preprocessing"]


def test_an_image_folder_that_gained_files_is_refused_by_evaluate(tmp_path, capsys):
    digits = load_digits()
    root = tmp_path / "digits"
    for label in (0, 1):
        (root / str(label)).mkdir(parents=True)
        for k, i in enumerate(np.flatnonzero(digits.target == label)[:20]):
            image = Image.fromarray((digits.images[i] * 15).astype(np.uint8))
            image.save(root / str(label) / f"{k}.png")
    workdir = tmp_path / "run"
    cmd = ["train", "--config", "experiments/digits_mlp.py", "--workdir", str(workdir)]
    overrides = [f"--config.data.source=imagefolder:{root}", "--config.model.num_classes=2"]
    assert main([*cmd, "--no-progress", "--config.data.channels=1", *overrides, *SHORT]) == 0
    fit = json.loads((workdir / "data_report.json").read_text())["fit"]
    assert fit["preprocessing"]["fingerprint"]["files"] == 40
    before = _export(workdir, tmp_path / "a.jaxexport")
    evaluate = ["evaluate", "--workdir", str(workdir), "--split", "val"]
    assert main(evaluate) == 0

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "1" / "new.png")
    capsys.readouterr()
    assert main(evaluate) == 2
    line = capsys.readouterr().err.strip()
    assert f"{root} changed since {workdir} trained on it (40 files" in line
    assert "41 files" in line
    assert _export(workdir, tmp_path / "b.jaxexport")["preprocessing"] == before["preprocessing"]
