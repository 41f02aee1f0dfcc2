"""Config resolution: layering order, value parsing, strict keys and types (pure logic)."""
from __future__ import annotations

import pytest

from stride import config
from stride.cli import normalise_argv
from stride.errors import ConfigError


def test_values_parse_as_yaml_scalars_and_lists():
    assert config.parse_value("3e-4") == pytest.approx(3e-4)
    assert config.parse_value("[64,64]") == [64, 64]
    assert config.parse_value("true") is True
    assert config.parse_value("null") is None
    assert config.parse_value("10") == 10 and isinstance(config.parse_value("10"), int)
    assert config.parse_value("ResNet") == "ResNet"


def test_layers_apply_in_order(tmp_path):
    work = tmp_path / "exp"
    work.mkdir()
    (work / "config.yaml").write_text("training_kwargs:\n  epochs: 3\n  lr: 0.5\n  seed: 7\n")
    extra = tmp_path / "extra.yaml"
    extra.write_text("training_kwargs:\n  lr: 0.25\n  seed: 8\nmodel_kwargs:\n  model_name: MLP\n")
    resolved = config.resolve(overrides=[f"work_dir={work}", "training_kwargs.seed=9"], files=[extra])
    tk = resolved["training_kwargs"]
    assert tk["epochs"] == 3            # experiment config over defaults
    assert tk["lr"] == 0.25             # file over experiment config
    assert tk["seed"] == 9              # override over file
    assert resolved["model_kwargs"] == {"model_name": "MLP"}
    assert resolved["work_dir"] == str(work)
    assert resolved["load_data_kwargs"]["batch_size"] == 64  # untouched default


def test_yaml_float_without_dot_is_accepted_as_number(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training_kwargs:\n  lr: 3e-4\n")  # YAML 1.1 reads this as a string
    assert config.resolve(files=[path])["training_kwargs"]["lr"] == pytest.approx(3e-4)


def test_free_form_sections_take_nested_keys():
    resolved = config.resolve(overrides=["model_kwargs.model_name=MLP", "model_kwargs.hidden=[32,16]"])
    assert resolved["model_kwargs"] == {"model_name": "MLP", "hidden": [32, 16]}


@pytest.mark.parametrize("override, message", [
    ("training_kwargs.lrr=1", "unknown config key 'training_kwargs.lrr' (did you mean 'training_kwargs.lr'"),
    ("epochs=3", "did you mean 'training_kwargs.epochs'"),
    ("training_kwargs.epochs=ten", "config key 'training_kwargs.epochs' got \"ten\" (str); expected an integer"),
    ("training_kwargs.compile=1", "expected true/false"),
    ("device=tpu", "expected one of auto, cpu, cuda"),
    ("training_kwargs.optimizer=adamm", "did you mean 'adam'"),
    ("load_data_kwargs.batch_size=0", "expected a positive value"),
    ("run=../escape", "run name '../escape' is not allowed"),
    ("training_kwargs", "expected key=value"),
])
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(ConfigError) as info:
        config.resolve(overrides=[override])
    assert message in str(info.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        config.resolve(overrides=["training_kwargs.epochs=x", "training_kwargs.lr=y"])
    assert "training_kwargs.epochs" in str(info.value) and "training_kwargs.lr" in str(info.value)


def test_malformed_and_missing_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training_kwargs:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        config.resolve(files=[bad])
    with pytest.raises(ConfigError, match="does not exist"):
        config.resolve(files=[tmp_path / "nope.yaml"])
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        config.resolve(files=[listing])


def test_seed_config_flag_form_is_normalised():
    assert normalise_argv(["local", "--config", "work_dir=x", "--config=run=a", "--nproc", "2"]) == \
        ["local", "work_dir=x", "run=a", "--nproc", "2"]


def test_split_cli_args_rejects_bare_words():
    assert config.split_cli_args(["a=1", "b.yaml", "c.yml"]) == (["b.yaml", "c.yml"], ["a=1"])
    with pytest.raises(ConfigError, match="expected key=value or a .yaml"):
        config.split_cli_args(["oops"])
