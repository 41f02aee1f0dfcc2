"""Plug-ins that tests/test_examples.py names by import path (tests/ is put on the ranks' PYTHONPATH): a callback that
holds the run at a step until a stop is requested, and the broken plug-ins of the bad-input tests."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from examples.charlm.task import NextCharTask
from stride import Callback
from stride.training.task import ClassificationTask


class PauseAt(Callback):
    """At the log point of `step`, wait (up to `max_wait_s`) until the run is asked to stop: a SIGTERM sent once that
    step's record is in metrics.jsonl then always lands at the next step, mid-epoch, however loaded the machine."""

    def __init__(self, step: int, max_wait_s: float = 120.0):
        self.step, self.max_wait_s = step, max_wait_s

    def on_log(self, state) -> None:
        if state.step != self.step:
            return
        deadline = time.monotonic() + self.max_wait_s
        while state.trainer.stop_reason is None and time.monotonic() < deadline:
            time.sleep(0.01)


class PerPositionLoss(NextCharTask):
    """A Task whose loss forgot its reduction: one value per character, not a scalar."""

    def loss(self, model, batch) -> torch.Tensor:
        logits, targets = self._logits(model, batch)
        return F.cross_entropy(logits, targets, reduction="none")


class NanAfter(ClassificationTask):
    """The loss becomes NaN from training micro-batch `batch` on (counted in this process, training mode only)."""

    def __init__(self, batch: int, **kwargs):
        super().__init__(**kwargs)
        self.nan_from, self.calls = batch, 0

    def loss(self, model, batch) -> torch.Tensor:
        loss = super().loss(model, batch)
        if model.training:
            self.calls += 1
            if self.calls >= self.nan_from:
                return loss * float("nan")
        return loss


class Exploding(Callback):
    """Raises at the end of its first epoch, as a buggy user hook would."""

    def on_epoch_end(self, state) -> None:
        raise KeyError("val_f1")

