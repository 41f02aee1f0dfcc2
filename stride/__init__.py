"""stride: reproducible PyTorch training from a laptop debug run to multi-node SLURM jobs.

`from stride import Trainer` imports torch on first use only, so the CLI's non-training commands stay instant.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Trainer", "DataSplits", "Task", "Metric", "Callback", "FitState", "MetricSink", "register_model",
           "register_dataset", "register_task", "register_metric", "register_callback", "register_sink",
           "StrideError", "__version__"]

_HOMES = {"Trainer": "stride.training.trainer", "DataSplits": "stride.datasets.base", "Task": "stride.training.task",
          "Metric": "stride.training.metrics", "Callback": "stride.training.hooks", "FitState": "stride.training.hooks",
          "MetricSink": "stride.training.sinks", "StrideError": "stride.errors"}


def __getattr__(name: str) -> Any:
    import importlib

    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    if name.startswith("register_"):
        from stride import registry

        if hasattr(registry, name):
            return getattr(registry, name)
    raise AttributeError(f"module 'stride' has no attribute {name!r}")
