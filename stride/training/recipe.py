"""The optimisation recipe: optimizer, learning-rate schedule and early stopping, from training_kwargs.

Each object keeps all of its state in a state_dict, so a resumed run continues the same recipe bit for bit.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch

from stride import registry
from stride.errors import ConfigError, did_you_mean

PER_STEP = ("constant", "cosine")
PER_EPOCH = {"step": "StepLR", "multistep": "MultiStepLR", "exponential": "ExponentialLR",
             "plateau": "ReduceLROnPlateau"}
SCHEDULERS = (*PER_STEP, *PER_EPOCH)


def optimizer_class(name: str) -> type:
    """A torch.optim optimizer by name, case-insensitive (sgd, adamw, rmsprop, ...), or an import path."""
    if ":" in name or (("." in name) and not hasattr(torch.optim, name)):
        return registry.import_object("optimizer", name)
    known = {attr.lower(): getattr(torch.optim, attr) for attr in dir(torch.optim)
             if isinstance(getattr(torch.optim, attr), type)
             and issubclass(getattr(torch.optim, attr), torch.optim.Optimizer)
             and getattr(torch.optim, attr) is not torch.optim.Optimizer}
    if name.lower() not in known:
        raise ConfigError(f"training_kwargs.optimizer '{name}' is not a torch.optim optimizer"
                          f"{did_you_mean(name.lower(), known)}; known: {', '.join(sorted(known))} (or an import "
                          f"path 'pkg.module:Class')")
    return known[name.lower()]


def optimizer_arguments(cls: type, tk: Mapping) -> dict:
    """lr and weight_decay for every optimizer that takes them, momentum for SGD, then optimizer_kwargs."""
    import inspect

    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}
    kwargs: dict[str, Any] = {}
    for key in ("lr", "weight_decay"):
        if key in params:
            kwargs[key] = tk[key]
    if cls is torch.optim.SGD:
        kwargs["momentum"] = tk["momentum"]
    kwargs.update(tk["optimizer_kwargs"])
    return kwargs


def check_optimizer(tk: Mapping) -> None:
    """Refuse an unknown optimizer or an argument it does not take, before anything is written."""
    cls = optimizer_class(tk["optimizer"])
    registry.check_kwargs("optimizer", tk["optimizer"], cls, tk["optimizer_kwargs"], provided=("params", "lr",
                                                                                                "weight_decay"))


def build_optimizer(params: list, tk: Mapping) -> torch.optim.Optimizer:
    cls = optimizer_class(tk["optimizer"])
    try:
        return cls(params, **optimizer_arguments(cls, tk))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"optimizer '{tk['optimizer']}' refused its settings: {exc}") from None


def check_scheduler(tk: Mapping) -> None:
    name, kwargs = tk["scheduler"], dict(tk["scheduler_kwargs"])
    if name in PER_STEP:
        unknown = [k for k in kwargs if k != "min_lr_ratio"]
        if unknown:
            raise ConfigError(f"training_kwargs.scheduler_kwargs.{unknown[0]} is not a setting of the {name} "
                              f"schedule; it takes min_lr_ratio")
        return
    if tk["warmup_steps"]:
        raise ConfigError(f"training_kwargs.warmup_steps works with the constant and cosine schedules, not "
                          f"{name}: set warmup_steps=0")
    if name in PER_EPOCH:
        cls = getattr(torch.optim.lr_scheduler, PER_EPOCH[name])
        provided = ("optimizer", "mode") if name == "plateau" else ("optimizer",)
        registry.check_kwargs("scheduler", name, cls, kwargs, provided=provided)
        return
    if ":" not in name and "." not in name:
        raise ConfigError(f"training_kwargs.scheduler '{name}' is unknown{did_you_mean(name, SCHEDULERS)}; known: "
                          f"{', '.join(SCHEDULERS)} (or an import path to a factory 'pkg.module:make')")
    kwargs.pop("interval", None)
    registry.check_kwargs("scheduler", name, registry.import_object("scheduler", name), kwargs,
                          provided=("optimizer",))


class Schedule:
    """The learning-rate schedule: stepped after every optimizer step, or at every epoch end (plateau on the best
    metric)."""

    def __init__(self, optimizer: torch.optim.Optimizer, tk: Mapping, total_steps: int, maximize: bool):
        name, kwargs = tk["scheduler"], dict(tk["scheduler_kwargs"])
        self.interval = "step"
        if name in PER_STEP:
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, _warmup_cosine(tk["warmup_steps"], max(1, total_steps), name == "cosine",
                                          float(kwargs.get("min_lr_ratio", 0.0))))
        elif name in PER_EPOCH:
            cls = getattr(torch.optim.lr_scheduler, PER_EPOCH[name])
            if name == "plateau":
                kwargs["mode"] = "max" if maximize else "min"
            self.scheduler = cls(optimizer, **kwargs)
            self.interval = "epoch"
        else:
            self.interval = kwargs.pop("interval", "step")
            self.scheduler = registry.import_object("scheduler", name)(optimizer, **kwargs)
        self.on_metric = isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        if self.on_metric:
            self.interval = "epoch"

    def after_step(self) -> None:
        if self.interval == "step":
            self.scheduler.step()

    def after_epoch(self, metric: Optional[float]) -> None:
        if self.interval != "epoch":
            return
        if self.on_metric:
            self.scheduler.step(metric)
        else:
            self.scheduler.step()

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)


def _warmup_cosine(warmup: int, total: int, cosine: bool, min_ratio: float):
    def lr_factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if not cosine:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return lr_factor


class EarlyStopping:
    """Stop when the best metric has not improved by more than `min_delta` for `patience` epochs (0: never)."""

    def __init__(self, patience: int, min_delta: float, maximize: bool):
        self.patience, self.min_delta, self.maximize = patience, min_delta, maximize
        self.best: Optional[float] = None
        self.bad_epochs = 0

    def update(self, value: float) -> Optional[str]:
        """Record one epoch's metric; the reason to stop, or None."""
        improved = self.best is None or (value > self.best + self.min_delta if self.maximize
                                         else value < self.best - self.min_delta)
        if improved:
            self.best, self.bad_epochs = value, 0
            return None
        self.bad_epochs += 1
        if self.patience and self.bad_epochs >= self.patience:
            return f"early stopping: no improvement for {self.bad_epochs} epochs"
        return None

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: Mapping) -> None:
        self.best, self.bad_epochs = state.get("best"), state.get("bad_epochs", 0)
