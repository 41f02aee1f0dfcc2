"""stride: reproducible PyTorch training from a laptop debug run to multi-node SLURM jobs.

`from stride import Trainer` imports torch on first use only, so the CLI's non-training commands stay instant.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Trainer", "DataSplits", "register_model", "register_dataset", "StrideError", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Trainer":
        from stride.trainer import Trainer

        return Trainer
    if name == "DataSplits":
        from stride.datasets.base import DataSplits

        return DataSplits
    if name in ("register_model", "register_dataset"):
        from stride import registry

        return getattr(registry, name)
    if name == "StrideError":
        from stride.errors import StrideError

        return StrideError
    raise AttributeError(f"module 'stride' has no attribute {name!r}")
