"""The training side's doors: tasks, metrics, recipes, hooks, sinks, data artefacts, inference, subclasses."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import read_json, read_jsonl
from slurm_helpers import needs_slurm
from stride import Callback, DataSplits, MetricSink, Trainer
from stride.errors import ConfigError
from stride.training import metrics as metrics_lib
from stride.training import recipe

TINY = {"model_kwargs": {"model_name": "MLP", "hidden": [16]}, "device": "cpu"}


def write_module(folder: Path, name: str, source: str) -> None:
    (folder / f"{name}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """A user module on sys.path (and on PYTHONPATH for the CLI's processes)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    write_module(tmp_path, "user_plugins", '''
        import json, torch
        from torch.utils.data import TensorDataset
        from stride import Callback, DataSplits, MetricSink, Task

        def pairs(n: int = 400, run_dir=None, splits=None):
            """Two inputs in a dict; counts its own calls and which splits it was asked for."""
            import os
            with open(os.environ["CALLS_FILE"], "a") as handle:
                handle.write(json.dumps({"run_dir": str(run_dir), "splits": list(splits)}) + "\\n")
            g = torch.Generator().manual_seed(0)
            a, b = torch.randn(n, 3, generator=g), torch.randn(n, 2, generator=g)
            y = ((a.sum(1) + b.sum(1)) > 0).long()
            class Dicts(torch.utils.data.Dataset):
                def __len__(self): return n
                def __getitem__(self, i): return {"a": a[i], "b": b[i], "label": y[i]}
            data = Dicts()
            idx = list(range(n))
            sub = lambda s: torch.utils.data.Subset(data, s)
            want = set(splits)
            return DataSplits(sub(idx[:300]) if "train" in want else None, sub(idx[300:350]) if "val" in want else None,
                              sub(idx[350:]) if "test" in want else None, input_shape=(5,), num_outputs=2)

        class TwoInputs(torch.nn.Module):
            def __init__(self, num_outputs, **kwargs):
                super().__init__()
                self.lin = torch.nn.Linear(5, num_outputs)
            def forward(self, a, b):
                return self.lin(torch.cat([a, b], dim=1))

        class SelfLoss(torch.nn.Module):
            """A model that computes its own loss (task model_loss)."""
            def __init__(self, input_shape, num_outputs):
                super().__init__()
                self.lin = torch.nn.Linear(input_shape[0], num_outputs)
            def forward(self, x, y):
                loss = torch.nn.functional.cross_entropy(self.lin(x), y)
                return {"loss": loss, "doubled": 2 * loss}

        class Records(MetricSink):
            def __init__(self, path: str):
                self.path = path
            def open(self, run_dir, config, resume_step):
                with open(self.path, "a") as handle:
                    handle.write(json.dumps({"open": resume_step}) + "\\n")
            def write(self, record):
                with open(self.path, "a") as handle:
                    handle.write(json.dumps(record) + "\\n")

        class Boom(Callback):
            def on_epoch_end(self, state):
                raise ValueError("the hook broke")

        class VectorLoss(Task):
            def loss(self, model, batch):
                x, y = batch
                return torch.nn.functional.cross_entropy(model(x), y, reduction="none")
            def eval_sums(self, model, batch):
                return {}
            def compute(self, totals):
                return {"loss": 0.0}
        ''')
    monkeypatch.setenv("CALLS_FILE", str(tmp_path / "calls.jsonl"))
    return tmp_path


# ------------------------------------------------------------------------------------------------------ metrics
def test_metrics_reduced_from_sums_match_scikit_learn_on_the_whole_split():
    from sklearn.metrics import f1_score, mean_absolute_error, r2_score

    g = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(200, 4, generator=g), torch.randint(0, 4, (200,), generator=g)
    f1 = metrics_lib.MacroF1(num_classes=4)
    halves = [f1.update(logits[:70], labels[:70]), f1.update(logits[70:], labels[70:])]  # two "ranks"
    total = {"confusion": halves[0]["confusion"] + halves[1]["confusion"]}
    assert f1.compute(total) == pytest.approx(f1_score(labels, logits.argmax(1), average="macro"))
    prediction, target = torch.randn(90, 2, generator=g), torch.randn(90, 2, generator=g)
    for metric, expected in ((metrics_lib.R2(), r2_score(target, prediction)),
                             (metrics_lib.MeanAbsoluteError(), mean_absolute_error(target, prediction))):
        parts = [metric.update(prediction[:40], target[:40]), metric.update(prediction[40:], target[40:])]
        assert metric.compute({k: parts[0][k] + parts[1][k] for k in parts[0]}) == pytest.approx(expected)
    name, huber = metrics_lib.resolve_metric("HuberLoss")
    sums = huber.update(prediction, target)
    assert name == "HuberLoss" and huber.compute(sums) == pytest.approx(
        float(torch.nn.functional.huber_loss(prediction, target)))


# ------------------------------------------------------------------------------------------------------ recipes
def test_any_torch_optimizer_by_name_and_per_epoch_schedules():
    params = [torch.nn.Parameter(torch.zeros(2))]
    base = {"lr": 0.1, "weight_decay": 0.0, "momentum": 0.9, "optimizer_kwargs": {}, "warmup_steps": 0}
    for name, cls in (("rmsprop", torch.optim.RMSprop), ("Adagrad", torch.optim.Adagrad), ("sgd", torch.optim.SGD)):
        assert type(recipe.build_optimizer(params, {**base, "optimizer": name})) is cls
    with pytest.raises(ConfigError, match="did you mean 'adamw'"):
        recipe.optimizer_class("adamww")
    optimizer = recipe.build_optimizer(params, {**base, "optimizer": "sgd"})
    schedule = recipe.Schedule(optimizer, {**base, "scheduler": "multistep",
                                           "scheduler_kwargs": {"milestones": [2, 4], "gamma": 0.5}}, 100, False)
    lrs = []
    for _ in range(5):
        optimizer.step()
        schedule.after_step()  # per-epoch schedules ignore steps
        schedule.after_epoch(None)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.1, 0.05, 0.05, 0.025, 0.025])
    plateau = recipe.Schedule(optimizer, {**base, "scheduler": "plateau",
                                          "scheduler_kwargs": {"patience": 0, "factor": 0.1}}, 100, maximize=True)
    before = optimizer.param_groups[0]["lr"]
    plateau.after_epoch(0.9)
    plateau.after_epoch(0.8)  # worse for a maximised metric: cut at once (patience 0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(before * 0.1)


def test_early_stopping_counts_epochs_without_improvement_beyond_min_delta():
    stop = recipe.EarlyStopping(patience=2, min_delta=0.01, maximize=False)
    assert [stop.update(v) for v in (1.0, 0.995, 0.9, 0.899)] == [None, None, None, None]
    assert stop.update(0.95) and stop.bad_epochs == 2
    restored = recipe.EarlyStopping(2, 0.01, False)
    restored.load_state_dict(stop.state_dict())
    assert restored.state_dict() == stop.state_dict()


def test_plateau_and_early_stopping_in_a_real_run(tmp_path):
    trainer = Trainer(work_dir=tmp_path, **TINY, training_kwargs={
        "epochs": 30, "lr": 0.05, "scheduler": "plateau", "scheduler_kwargs": {"patience": 0, "factor": 0.5},
        "early_stopping_patience": 2, "best_metric": "val_loss"})
    results = trainer.fit()
    assert results["epochs"] < 30 and "early stopping" in results["ended_early"]["reason"]
    lrs = [r["lr"] for r in read_jsonl(tmp_path / "0" / "metrics.jsonl") if r["split"] == "train"]
    assert min(lrs) < 0.05  # the plateau schedule cut the rate on the validation loss


def test_model_seed_sets_the_initial_weights_apart_from_the_data_order(tmp_path):
    def first_weights(**tk):
        return Trainer(work_dir=tmp_path, **TINY, training_kwargs=tk).model.net[1].weight.detach().clone()

    assert torch.equal(first_weights(seed=1, model_seed=7), first_weights(seed=2, model_seed=7))
    assert not torch.equal(first_weights(seed=1, model_seed=7), first_weights(seed=1, model_seed=8))
    assert torch.equal(first_weights(seed=3), first_weights(seed=5, model_seed=3))


# -------------------------------------------------------------------------------------------- tasks and batches
def test_dict_batches_with_two_inputs_a_named_criterion_and_extra_metrics(plugins):
    trainer = Trainer(work_dir=plugins / "exp", device="cpu",
                      dataset_kwargs={"dataset_name": "user_plugins:pairs"},
                      model_kwargs={"model_name": "user_plugins:TwoInputs"},
                      task_kwargs={"task_name": "classification", "targets": "label", "loss": "cross_entropy",
                                   "metrics": ["accuracy", "f1_macro", "NLLLoss"]},
                      load_data_kwargs={"batch_size": 16},
                      training_kwargs={"epochs": 8, "lr": 0.05, "best_metric": "val_f1_macro"})
    results = trainer.fit()
    assert results["test_accuracy"] > 0.8 and 0 < results["test_f1_macro"] <= 1
    assert results["best"]["metric"] == "val_f1_macro" and "test_NLLLoss" in results


def test_a_model_that_computes_its_own_loss_trains_as_is(plugins):
    results = Trainer(work_dir=plugins / "exp", device="cpu", model_kwargs={"model_name": "user_plugins:SelfLoss"},
                      dataset_kwargs={"dataset_name": "synthetic_regression", "num_targets": 3},
                      task_kwargs={"task_name": "model_loss"}, training_kwargs={"epochs": 1}).fit()
    assert results["test_doubled"] == pytest.approx(2 * results["test_loss"])
    assert results["best"]["metric"] == "val_loss"


# ------------------------------------------------------------------------------------------- sinks and hooks
def test_a_user_sink_gets_every_record_and_is_rewound_on_resume(plugins, stride):
    records = plugins / "records.jsonl"
    sink = f"sinks=[{{name: 'user_plugins:Records', path: '{records}'}}]"
    proc = stride("local", "work_dir=exp", sink, "model_kwargs.model_name=MLP", "training_kwargs.epochs=2",
                  "training_kwargs.log_every_steps=5", env={"PYTHONPATH": str(plugins)}, check=True)
    lines = read_jsonl(records)
    assert lines[0] == {"open": 0}
    written = [line for line in lines[1:]]
    assert written == read_jsonl(plugins / "exp" / "0" / "metrics.jsonl")
    assert proc.stdout.strip().endswith(f"run folder: {plugins / 'exp' / '0'}")
    assert "run folder" not in proc.stderr  # said once, as the result


def test_a_hook_that_raises_is_a_recorded_failure_naming_it(plugins, stride):
    proc = stride("local", "work_dir=exp", "callbacks=[user_plugins:Boom]", "model_kwargs.model_name=MLP",
                  "training_kwargs.epochs=2", env={"PYTHONPATH": str(plugins)})
    assert proc.returncode != 0
    status = read_json(plugins / "exp" / "0" / "status.json")
    assert status["state"] == "failed" and "callback Boom.on_epoch_end raised at epoch 1" in status["error"]


# ------------------------------------------------------------------------------------- data artefacts, inference
def test_builders_get_the_run_folder_and_load_run_reads_no_training_data(plugins):
    calls = plugins / "calls.jsonl"
    config = {"dataset_kwargs": {"dataset_name": "user_plugins:pairs"}, "device": "cpu",
              "model_kwargs": {"model_name": "user_plugins:TwoInputs"},
              "task_kwargs": {"targets": "label"}, "training_kwargs": {"epochs": 1}}
    trained = Trainer(work_dir=plugins / "exp", **config)
    trained.fit()
    seen = read_jsonl(calls)
    assert seen[0]["run_dir"] == "None"  # built before the run folder existed
    assert seen[-1]["run_dir"] == str(plugins / "exp" / "0")  # and again with it, for its artefacts
    calls.write_text("")
    fresh = Trainer(work_dir=plugins / "exp").load_run("0")  # a bare Trainer, as the seed's users write it
    assert calls.read_text() == ""  # the model came back from recorded shapes: no data read
    assert fresh.config["dataset_kwargs"]["dataset_name"] == "user_plugins:pairs"
    batch = {"a": torch.randn(4, 3), "b": torch.randn(4, 2)}
    assert fresh.predict(batch).shape == (4, 2)
    test_only = fresh.load_run("0", splits=("test",))
    assert [json.loads(line)["splits"] for line in calls.read_text().splitlines()] == [["test"]]
    assert set(test_only.evaluate("test")) == {"test_loss", "test_accuracy"}


# --------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("words, message", [
    (["training_kwargs.optimizer=adamm"], "not a torch.optim optimizer (did you mean 'adam'"),
    (["training_kwargs.scheduler=cosin"], "did you mean 'cosine'"),
    (["training_kwargs.scheduler=step", "training_kwargs.scheduler_kwargs.step_sise=2"], "step_size"),
    (["training_kwargs.optimizer_kwargs.betaz=[0.9,0.9]"], "did you mean 'betas'"),
    (["training_kwargs.optimizer=sgd", "training_kwargs.momentum=-1"], "momentum"),
    (["task_kwargs.task_name=clasification"], "did you mean 'classification'"),
    (["task_kwargs.metrics=[acuracy]"], "acuracy"),
    (["task_kwargs.loss=HubberLoss"], "neither a torch.nn loss"),
    (["training_kwargs.best_metric=val_f1"], "'val_f1' is not a validation metric"),
    (["callbacks=[no_such_module:Hook]"], "callback 'no_such_module:Hook' cannot be imported"),
    (["dataset_kwargs.dataset_name=synthetic_regression", "model_kwargs.model_name=MLP",
      "model_kwargs.hidden=[-4]"], "model 'MLP' could not be built"),
    (["model_kwargs.model_name=user_plugins:TwoInputs"], "one batch through model"),
    (["task_kwargs.task_name=user_plugins:VectorLoss"], "not a scalar tensor"),
    (["device=mps"], "no Apple GPU"),
    (["device=cuda"], "asks for 1 GPU(s) but this machine shows 0"),
])
def test_bad_training_settings_are_one_line_before_any_run_folder(plugins, stride, words, message):
    proc = stride("local", "work_dir=exp", "model_kwargs.model_name=MLP", *words, env={"PYTHONPATH": str(plugins)})
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and not (plugins / "exp").exists()


def test_output_that_does_not_fit_the_targets_is_refused_before_training(plugins, stride):
    wrong_width = stride("local", "work_dir=exp", "dataset_kwargs.dataset_name=synthetic_regression",
                         "dataset_kwargs.num_targets=2", "model_kwargs.model_name=user_plugins:SelfLoss")
    assert wrong_width.returncode == 2
    labels = stride("local", "work_dir=exp", "model_kwargs.model_name=MLP", "dataset_kwargs.dataset_name="
                    "synthetic_regression", "task_kwargs.task_name=classification")
    assert labels.returncode == 2 and "targets" in labels.stderr or "labels" in labels.stderr, labels.stderr
    assert not (plugins / "exp").exists()


def test_seed_style_words_and_python_literals_in_lists(plugins, stride):
    proc = stride("--config", "work_dir=exp", "--config", "run=R", "--config", "model_kwargs.model_name=MLP",
                  "--config", "model_kwargs.hidden=[16]",
                  "--config", "training_kwargs.epochs=1", "--config", "training_kwargs.grad_clip_norm=None",
                  check=True)
    assert read_json(plugins / "exp" / "R" / "config.json")["training_kwargs"]["grad_clip_norm"] is None
    assert "run folder" in proc.stdout
    from stride.config import parse_value

    assert parse_value("[64, None, True, False]") == [64, None, True, False]


def test_a_model_with_var_kwargs_gets_no_injected_arguments(plugins):
    """TwoInputs(num_outputs, **kwargs) names num_outputs only: input_shape must not be pushed into **kwargs."""
    from stride.training.data import names_parameter
    import user_plugins

    assert names_parameter(user_plugins.TwoInputs, "num_outputs")
    assert not names_parameter(user_plugins.TwoInputs, "input_shape")


def test_a_trainer_subclass_runs_on_every_rank(plugins, stride):
    write_module(plugins, "user_trainer", '''
        from stride import Trainer

        class Marking(Trainer):
            def evaluate(self, split="test", loader=None):
                return {**super().evaluate(split, loader), f"{split}_rank_seen": float(self.env.rank)}
        ''')
    stride("local", "work_dir=exp", "trainer_class=user_trainer:Marking", "model_kwargs.model_name=MLP",
           "model_kwargs.hidden=[16]", "training_kwargs.epochs=1", "training_kwargs.best_metric=val_loss",
           "--nproc", "2", env={"PYTHONPATH": str(plugins)}, check=True)
    results = read_json(plugins / "exp" / "0" / "results.json")
    assert "test_rank_seen" in results  # rank 0's results came from the subclass on every rank's evaluate
    assert read_json(plugins / "exp" / "0" / "config.json")["trainer_class"] == "user_trainer:Marking"


def test_a_subclass_defined_in_a_script_cannot_reach_other_ranks_and_says_what_to_write(plugins, stride):
    (plugins / "script.py").write_text(textwrap.dedent('''
        from stride import Trainer
        class Mine(Trainer):
            pass
        Mine(work_dir="exp", model_kwargs={"model_name": "MLP", "hidden": [8]}, training_kwargs={"epochs": 1},
             device="cpu").fit()
        '''))
    import subprocess
    import sys

    from conftest import cli_env

    subprocess.run([sys.executable, "script.py"], cwd=plugins, env=cli_env(), check=True, capture_output=True)
    assert read_json(plugins / "exp" / "0" / "config.json")["trainer_class"] == "__main__:Mine"
    proc = stride("resume", "exp/0", "--local", "training_kwargs.epochs=2")
    assert proc.returncode == 2 and "stride.Task" in proc.stderr and "__main__:Mine" in proc.stderr, proc.stderr


def test_python_m_stride_trainer_trains_like_the_seed(plugins):
    import subprocess
    import sys

    from conftest import cli_env

    proc = subprocess.run([sys.executable, "-m", "stride.trainer", "--config", "work_dir=exp", "--config",
                           "model_kwargs.model_name=MLP", "--config", "training_kwargs.epochs=1"], cwd=plugins,
                          env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert read_json(plugins / "exp" / "0" / "status.json")["state"] == "completed"


@needs_slurm
def test_srun_stride_local_in_a_multi_task_step_refuses_naming_stride_submit(tmp_path):
    """The seed's hand-written sbatch style: every task of a real srun step refuses instead of training a copy."""
    import subprocess
    import sys

    from conftest import cli_env

    proc = subprocess.run(["srun", "--partition", "debug", "--ntasks", "2", "--time", "2", "--chdir", str(tmp_path),
                           sys.executable, "-m", "stride", "local", "work_dir=exp", "model_kwargs.model_name=MLP"],
                          env=cli_env(), capture_output=True, text=True, timeout=300)
    refusals = [line for line in proc.stderr.splitlines() if line.startswith("stride: error:")]
    assert len(refusals) == 2 and all("stride submit" in line and "2 tasks" in line for line in refusals), proc.stderr
    assert proc.returncode != 0 and not (tmp_path / "exp").exists()
