"""Optuna pruning as a stride Callback: report the best metric every epoch, end a trial Optuna prunes.

In one process, hand it the trial: `OptunaPruning(trial)`. On other ranks or SLURM jobs, name it in the config so
rank 0 loads the trial from the study's storage:
`callbacks=[{name: stride.integrations.optuna:OptunaPruning, storage: sqlite:///study.db, study_name: s,
trial_number: 3, pruner: {name: MedianPruner, n_startup_trials: 2}}]` (a storage does not keep the study's pruner:
name it here; default: Optuna's MedianPruner()). Needs `pip install 'stride[optuna]'`.
"""
from __future__ import annotations

from typing import Any, Optional

from stride.errors import ConfigError
from stride.training.hooks import Callback, FitState


class OptunaPruning(Callback):
    """Reports `metric` (default: the run's best metric) to the trial at every epoch end, at step = epoch, and
    ends the run when the trial should be pruned; `pruned` says so afterwards (raise optuna.TrialPruned then)."""

    def __init__(self, trial: Any = None, storage: Optional[str] = None, study_name: Optional[str] = None,
                 trial_number: Optional[int] = None, metric: Optional[str] = None, pruner: Optional[dict] = None):
        if trial is None and (storage is None or study_name is None or trial_number is None):
            raise ConfigError("OptunaPruning needs the trial, or storage, study_name and trial_number to load it")
        self.trial, self.metric, self.pruned = trial, metric, False
        self.where = (storage, study_name, trial_number)
        self.pruner = dict(pruner or {})

    def _load_trial(self) -> Any:
        import optuna

        storage, study_name, number = self.where
        kwargs = {k: v for k, v in self.pruner.items() if k != "name"}
        name = self.pruner.get("name", "MedianPruner")
        if not hasattr(optuna.pruners, name):
            raise ConfigError(f"OptunaPruning: optuna.pruners has no '{name}'")
        study = optuna.load_study(study_name=study_name, storage=storage,
                                  pruner=getattr(optuna.pruners, name)(**kwargs))
        matches = [t for t in study.get_trials(deepcopy=False) if t.number == number]
        if not matches:
            raise ConfigError(f"study '{study_name}' in {storage} has no trial number {number}")
        return optuna.trial.Trial(study, matches[0]._trial_id)

    def on_fit_start(self, state: FitState) -> None:
        if self.trial is None:
            self.trial = self._load_trial()

    def on_epoch_end(self, state: FitState) -> Optional[str]:
        metric = self.metric or state.trainer.config["training_kwargs"]["best_metric"] or (
            state.best or {}).get("metric")
        if metric not in state.metrics:
            raise ConfigError(f"OptunaPruning: metric '{metric}' is not among {', '.join(sorted(state.metrics))}")
        self.trial.report(state.metrics[metric], step=state.epoch)
        if self.trial.should_prune():
            self.pruned = True
            return f"pruned by Optuna (trial {self.trial.number}) at epoch {state.epoch}"
        return None
