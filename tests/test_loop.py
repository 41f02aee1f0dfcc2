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
