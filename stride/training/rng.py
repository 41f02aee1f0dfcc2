"""Every random stream a run draws from (Python, NumPy, torch CPU and CUDA): seed, capture and restore them.

A checkpoint stores each rank's states so a resumed run draws exactly what an uninterrupted one would.
"""
from __future__ import annotations

import random
import signal
from typing import Any, Mapping

import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def rng_state() -> dict:
    state = {"python": list(_to_plain(random.getstate())), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {"keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached": float(cached)}
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _to_plain(value: Any) -> Any:
    return [_to_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def set_rng_state(state: Mapping) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np_state = state["numpy"]
        np.random.set_state(("MT19937", np_state["keys"].numpy().astype("uint32"), np_state["pos"],
                             np_state["has_gauss"], np_state["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_worker(worker_id: int) -> None:
    """DataLoader workers draw their seeds from torch's per-worker seed, so numpy/random agree with it.

    They also ignore the stop signals: SLURM signals every process of a job step (USR2 before the time limit, TERM
    on scancel), and a worker killed by it would crash the rank that is busy writing its checkpoint. The rank
    decides when to stop and shuts its workers down itself.
    """
    for signum in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass
