"""Config loading: defaults, overrides parsed to the key's type, unknown keys refused."""

import pytest
from test_cli import assert_user_error, jaxdl

from jaxdl import config as config_lib
from jaxdl.errors import UserError

EXPERIMENT = "experiments/digits_mlp.py"


def test_experiment_is_laid_over_defaults():
    cfg = config_lib.load_config(EXPERIMENT)
    assert cfg.model.name == "mlp"
    assert cfg.num_epochs == 20
    assert cfg.optimizer.b2 == 0.999  # from the defaults
    assert cfg.model.hidden == (512, 256, 128)


def test_overrides_take_the_key_type():
    cfg = config_lib.load_config(
        EXPERIMENT,
        [
            "--config.optimizer.learning_rate=3e-4",
            "--config.data.batch_size=64",
            "--config.loss.name=mse",
            "--config.data.skip_bad_files=true",
            "--config.model.activation=gelu",
            "--config.model.hidden=(32,16)",
            "--config.lora={'rank': 4, 'alpha': 8.0, 'targets': '.*kernel'}",
        ],
    )
    assert cfg.optimizer.learning_rate == pytest.approx(3e-4)
    assert cfg.data.batch_size == 64 and isinstance(cfg.data.batch_size, int)
    assert cfg.loss.name == "mse"
    assert cfg.data.skip_bad_files is True
    assert cfg.model.activation == "gelu"
    assert tuple(cfg.model.hidden) == (32, 16)
    assert cfg.lora["rank"] == 4


def test_int_widens_to_float():
    cfg = config_lib.load_config(EXPERIMENT, ["--config.optimizer.learning_rate=1"])
    assert cfg.optimizer.learning_rate == 1.0 and isinstance(cfg.optimizer.learning_rate, float)


@pytest.mark.parametrize(
    "override, words",
    [
        ("--config.nonexistent=1", ["config.nonexistent", "unknown key"]),
        ("--config.data.nonexistent=1", ["config.data.nonexistent", "unknown key"]),
        ("--config.data.batch_size=abc", ["config.data.batch_size", "expected int", "'abc'"]),
        ("--config.data.batch_size=1.5", ["config.data.batch_size", "expected int", "1.5"]),
        ("--config.num_epochs", ["expected --config.KEY=VALUE"]),
        ("--config.data.skip_bad_files=maybe", ["skip_bad_files", "expected bool"]),
    ],
)
def test_bad_overrides_name_the_field(override, words):
    with pytest.raises(ValueError) as err:
        config_lib.load_config(EXPERIMENT, [override])
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_unknown_key_in_a_config_file(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("def get_config():\n    return {'optimizer': {'lerning_rate': 0.1}}\n")
    with pytest.raises(ValueError, match=r"config\.optimizer\.lerning_rate: unknown key"):
        config_lib.load_config(path)


def test_steps_or_epochs_exactly_one():
    with pytest.raises(ValueError, match="exactly one of num_steps / num_epochs"):
        config_lib.load_config(EXPERIMENT, ["--config.num_steps=10"])


def test_missing_file():
    with pytest.raises(UserError, match="--config: no file at"):
        config_lib.load_config("experiments/nope.py")


def test_json_round_trip(tmp_path):
    cfg = config_lib.load_config(EXPERIMENT, ["--config.model.hidden=(8,)"])
    path = tmp_path / "config.json"
    path.write_text(config_lib.to_json(cfg))
    again = config_lib.load_config(path)
    assert config_lib.to_json(again) == config_lib.to_json(cfg)


@pytest.mark.parametrize(
    "source, words",
    [
        ("def get_config(:\n    return {}\n", ["does not parse", "line 1 of", "Fix:"]),
        (
            "import os\nimport no_such_module_xyz\n\ndef get_config():\n    return {}\n",
            ["line 2: import failed", "No module named 'no_such_module_xyz'", "Fix:"],
        ),
        (
            "def get_config():\n    c = {'seed': 1}\n",
            ["get_config() in", "returned NoneType", "Fix: end get_config() with `return config`"],
        ),
        (
            "def get_config():\n    return {'seed': undefined_name}\n",
            ["line 2 raised NameError", "undefined_name", "Fix: correct line 2"],
        ),
        (
            "def get_config():\n    raise KeyError('boom')\n",
            ["line 2 raised KeyError", "'boom'", "Fix: correct line 2"],
        ),
    ],
    ids=["syntax", "import", "returns_none", "name_error", "raises"],
)
def test_a_broken_config_file_is_one_line_exit_2(tmp_path, source, words):
    path = tmp_path / "broken.py"
    path.write_text(source)
    done = jaxdl("train", "--config", str(path), "--workdir", str(tmp_path / "w"))
    assert_user_error(done, "--config: ", str(path), *words)
    # A relative path: the lines are found all the same (not "line None").
    done = jaxdl("train", "--config", "broken.py", "--workdir", "w", cwd=tmp_path)
    assert_user_error(done, "--config: ", "broken.py", *words)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "override, words",
    [
        ("--config.data.eval_batch_size=-4", ["data.eval_batch_size: expected an int >= 0"]),
        ("--config.data.max_image_pixels=0", ["data.max_image_pixels: expected an int >= 1"]),
        ("--config.data.seq_len=0", ["config.data.seq_len: expected an int >= 1, found 0"]),
        ("--config.data.num_workers=-1", ["config.data.num_workers: expected an int >= 0"]),
        (
            "--config.federated.alpha=-1",
            ["config.federated.alpha: expected 0 (IID", "found -1", "Fix: set"],
        ),
        ("--config.federated.clients=-2", ["config.federated.clients: expected an int >= 0"]),
    ],
)
def test_sizes_out_of_range_are_refused(tmp_path, override, words):
    done = jaxdl(
        "train", "--config", EXPERIMENT, "--workdir", str(tmp_path / "w"), "--no-progress", override
    )
    assert_user_error(done, *words)


def test_table_configs_share_the_shipped_base():
    """experiments/tabular_csv.py is the shipped `tabular` config; the sklearn table
    experiments differ from it only where they say so."""
    shipped = config_lib.load_config("tabular")
    assert config_lib.load_config("experiments/tabular_csv.py").to_dict() == shipped.to_dict()
    wine = config_lib.load_config("experiments/wine.py")
    assert (wine.task, wine.model.num_classes, wine.data.batch_size) == ("classification", 3, 16)
    assert wine.data.source == "sklearn:wine" and wine.model.hidden == shipped.model.hidden
    diabetes = config_lib.load_config("experiments/diabetes.py")
    assert (diabetes.model.hidden, diabetes.optimizer.weight_decay) == ((32,), 1e-3)
    assert diabetes.optimizer.learning_rate == shipped.optimizer.learning_rate
