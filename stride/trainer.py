"""`from stride.trainer import Trainer` (the seed's module) still works; the training side lives in stride.training.

`python -m stride.trainer --config work_dir=X ...` is the seed's way of training: it is `stride local ...`.
"""
from stride.training.control import Cadence as _Cadence  # noqa: F401  (older imports)
from stride.training.data import ResumableDistributedSampler  # noqa: F401
from stride.training.trainer import Trainer, check_plugins, resolve_device  # noqa: F401

__all__ = ["Trainer", "check_plugins"]

if __name__ == "__main__":
    from stride.cli import main

    main()
