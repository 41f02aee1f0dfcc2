"""Validation and test metrics that reduce correctly across batches and ranks.

A metric returns *sums* for each batch (counts, totals, a confusion matrix); stride adds them over the split and
all-reduces them once, then `compute` turns the totals into the value. Never an average of per-rank averages.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch
from torch import nn

from stride.errors import ConfigError
from stride.registry import register_metric

Sums = dict[str, torch.Tensor]


class Metric:
    """One metric: `update(outputs, targets)` -> this batch's sums; `compute(totals)` -> the metric's value."""

    higher_is_better: Optional[bool] = None
    """None: decided by the name (losses and errors down, the rest up)."""

    def setup(self, num_outputs: Optional[int]) -> None:
        """Told the dataset's num_outputs before the first batch (classes for classification)."""

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> Sums:
        raise NotImplementedError

    def compute(self, totals: Mapping[str, torch.Tensor]) -> float:
        raise NotImplementedError


def _count(targets: torch.Tensor) -> torch.Tensor:
    return torch.tensor(float(targets.numel()), dtype=torch.float64, device=targets.device)


@register_metric("accuracy")
class Accuracy(Metric):
    """Share of predictions (argmax over the class dimension, dim 1) equal to the integer targets."""

    higher_is_better = True

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> Sums:
        correct = (outputs.argmax(dim=1) == targets).sum(dtype=torch.float64)
        return {"correct": correct, "count": _count(targets)}

    def compute(self, totals: Mapping[str, torch.Tensor]) -> float:
        return float(totals["correct"] / totals["count"].clamp(min=1))


@register_metric("f1_macro")
class MacroF1(Metric):
    """Macro-averaged F1 from the confusion counts of the whole split (classes with no support and no prediction
    are left out of the average)."""

    higher_is_better = True

    def __init__(self, num_classes: Optional[int] = None):
        self.num_classes = num_classes

    def setup(self, num_outputs: Optional[int]) -> None:
        self.num_classes = self.num_classes or num_outputs

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> Sums:
        classes = self.num_classes or outputs.shape[1]
        predicted = outputs.argmax(dim=1).reshape(-1)
        index = targets.reshape(-1).long() * classes + predicted
        confusion = torch.bincount(index, minlength=classes * classes).reshape(classes, classes)
        return {"confusion": confusion.to(torch.float64)}

    def compute(self, totals: Mapping[str, torch.Tensor]) -> float:
        return macro_f1(totals["confusion"])


def macro_f1(confusion: torch.Tensor) -> float:
    """Rows: true class, columns: predicted class."""
    true_positive = confusion.diagonal()
    support, predicted = confusion.sum(dim=1), confusion.sum(dim=0)
    present = (support + predicted) > 0
    f1 = 2 * true_positive / (support + predicted).clamp(min=1)
    return float(f1[present].mean()) if bool(present.any()) else 0.0


class _Elementwise(Metric):
    """Regression errors over every target element."""

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> Sums:
        error = outputs.double() - targets.double().reshape(outputs.shape)
        return {"sum": self.reduce(error), "count": _count(targets)}

    def reduce(self, error: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def compute(self, totals: Mapping[str, torch.Tensor]) -> float:
        return float(totals["sum"] / totals["count"].clamp(min=1))


@register_metric("mae")
class MeanAbsoluteError(_Elementwise):
    higher_is_better = False

    def reduce(self, error: torch.Tensor) -> torch.Tensor:
        return error.abs().sum()


@register_metric("mse")
class MeanSquaredError(_Elementwise):
    higher_is_better = False

    def reduce(self, error: torch.Tensor) -> torch.Tensor:
        return error.square().sum()


@register_metric("rmse")
class RootMeanSquaredError(MeanSquaredError):
    def compute(self, totals: Mapping[str, torch.Tensor]) -> float:
        return math.sqrt(super().compute(totals))


@register_metric("r2")
class R2(Metric):
    """Coefficient of determination per target column, averaged (scikit-learn's uniform_average)."""

    higher_is_better = True

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> Sums:
        y = targets.double().reshape(targets.shape[0], -1)
        residual = outputs.double().reshape(y.shape) - y
        return {"n": torch.tensor(float(y.shape[0]), dtype=torch.float64, device=y.device), "y": y.sum(0),
                "y2": y.square().sum(0), "residual2": residual.square().sum(0)}

    def compute(self, totals: Mapping[str, torch.Tensor]) -> float:
        n = totals["n"].clamp(min=1)
        total = totals["y2"] - totals["y"].square() / n
        return float((1 - totals["residual2"] / total.clamp(min=1e-300)).mean())


class LossMetric(Metric):
    """Any loss (a torch.nn loss class by name, or one instance) as a metric: its sum over the split divided by the
    number of target elements, i.e. its mean."""

    higher_is_better = False

    def __init__(self, criterion: nn.Module):
        self.criterion = criterion
        if hasattr(criterion, "reduction"):
            criterion.reduction = "sum"

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> Sums:
        return {"sum": self.criterion(outputs, targets).double(), "count": _count(targets)}

    def compute(self, totals: Mapping[str, torch.Tensor]) -> float:
        return float(totals["sum"] / totals["count"].clamp(min=1))


def torch_loss(name: str, kwargs: Optional[Mapping] = None) -> Optional[nn.Module]:
    """`HuberLoss` (or `huber`, `huberloss`) -> torch.nn.HuberLoss(**kwargs); None if torch.nn has no such loss."""
    wanted = name.lower().replace("_", "")
    for attr in dir(nn):
        cls = getattr(nn, attr)
        if (isinstance(cls, type) and issubclass(cls, nn.Module) and attr.endswith("Loss")
                and wanted in (attr.lower(), attr.lower()[:-4])):
            try:
                return cls(**dict(kwargs or {}))
            except TypeError as exc:
                raise ConfigError(f"loss '{name}' ({attr}) does not take {dict(kwargs or {})}: {exc}") from None
    return None


def resolve_metric(spec: Any) -> tuple[str, Metric]:
    """A metric by registered name (accuracy, f1_macro, mae, mse, rmse, r2), torch.nn loss name (L1Loss, huber) or
    import path (a Metric subclass), or {name: ..., **kwargs}; returns (its name in results, the metric)."""
    from stride import registry

    kwargs: dict = {}
    if isinstance(spec, Mapping):
        kwargs = {k: v for k, v in spec.items() if k not in ("name", "as")}
        label, spec = spec.get("as"), spec.get("name")
    else:
        label = None
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"a metric must be a name or an import path, got {spec!r}")
    if registry.is_registered("metric", spec):
        target = registry.resolve("metric", spec)
    elif ":" not in spec and (loss := torch_loss(spec, kwargs)) is not None:
        return label or spec, LossMetric(loss)
    else:
        target = registry.resolve("metric", spec)
    registry.check_kwargs("metric", spec, target, kwargs)
    metric = target(**kwargs)
    if not isinstance(metric, Metric):
        raise ConfigError(f"metric '{spec}' built a {type(metric).__name__}, not a stride.Metric (update/compute)")
    return label or spec.rpartition(":")[2].rpartition(".")[2], metric
