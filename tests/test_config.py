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


def test_text_keys_keep_numbers_as_typed():
    resolved = config.resolve(overrides=["work_dir=2024", "run=007"])
    assert resolved["run"] == "007" and resolved["work_dir"].endswith("/2024")
    assert config.resolve(layers=[{"run": 5}])["run"] == "5"


def test_plugin_arguments_are_type_checked_against_the_signature():
    from stride.trainer import check_plugins

    for override, message in [
        ("model_kwargs.channels=abc", "config key 'model_kwargs.channels' got \"abc\" (str); expected a list of "
                                      "integers (for model 'CNN')"),
        ("model_kwargs.dropout=true", "config key 'model_kwargs.dropout' got true (bool); expected a number"),
        ("dataset_kwargs.split_seed=1.5", "config key 'dataset_kwargs.split_seed' got 1.5 (float); expected an "
                                          "integer (for dataset 'digits')"),
        ("model_kwargs.model_name=:Net", "model ':Net' is not an import path"),
    ]:
        with pytest.raises(ConfigError) as info:
            check_plugins(config.resolve(overrides=[override]))
        assert message in str(info.value), override
    check_plugins(config.resolve(overrides=["model_kwargs.channels=[8,16]", "model_kwargs.dropout=0"]))


def test_a_broken_user_module_is_one_line(tmp_path, monkeypatch):
    from stride.trainer import check_plugins

    (tmp_path / "broken_plugin.py").write_text("import torch\nraise RuntimeError('no GPU driver\\nmore')\n")
    (tmp_path / "bad_syntax.py").write_text("def f(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"model 'broken_plugin:Net': importing module 'broken_plugin' raised "
                                          r"RuntimeError: no GPU driver$"):
        check_plugins(config.resolve(overrides=["model_kwargs.model_name=broken_plugin:Net"]))
    with pytest.raises(ConfigError, match=r"raised SyntaxError: invalid syntax \(.*bad_syntax.py, line 1\)"):
        check_plugins(config.resolve(overrides=["model_kwargs.model_name=bad_syntax:Net"]))


@pytest.mark.parametrize("override, message", [
    ("training_kwargs.lrr=1", "unknown config key 'training_kwargs.lrr' (did you mean 'training_kwargs.lr'"),
    ("epochs=3", "did you mean 'training_kwargs.epochs'"),
    ("training_kwargs.epochs=ten", "config key 'training_kwargs.epochs' got \"ten\" (str); expected an integer"),
    ("training_kwargs.compile=1", "expected true/false"),
    ("device=tpu", "config key 'device' got 'tpu'; expected auto, cpu, cuda, cuda:N or mps"),
    ("device=auto:1", "config key 'device' got 'auto:1'"),
    ("device=cuda:x", "config key 'device' got 'cuda:x'"),
    ("run=[1]", "config key 'run' got [1] (list); expected a string or null"),
    ('slurm.sbatch_args={"comment": "x\\ntouch /tmp/pwned #"}', "config key 'slurm.sbatch_args.comment' holds a line "
                                                                 "break"),
    ('slurm.setup=["module load x", "a\\rb"]', "config key 'slurm.setup[1]' holds a line break"),
    ('container.env={"A": "x\\ny"}', "config key 'container.env.A' holds a line break"),
    ("load_data_kwargs.batch_size=0", "expected a positive value"),
    ("run=../escape", "run name '../escape' is not allowed"),
    ("training_kwargs", "expected key=value"),
    ("load_data_kwargs.num_workers=many", "config key 'load_data_kwargs.num_workers' got 'many'; expected a number "
                                          "of workers or auto"),
    ("load_data_kwargs.num_workers=-1", "expected zero or more"),
    ("slurm.gpu_binding=closets", "expected one of node, task, closest (did you mean 'closest'?)"),
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


def test_num_workers_takes_a_count_or_auto():
    assert config.resolve(overrides=["load_data_kwargs.num_workers=auto"])["load_data_kwargs"]["num_workers"] == "auto"
    assert config.resolve(overrides=["load_data_kwargs.num_workers=2"])["load_data_kwargs"]["num_workers"] == 2
    assert config.resolve(layers=[{"load_data_kwargs": {"num_workers": "3"}}])["load_data_kwargs"]["num_workers"] == 3
