"""The check before a run folder exists: every plug-in resolved, the data and model built, one batch through the
model and the task, the best metric measured, the optimizer and schedule built. A mistake here is one line and
exit 2, not a failed run folder."""
from __future__ import annotations

import json
from typing import Mapping, Sequence

import torch
from torch.utils.data import SequentialSampler

from stride.errors import ConfigError
from stride.training.data import build_splits, make_loader
from stride.training.trainer import Trainer, check_plugins, trainer_class


# Settings that change no shape, name or constructor argument: a sweep over them is checked once.
UNCHECKED = ("work_dir", "run", "slurm", "container")
UNCHECKED_TRAINING = ("seed", "model_seed", "epochs", "deterministic", "log_every_steps", "stop_check_seconds",
                      "checkpoint_every_steps", "checkpoint_every_minutes", "keep_last_checkpoints", "async_checkpoint")


def _signature(config: Mapping) -> str:
    shaped = {k: v for k, v in config.items() if k not in UNCHECKED}
    shaped["training_kwargs"] = {k: v for k, v in config["training_kwargs"].items() if k not in UNCHECKED_TRAINING}
    return json.dumps(shaped, sort_keys=True, default=str)


def check(configs: Sequence[Mapping]) -> None:
    """Check each config (each point of a sweep, once per distinct shape-changing setting); data is built once per
    distinct dataset_kwargs."""
    built: dict[str, object] = {}
    seen: set[str] = set()
    for config in configs:
        signature = _signature(config)
        if signature in seen:
            continue
        seen.add(signature)
        check_plugins(config)
        if config.get("trainer_class"):
            trainer_class(config)
        if not config["training_kwargs"]["check_batch"]:
            continue
        # On the submitting machine, on its CPU: shapes and names are what is checked, not speed.
        config = json.loads(json.dumps(dict(config)))
        config["device"] = "cpu"
        key = json.dumps(config["dataset_kwargs"], sort_keys=True)
        if key not in built:
            built[key] = build_splits(config)
        check_one(config, built[key])


def check_one(config: dict, data: object) -> None:
    trainer = Trainer(config=config)  # data and model are built on first use: the data given, then the model
    trainer.data = data
    task, model = trainer.task, trainer.model  # building the model: its errors are one line already
    name = config["task_kwargs"].get("task_name", "auto")
    # The loader training uses (a dataset's __getitems__ may return the batch itself), on the first samples.
    train = trainer.data.train
    loader = make_loader(train, config["load_data_kwargs"]["batch_size"], SequentialSampler(train))
    try:
        batch = next(iter(loader))
    except StopIteration:
        raise ConfigError(f"dataset '{config['dataset_kwargs']['dataset_name']}' has an empty train split") from None
    model.train()
    try:
        with torch.no_grad():
            task.check(model, batch)
            metrics = task.compute(task.eval_sums(model, batch))
    except ConfigError:
        raise
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise ConfigError(f"one batch through model '{config['model_kwargs']['model_name']}' and task '{name}' "
                          f"failed: {type(exc).__name__}: {text[0] if text else ''}") from None
    best = config["training_kwargs"]["best_metric"] or task.best_metric
    available = [f"val_{metric}" for metric in metrics]
    if best not in available:
        from stride.errors import did_you_mean

        raise ConfigError(f"training_kwargs.best_metric '{best}' is not a validation metric of task '{name}'"
                          f"{did_you_mean(best, available)}; available: {', '.join(available)}")
    from stride.training import recipe

    tk = config["training_kwargs"]
    optimizer = recipe.build_optimizer([p for p in model.parameters() if p.requires_grad], tk)
    try:
        recipe.Schedule(optimizer, tk, total_steps=1, maximize=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"training_kwargs.scheduler '{tk['scheduler']}' refused its settings "
                          f"{tk['scheduler_kwargs']}: {exc}") from None

