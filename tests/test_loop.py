"""The training loop's own rules: when ranks agree on a stop, and what stays off the training thread."""
from __future__ import annotations

import os
import threading

from stride import Trainer
from stride.trainer import _Cadence


def test_cadence_plans_about_target_seconds_ahead_never_past_the_next_log_point():
    cadence = _Cadence(target_s=5.0, log_every=50, step=0)
    assert cadence.next_step == 1  # the first step measures the step time
    cadence.agreed(1, elapsed_s=2.0)  # a slow 2 s step: agree again in 2 steps
    assert cadence.next_step == 3
    cadence.agreed(3, elapsed_s=20.0)  # steps got slower than the target: every step
    assert cadence.next_step == 4
    cadence.agreed(4, elapsed_s=0.001)  # fast steps: the log point (50) bounds it
    assert cadence.next_step == 50
    cadence.agreed(50, elapsed_s=46 * 0.05)  # 0.05 s steps: 100 steps ahead, capped at log_every
    assert cadence.next_step == 100
    cadence.agreed(100, elapsed_s=50 * 0.5)  # 0.5 s steps: 10 steps
    assert cadence.next_step == 110
    every_step = _Cadence(target_s=0.0, log_every=50, step=7)
    every_step.agreed(8, elapsed_s=0.001)
    assert every_step.next_step == 9


def test_epoch_ends_leave_fsyncs_to_background_threads(tmp_path, monkeypatch):
    """best.pt and status.json at each epoch end are written by the writer threads: the training thread's fsyncs
    (run start and finish) do not grow with the number of epochs."""
    real_fsync = os.fsync
    on_training_thread: list[int] = []

    def fsync(fd: int) -> None:
        if threading.current_thread() is threading.main_thread():
            on_training_thread.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    counts = {}
    for epochs in (1, 4):
        on_training_thread.clear()
        Trainer(work_dir=tmp_path, model_kwargs={"model_name": "MLP"}, training_kwargs={"epochs": epochs},
                device="cpu").fit()
        counts[epochs] = len(on_training_thread)
    assert counts[1] == counts[4], counts
    assert (tmp_path / "1" / "weights" / "best.pt").is_file()


class _Bucket:
    """What DDP hands a comm hook, as far as the hook reads it."""

    def __init__(self, tensor):
        self._tensor = tensor

    def buffer(self):
        return self._tensor


def _hook_on_rank(rank: int, store_path: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from stride.training.loop import _rank_ordered_mean_hook

    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        # Values whose float sum depends on the order they are added in: (1e8 + 1) - 1e8 == 0 in float32.
        grads = torch.tensor([1e8, 1.0, 3.0]) if rank == 0 else torch.tensor([1.0, -1e8, 5.0])
        # A gather chained with `future.then` would seldom be done on return (about 1 call in 5 here): ask 20 times.
        futures = [_rank_ordered_mean_hook(None, _Bucket(grads.clone())) for _ in range(20)]
        done_on_return = [future.done() for future in futures]
        torch.save({"done": done_on_return, "mean": futures[-1].value()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_the_deterministic_gradient_hook_finishes_on_the_training_thread(tmp_path):
    """The rank-ordered mean is complete when the hook returns: no Python callback is left to run (and be freed)
    on gloo's threads, whose entries into the interpreter can deadlock a DataLoader worker being forked."""
    import torch
    import torch.multiprocessing as mp

    mp.start_processes(_hook_on_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    expected = (torch.tensor([1e8, 1.0, 3.0]) + torch.tensor([1.0, -1e8, 5.0])) / 2
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["done"] == [True] * 20
        assert torch.equal(result["mean"], expected), result["mean"]
