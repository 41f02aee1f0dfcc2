"""Tasks: how a batch becomes a training loss, which metrics validation and test measure, and which one picks
the best weights.

The loop never looks inside a batch: it moves it to the device and hands it to the task. Built in:
`classification` and `regression` (a loss and metrics by name, any torch.nn loss), `auto` (the dataset's own task)
and `model_loss` (the model returns its loss). Anything else is a `Task` subclass named by import path.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import nn

from stride.datasets import DataSplits
from stride.errors import ConfigError
from stride.registry import register_task
from stride.training.metrics import LossMetric, Metric, Sums, resolve_metric, torch_loss


class Task:
    """How batches become a loss and metrics. Subclass it and name it in `task_kwargs.task_name`; the rest of
    `task_kwargs` are its constructor's keyword arguments. Every method runs on every rank, under autocast when
    the run uses bf16/fp16.

    - `loss(model, batch)`: a scalar tensor to minimise (keep it on the device: no `.item()`).
    - `eval_sums(model, batch)`: this batch's sums ({name: tensor}); stride adds them over the split and ranks.
    - `compute(totals)`: the metrics ({name: float}, without the split prefix) from the totals.
    - `best_metric`: the validation metric that picks the best weights, e.g. "val_loss".
    """

    best_metric: str = "val_loss"

    def setup(self, data: Optional[DataSplits]) -> None:
        """Called once the data is known (None when a model is loaded without data, for inference)."""

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def eval_sums(self, model: nn.Module, batch: Any) -> Sums:
        raise NotImplementedError

    def compute(self, totals: Mapping[str, torch.Tensor]) -> dict[str, float]:
        raise NotImplementedError

    def predict(self, model: nn.Module, batch: Any) -> Any:
        """The model's output for a batch of inputs (by default, the batch is the model's input)."""
        return call_model(model, batch)

    def higher_is_better(self, metric: str) -> Optional[bool]:
        """Which way `metric` improves; None: by its name (losses and errors down, the rest up)."""
        return None

    def check(self, model: nn.Module, batch: Any) -> None:
        """One batch before the run folder exists: raise ConfigError when the model and the data do not fit."""
        loss = self.loss(model, batch)
        if not torch.is_tensor(loss) or loss.dim() != 0:
            raise ConfigError(f"task {type(self).__name__}.loss returned {describe(loss)}, not a scalar tensor")


def call_model(model: nn.Module, inputs: Any) -> Any:
    """A dict becomes keyword arguments, a tuple or list positional ones, anything else the one argument."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def describe(value: Any) -> str:
    if torch.is_tensor(value):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


@register_task("auto")
@register_task("supervised")
class SupervisedTask(Task):
    """Inputs and targets: a criterion for the loss plus metrics, each by name.

    A batch is `(inputs..., targets)` (the model gets every element but the last) or a dict (the model gets the
    `inputs` keys, default all but `targets`, as keyword arguments).
    """

    kind: Optional[str] = None  # classification or regression; None: the dataset's task

    def __init__(self, loss: str = "auto", loss_kwargs: Optional[dict] = None, metrics: Optional[list] = None,
                 targets: str = "targets", inputs: Optional[list] = None):
        self.loss_name, self.loss_kwargs = loss, dict(loss_kwargs or {})
        self.metric_specs, self.targets_key, self.inputs_keys = metrics, targets, inputs
        self.criterion: Optional[nn.Module] = None
        self.metrics: dict[str, Metric] = {}
        self.num_outputs: Optional[int] = None

    @property
    def best_metric(self) -> str:  # type: ignore[override]
        return "val_accuracy" if self.kind == "classification" and "accuracy" in self.metrics else "val_loss"

    def setup(self, data: Optional[DataSplits]) -> None:
        task, num_outputs = (data.task, data.num_outputs) if data is not None else (None, None)
        self.kind = self.kind or task or "regression"
        self.num_outputs = num_outputs
        self.criterion = self._criterion()
        specs = self.metric_specs if self.metric_specs is not None else (
            ["accuracy"] if self.kind == "classification" else [])
        self.metrics = {"loss": LossMetric(self._criterion())}
        for spec in specs:
            name, metric = resolve_metric(spec)
            metric.setup(num_outputs)
            self.metrics[name] = metric

    def _criterion(self) -> nn.Module:
        name = self.loss_name
        if name == "auto":
            name = "CrossEntropyLoss" if self.kind == "classification" else "MSELoss"
        criterion = torch_loss(name, self.loss_kwargs)
        if criterion is None:
            from stride import registry

            target = registry.import_object("loss", name) if ":" in name else None
            if target is None:
                raise ConfigError(f"task_kwargs.loss '{name}' is neither a torch.nn loss (e.g. CrossEntropyLoss, "
                                  f"L1Loss, HuberLoss) nor an import path 'pkg.module:MyLoss'")
            criterion = target(**self.loss_kwargs)
        return criterion

    def split(self, batch: Any) -> tuple[Any, torch.Tensor]:
        """(the model's inputs, the targets)."""
        kind = type(batch)
        if (kind is list or kind is tuple) and len(batch) == 2:  # the usual (inputs, targets): no Mapping check
            return batch[0], batch[1]
        if isinstance(batch, Mapping):
            if self.targets_key not in batch:
                raise ConfigError(f"a batch is a dict with keys {sorted(batch)} but no '{self.targets_key}': set "
                                  f"task_kwargs.targets to the key of the targets")
            keys = self.inputs_keys or [k for k in batch if k != self.targets_key]
            return {k: batch[k] for k in keys}, batch[self.targets_key]
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            inputs = batch[0] if len(batch) == 2 else tuple(batch[:-1])
            return inputs, batch[-1]
        raise ConfigError(f"a batch is {describe(batch)}: the {self.kind} task needs (inputs, targets) or a dict "
                          f"with '{self.targets_key}'; write a stride.Task for other batches")

    def _outputs(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        # Every training step comes through here: plain type checks first (a tensor is neither a Mapping nor a
        # tuple), and no .float() call where the tensor is float32 already (it would return the same tensor).
        inputs, targets = self.split(batch)
        if isinstance(inputs, torch.Tensor):
            outputs = model(inputs)
        else:
            outputs = call_model(model, inputs) if isinstance(inputs, (Mapping, tuple)) else model(inputs)
        if not isinstance(outputs, torch.Tensor):
            raise ConfigError(f"the model returned {describe(outputs)}; the {self.kind} task needs a tensor "
                              f"(use task_name=model_loss for a model that returns its own loss)")
        if outputs.dtype is not torch.float32:
            outputs = outputs.float()
        if targets.dtype is not torch.float32 and targets.is_floating_point():
            targets = targets.float()
        return outputs, targets

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        outputs, targets = self._outputs(model, batch)
        return self.criterion(outputs, targets)

    def eval_sums(self, model: nn.Module, batch: Any) -> Sums:
        outputs, targets = self._outputs(model, batch)
        return {f"{name}.{key}": value for name, metric in self.metrics.items()
                for key, value in metric.update(outputs, targets).items()}

    def compute(self, totals: Mapping[str, torch.Tensor]) -> dict[str, float]:
        return {name: metric.compute({key.partition(".")[2]: value for key, value in totals.items()
                                      if key.partition(".")[0] == name})
                for name, metric in self.metrics.items()}

    def predict(self, model: nn.Module, batch: Any) -> Any:
        # The model is called as in training (_outputs): a dict as keywords, a tuple of inputs as positional ones.
        return call_model(model, batch) if isinstance(batch, (Mapping, tuple)) else model(batch)

    def higher_is_better(self, metric: str) -> Optional[bool]:
        name = metric.split("_", 1)[1] if metric.split("_", 1)[0] in ("val", "test", "train") else metric
        found = self.metrics.get(name)
        return found.higher_is_better if found is not None else None

    def check(self, model: nn.Module, batch: Any) -> None:
        outputs, targets = self._outputs(model, batch)
        loss_name = type(self.criterion).__name__
        if isinstance(self.criterion, (nn.CrossEntropyLoss, nn.NLLLoss)) and not targets.is_floating_point():
            if outputs.dim() < 2 or outputs.shape[0] != targets.shape[0] or outputs.shape[2:] != targets.shape[1:]:
                raise ConfigError(f"the model's output has shape {tuple(outputs.shape)} but the targets "
                                  f"{tuple(targets.shape)}: {loss_name} needs outputs (N, classes, ...) for targets "
                                  f"(N, ...)")
            classes = outputs.shape[1]
            low, high = int(targets.min()), int(targets.max())
            if low < 0 or high >= classes:
                raise ConfigError(f"class labels range from {low} to {high} but the model has {classes} outputs: "
                                  f"labels must lie in [0, {classes - 1}] (check the dataset's num_outputs)")
        elif isinstance(self.criterion, nn.CrossEntropyLoss):  # float targets: class probabilities
            if outputs.shape != targets.shape or outputs.dim() < 2 or outputs.shape[1] < 2 or bool(
                    (targets < 0).any()) or not torch.allclose(targets.sum(dim=1), torch.ones(())):
                raise ConfigError(f"{loss_name} got float targets of shape {tuple(targets.shape)} for outputs "
                                  f"{tuple(outputs.shape)}: give integer class labels, or class probabilities of "
                                  f"the outputs' shape (rows summing to 1); is this a regression dataset?")
        elif isinstance(self.criterion, nn.modules.loss._Loss) and outputs.shape != targets.shape:
            raise ConfigError(f"the model's output has shape {tuple(outputs.shape)} but the targets "
                              f"{tuple(targets.shape)}: {loss_name} would broadcast them and train on the wrong "
                              f"pairs; make the model return the targets' shape")
        loss = self.criterion(outputs, targets)
        if loss.dim() != 0:
            raise ConfigError(f"the loss {loss_name} returned a tensor of shape {tuple(loss.shape)}, not a scalar: "
                              f"give it reduction=mean (task_kwargs.loss_kwargs.reduction=mean)")


@register_task("classification")
class ClassificationTask(SupervisedTask):
    """Cross-entropy by default, accuracy; the best weights by val_accuracy."""

    kind = "classification"


@register_task("regression")
class RegressionTask(SupervisedTask):
    """Mean squared error by default; the best weights by val_loss."""

    kind = "regression"


@register_task("model_loss")
class ModelLossTask(Task):
    """The model computes its own loss: `model(**batch)` for a dict batch (`model(*batch)` for a tuple) returns a
    scalar tensor, a dict with "loss" (its other scalars become metrics too) or an object with `.loss`."""

    def _losses(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        output = call_model(model, batch)
        if isinstance(output, Mapping):
            values = {k: v for k, v in output.items() if torch.is_tensor(v) and v.dim() == 0}
        elif torch.is_tensor(output):
            values = {"loss": output}
        else:
            values = {"loss": getattr(output, "loss", None)}
        if not torch.is_tensor(values.get("loss")) or values["loss"].dim() != 0:
            raise ConfigError(f"task model_loss: the model returned {describe(output)}, with no scalar 'loss'; "
                              f"return a scalar tensor or a dict with 'loss'")
        return values

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self._losses(model, batch)["loss"].float()

    def eval_sums(self, model: nn.Module, batch: Any) -> Sums:
        from stride.training.data import batch_size_of

        size = float(batch_size_of(batch))
        sums = {name: value.double() * size for name, value in self._losses(model, batch).items()}
        sums["count"] = torch.tensor(size, dtype=torch.float64, device=sums["loss"].device)
        return sums

    def compute(self, totals: Mapping[str, torch.Tensor]) -> dict[str, float]:
        count = totals["count"].clamp(min=1)
        return {name: float(value / count) for name, value in totals.items() if name != "count"}


def build_task(config: Mapping, data: Optional[DataSplits]) -> Task:
    """The run's task from task_kwargs, set up for its data."""
    from stride import registry

    kwargs = dict(config["task_kwargs"])
    name = kwargs.pop("task_name", "auto")
    target = registry.resolve("task", name)
    task = registry.call_plugin("task", name, target, kwargs)
    if not isinstance(task, Task):
        raise ConfigError(f"task '{name}' built a {type(task).__name__}, not a stride.Task")
    task.setup(data)
    return task
