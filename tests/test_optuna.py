"""A real Optuna study prunes stride runs through the epoch-end hook: in one process, and on two ranks by config."""
from __future__ import annotations

import optuna
import pytest

from conftest import read_json, read_jsonl, run_stride
from stride import Trainer
from stride.integrations.optuna import OptunaPruning

FAST = {"epochs": 3, "log_every_steps": 5}


def objective_for(work_dir):
    def objective(trial: optuna.Trial) -> float:
        pruning = OptunaPruning(trial)
        trainer = Trainer(work_dir=work_dir, model_kwargs={"model_name": "MLP", "hidden": [32]}, device="cpu",
                          training_kwargs={**FAST, "lr": trial.suggest_float("lr", 1e-7, 1e-1, log=True)},
                          callbacks=[pruning])
        results = trainer.fit()
        trial.set_user_attr("run", str(trainer.run_dir.path))
        if pruning.pruned:
            raise optuna.TrialPruned()
        return results["best"]["value"]
    return objective


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("optuna") / "exp"
    storage = f"sqlite:///{work_dir.parent / 'study.db'}"
    study = optuna.create_study(study_name="digits", storage=storage, direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
    for lr in (3e-3, 1e-2, 1e-7):  # two good trials, then one that learns nothing in its first epoch
        study.enqueue_trial({"lr": lr})
    study.optimize(objective_for(work_dir), n_trials=3)
    return study, work_dir, storage


def test_a_hopeless_trial_is_pruned_after_its_first_epoch(study):
    study, work_dir, _ = study
    good, other, bad = study.trials
    assert good.state == other.state == optuna.trial.TrialState.COMPLETE
    assert bad.state == optuna.trial.TrialState.PRUNED
    assert good.value >= 0.7 and sorted(good.intermediate_values) == [1, 2, 3]
    assert sorted(bad.intermediate_values) == [1]
    run = bad.user_attrs["run"]
    results = read_json(f"{run}/results.json")
    assert results["epochs"] == 1 and "pruned by Optuna" in results["ended_early"]["reason"]
    assert [r["epoch"] for r in read_jsonl(f"{run}/metrics.jsonl") if r["split"] == "val"] == [1]
    status = read_json(f"{run}/status.json")
    assert status["state"] == "completed" and "pruned" in status["ended_early"]
    # The pruned run still ends like any run: best weights tested, final weights kept.
    assert "test_accuracy" in results and (work_dir / bad.user_attrs["run"].rsplit("/", 1)[1] / "weights" /
                                           "final.pt").is_file()


def test_the_hook_named_in_the_config_prunes_on_two_ranks(study, tmp_path):
    """Every rank follows rank 0's decision: a 2-process run loads the trial from the study's storage by config."""
    study, work_dir, storage = study
    trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-7, 1e-1, log=True)})
    config = tmp_path / "prune.yaml"
    config.write_text(
        "callbacks:\n"
        "  - name: stride.integrations.optuna:OptunaPruning\n"
        f"    storage: '{storage}'\n"
        "    study_name: digits\n"
        f"    trial_number: {trial.number}\n"
        "    pruner: {name: MedianPruner, n_startup_trials: 2}\n")
    proc = run_stride("local", f"work_dir={work_dir}", str(config), "model_kwargs.model_name=MLP",
                      "model_kwargs.hidden=[32]", "training_kwargs.epochs=3", "training_kwargs.lr=1e-7",
                      "--nproc", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    run = proc.stdout.strip().splitlines()[-1].split("run folder: ")[1]
    results = read_json(f"{run}/results.json")
    assert results["world_size"] == 2 and results["epochs"] == 1
    assert "pruned by Optuna" in results["ended_early"]["reason"]
    reported = optuna.load_study(study_name="digits", storage=storage).trials[trial.number].intermediate_values
    assert list(reported) == [1]
    for rank in (0, 1):  # both ranks ended after the same epoch, together
        assert "ending the run after epoch 1" in (tmp_path / run / "logs" / f"rank_{rank}.log").read_text()
