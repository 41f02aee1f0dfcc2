"""Callbacks: user code at log points and epoch ends that sees the metrics and may end the run.

They run on rank 0 only; a stop they ask for is rank 0's decision, which every rank follows at the next point
where the ranks agree (the epoch end, or within a few seconds at a log point). Named in the config's `callbacks`
list by import path, so they reach every rank of every launcher; objects may also be handed to Trainer directly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from stride.errors import ConfigError, RunError

StopRequest = Union[None, bool, str]


@dataclass
class FitState:
    """What a callback sees: where the run is and what it measured. `epoch` is the epoch's number, counted from 1
    as everywhere stride shows epochs (logs, status, metrics.jsonl, results.json)."""

    run_dir: Path
    config: dict
    epoch: int
    step: int
    total_steps: int
    metrics: dict = field(default_factory=dict)
    best: Optional[dict] = None
    trainer: Any = None


class Callback:
    """Override any of these; return a reason (or True) from on_log/on_epoch_end to end the run there. The run
    then finishes as usual (final weights, test with the best weights) and records who stopped it."""

    def on_fit_start(self, state: FitState) -> None:
        pass

    def on_log(self, state: FitState) -> StopRequest:
        """At every log point (every training_kwargs.log_every_steps steps); state.metrics holds train_loss, lr."""
        return None

    def on_epoch_end(self, state: FitState) -> StopRequest:
        """After validation; state.metrics holds the val_* metrics (and train_loss)."""
        return None

    def on_fit_end(self, state: FitState, results: dict) -> None:
        pass


def build_plugin(kind: str, spec: Any, base: type) -> Any:
    """One `callbacks`/`sinks` item: 'pkg.module:Class', a registered name, or {name: ..., **kwargs}."""
    from stride import registry

    kwargs: dict = {}
    if isinstance(spec, Mapping):
        kwargs = {k: v for k, v in spec.items() if k != "name"}
        spec = spec.get("name")
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"a {kind} must be an import path 'pkg.module:Class' or {{name: PATH, ...}}, got {spec!r}")
    target = registry.resolve(kind, spec)
    registry.check_kwargs(kind, spec, target, kwargs)
    built = registry.call_plugin(kind, spec, target, kwargs)
    if not isinstance(built, base):
        raise ConfigError(f"{kind} '{spec}' built a {type(built).__name__}, not a stride.{base.__name__}")
    return built


def build_callbacks(config: Mapping, extra: Sequence[Callback] = ()) -> list[Callback]:
    return [*(build_plugin("callback", spec, Callback) for spec in config["callbacks"]), *extra]


def _name(callback: Callback) -> str:
    return type(callback).__name__


class Callbacks:
    """Calls every callback in order; the first stop request wins. A callback that raises fails the run, named."""

    def __init__(self, callbacks: Sequence[Callback]):
        self.callbacks = list(callbacks)

    def _call(self, method: str, state: FitState, *args: Any) -> Optional[str]:
        reason = None
        for callback in self.callbacks:
            try:
                answer = getattr(callback, method)(state, *args)
            except Exception as exc:
                raise RunError(f"callback {_name(callback)}.{method} raised at epoch {state.epoch} step "
                               f"{state.step}: {type(exc).__name__}: {exc}") from exc
            if answer and reason is None:
                reason = answer if isinstance(answer, str) else f"stopped by callback {_name(callback)}"
        return reason

    def fit_start(self, state: FitState) -> None:
        self._call("on_fit_start", state)

    def log(self, state: FitState) -> Optional[str]:
        return self._call("on_log", state)

    def epoch_end(self, state: FitState) -> Optional[str]:
        return self._call("on_epoch_end", state)

    def fit_end(self, state: FitState, results: dict) -> None:
        self._call("on_fit_end", state, results)
