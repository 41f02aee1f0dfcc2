"""Datasets and models by registered name or by import path, so users add their own without editing stride.

`@register_model("Name")` / `@register_dataset("name")` register a class or function; any config may instead say
`model_name=my_pkg.models:MyNet`. Resolving a built-in name imports stride's built-ins (and torch) only then.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Mapping

from stride.errors import ConfigError, did_you_mean

_REGISTRIES: dict[str, dict[str, Callable[..., Any]]] = {"model": {}, "dataset": {}}
_BUILTINS = {"model": "stride.models", "dataset": "stride.datasets"}


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


def _import_path(kind: str, path: str) -> Callable[..., Any]:
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{kind} '{path}' cannot be imported: {exc}; check the module path and that its "
                          f"package is installed or on PYTHONPATH") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{kind} '{path}': module '{module_name}' has no attribute '{attr}'"
                              f"{did_you_mean(part, [n for n in dir(obj) if not n.startswith('_')])}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{kind} '{path}' is not a class or function")
    return obj


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
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in kwargs and n not in provided]
    if missing:
        raise ConfigError(f"{kind} '{name}' needs {section}.{missing[0]}: set it, e.g. {section}.{missing[0]}=...")
