"""The control plane of the loop: when the ranks next agree on stop requests, hook stops and checkpoint
deadlines, and the agreement itself (one tiny all-reduce). Kept apart so the step stays readable."""
from __future__ import annotations

import time
from typing import Sequence

import torch
import torch.distributed as dist


class Cadence:
    """The steps at which the ranks next compare stop requests and checkpoint deadlines.

    Comparing costs a host-device sync, so not every step; but at the log cadence alone a slow step could make a
    stop miss SLURM's warning (USR2 90 s before the limit). Each comparison also yields the slowest rank's seconds
    since the last one, so every rank computes the same next step: about `target_s` ahead, at least one step, and
    never past the next log point.
    """

    def __init__(self, target_s: float, log_every: int, step: int):
        self.target_s, self.log_every = target_s, log_every
        self.next_step = step + 1  # the first step measures how long steps take
        self.restart(step)

    def restart(self, step: int) -> None:
        """Count time from here (after an evaluation); the next planned step stays."""
        self.since_step, self.since_time = step, time.monotonic()

    def elapsed_s(self) -> float:
        return time.monotonic() - self.since_time

    def agreed(self, step: int, elapsed_s: float) -> None:
        """Plan the next comparison from `elapsed_s`, which must be the same number on every rank."""
        steps = step - self.since_step
        per_step_s = elapsed_s / steps if steps > 0 else 0.0
        ahead = int(self.target_s // per_step_s) if per_step_s > 0 else self.log_every
        next_log_point = (step // self.log_every + 1) * self.log_every
        self.next_step = min(step + max(1, min(self.log_every, ahead)), next_log_point)
        self.restart(step)


def agree(flags: Sequence[float], distributed: bool, device: torch.device) -> list[float]:
    """Every rank's flags combined by MAX (a stop anywhere stops everyone; the slowest clock plans the next
    agreement): one all-reduce of a few numbers."""
    if not distributed:
        return list(flags)
    tensor = torch.tensor(list(flags), dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()
