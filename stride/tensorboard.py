"""TensorBoard scalars for a run: every metrics.jsonl record also written to `run/tensorboard/` (rank 0 only).

metrics.jsonl stays the record; this is a view of it for `tensorboard --logdir WORK_DIR`, which shows every run.
Optional: the writer is imported before training starts and the event file created at the first record; without
the tensorboard package it does nothing at all (one line in the log says so).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from stride.logs import get_logger

NOT_SCALARS = frozenset({"time", "epoch", "step", "split"})
SPLITS = ("train", "val", "test")
FLUSH_EVERY_S = 30


def tag_for(key: str, split: str) -> str:
    """`val_accuracy` -> `val/val_accuracy`; a key without a split prefix (`lr`) goes under its record's split.

    The prefix wins over the record's split: the epoch-end record (split val) also carries the last train_loss,
    which belongs on the train_loss curve.
    """
    prefix = key.split("_", 1)[0]
    return f"{prefix if prefix in SPLITS else split}/{key}"


class TensorBoardLog:
    """Writes metrics records as scalars (global step = the record's step) into one run's TensorBoard folder."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self._writer: Any = None
        self._writer_class: Any = None
        self._unavailable = False

    def prepare(self) -> None:
        """Import TensorBoard's writer now, before training: the import takes ~0.2 s, which must not land in the
        middle of the first epoch. The event file itself is still created at the first record."""
        if self._writer_class is None and not self._unavailable:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._unavailable = True
                get_logger().info("tensorboard is not installed: no TensorBoard logs for this run "
                                  "(pip install 'stride[tensorboard]')")
                return
            self._writer_class = SummaryWriter

    def _open(self, first_step: int) -> Optional[Any]:
        self.prepare()
        if self._writer is None and not self._unavailable:
            # A resumed run redoes the steps after its checkpoint (and drops them from metrics.jsonl). Records fall
            # on steps fixed by the config, so this process's first record is the earlier attempt's first stale one:
            # purge_step makes TensorBoard drop the earlier events from that step on.
            try:
                self._writer = self._writer_class(str(self.log_dir), purge_step=first_step,
                                                  flush_secs=FLUSH_EVERY_S)
            except Exception as exc:
                self._give_up(exc)
        return self._writer

    def write(self, record: dict) -> None:
        writer = self._open(record["step"])
        if writer is None:
            return
        split = record.get("split", "train")
        try:
            for key, value in record.items():
                if key not in NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(tag_for(key, split), value, global_step=record["step"],
                                      walltime=record.get("time"))
            if split != "train":
                writer.flush()  # epoch and test results show up at once, not FLUSH_EVERY_S later
        except Exception as exc:  # a view of metrics.jsonl must never stop training
            self._give_up(exc)

    def close(self) -> None:
        """Flush and close the event file (at the end of fit(), a stop, or an error); safe to call twice."""
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception as exc:
                self._give_up(exc)

    def _give_up(self, exc: Exception) -> None:
        get_logger().warning("TensorBoard logging stopped (%s: %s); metrics.jsonl is unaffected", type(exc).__name__,
                             exc)
        self._unavailable = True
        self._writer = None
