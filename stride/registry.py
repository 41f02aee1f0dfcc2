"""Plug-ins by registered name or by import path, so users add their own without editing stride: models, datasets,
tasks, metrics, callbacks and metric sinks.

`@register_model("Name")`, `@register_dataset("name")`, `@register_task(...)`, ... register a class or function; any
config may instead name `my_pkg.models:MyNet`. Resolving a built-in name imports stride's built-ins (and torch) only
then.
"""
from __future__ import annotations

import importlib
import inspect
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Mapping

from stride.config import check_value
from stride.errors import ConfigError, did_you_mean

_BUILTINS = {"model": "stride.models", "dataset": "stride.datasets", "task": "stride.training.task",
             "metric": "stride.training.metrics", "callback": "stride.training.hooks", "sink": "stride.training.sinks"}
_REGISTRIES: dict[str, dict[str, Callable[..., Any]]] = {kind: {} for kind in _BUILTINS}


def _register(kind: str, name: str | None) -> Callable[[Callable], Callable]:
    def decorate(obj: Callable) -> Callable:
        _REGISTRIES[kind][name or obj.__name__] = obj
        return obj

    return decorate


def register_model(name: str | None = None) -> Callable[[Callable], Callable]:
    """Register a model class (an nn.Module) under `name` (default: its class name)."""
    return _register("model", name)


def register_dataset(name: str | None = None) -> Callable[[Callable], Callable]:
    """Register a dataset builder returning `stride.datasets.DataSplits` under `name` (default: its name)."""
    return _register("dataset", name)


def register_task(name: str | None = None) -> Callable[[Callable], Callable]:
    """Register a stride.Task subclass (how batches become a loss and metrics) under `name`."""
    return _register("task", name)


def register_metric(name: str | None = None) -> Callable[[Callable], Callable]:
    """Register a stride.Metric subclass under `name`, usable in task_kwargs.metrics."""
    return _register("metric", name)


def register_callback(name: str | None = None) -> Callable[[Callable], Callable]:
    """Register a stride.Callback subclass under `name`, usable in the config's `callbacks` list."""
    return _register("callback", name)


def register_sink(name: str | None = None) -> Callable[[Callable], Callable]:
    """Register a stride.MetricSink subclass under `name`, usable in the config's `sinks` list."""
    return _register("sink", name)


def import_from(folder: str | Path) -> None:
    """Put the launch folder first on sys.path, as `python -m` does, so `my_pkg.models:Net` beside the config
    imports from the console script and on every rank; a folder this machine (or container) lacks is left out."""
    folder = str(Path(folder).resolve())
    if Path(folder).is_dir() and folder not in sys.path:
        sys.path.insert(0, folder)


def import_from_launch_folder(run: Any) -> None:
    """The folder a run was started in (metadata.json's `cwd`): its plug-ins resolve on every rank and in a resume
    typed anywhere, as where it was launched."""
    launched_from = run.read_metadata().get("cwd")
    if launched_from:
        import_from(launched_from)


def is_registered(kind: str, name: str) -> bool:
    if name not in _REGISTRIES[kind]:
        importlib.import_module(_BUILTINS[kind])
    return name in _REGISTRIES[kind]


def _import_path(kind: str, path: str) -> Callable[..., Any]:
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr or module_name.startswith("."):
        raise ConfigError(f"{kind} '{path}' is not an import path: write it as 'my_pkg.module:{kind.title()}Name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{kind} '{path}' cannot be imported: {exc}; check the module path and that its "
                          f"package is installed, under the folder stride was started from, or on PYTHONPATH") from None
    except Exception as exc:  # the user's module itself is broken: say where, in one line
        raise ConfigError(f"{kind} '{path}': importing module '{module_name}' raised {_one_line(exc)}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{kind} '{path}': module '{module_name}' has no attribute '{attr}'"
                              f"{did_you_mean(part, [n for n in dir(obj) if not n.startswith('_')])}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{kind} '{path}' is not a class or function")
    return obj


def import_object(label: str, path: str) -> Callable[..., Any]:
    """A class or function by import path ('pkg.module:attr'), for plug-ins that have no registry of their own;
    `label` names it in errors (e.g. 'loss', 'optimizer')."""
    return _import_path(label, path)


def call_plugin(kind: str, name: str, target: Callable[..., Any], kwargs: Mapping[str, Any],
                shown: Mapping[str, Any] | None = None) -> Any:
    """Build a plug-in; anything it raises (but a ConfigError) becomes one line naming it and its settings."""
    try:
        return target(**kwargs)
    except ConfigError:
        raise
    except Exception as exc:
        settings = dict(kwargs if shown is None else shown)
        raise ConfigError(f"{kind} '{name}' could not be built with {kind}_kwargs {settings}: {_one_line(exc)}"
                          ) from None


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"SyntaxError: {exc.msg} ({exc.filename}, line {exc.lineno})"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _declared_types(target: Callable[..., Any]) -> dict[str, Any]:
    """Parameter annotations of a function or a class's __init__ (strings resolved); {} when they cannot be read."""
    function = target.__init__ if inspect.isclass(target) else target
    try:
        return typing.get_type_hints(function)
    except Exception:  # unresolvable annotations: fall back to the defaults' types
        return {}


def resolve(kind: str, name: str) -> Callable[..., Any]:
    """The class or builder for `name`: a registered name, else `module:attr` / `module.attr`."""
    registry = _REGISTRIES[kind]
    if name not in registry:
        importlib.import_module(_BUILTINS[kind])
    if name in registry:
        return registry[name]
    if ":" in name or "." in name:
        return _import_path(kind, name)
    raise ConfigError(f"unknown {kind} '{name}'{did_you_mean(name, registry)}; registered {kind}s: "
                      f"{', '.join(sorted(registry))} (or give an import path like 'my_pkg.module:Class')")


def check_kwargs(kind: str, name: str, target: Callable[..., Any], kwargs: Mapping[str, Any],
                 provided: tuple[str, ...] = ()) -> None:
    """Refuse keyword arguments the target does not accept, naming the valid ones."""
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
             and n not in provided]
    section = f"{kind}_kwargs"
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        key = unknown[0]
        raise ConfigError(f"unknown config key '{section}.{key}' for {kind} '{name}'"
                          f"{did_you_mean(key, valid)}; valid keys: {', '.join(valid) or '(none)'}")
    problems: list[str] = []
    hints = _declared_types(target)
    for key, value in kwargs.items():
        declared = hints.get(key)
        default = params[key].default
        if declared is None and type(default) in (int, float, bool, str):
            declared = type(default)  # unannotated: a value must have the type of the default
        if declared is not None:
            check_value(f"{section}.{key}", value, declared, problems)
    if problems:
        raise ConfigError(f"{'; '.join(problems)} (for {kind} '{name}')")
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in kwargs and n not in provided]
    if missing:
        raise ConfigError(f"{kind} '{name}' needs {section}.{missing[0]}: set it, e.g. {section}.{missing[0]}=...")
