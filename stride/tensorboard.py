"""TensorBoard scalars for a run: every metrics.jsonl record also written to `run/tensorboard/` (rank 0 only).

metrics.jsonl stays the record; this is a view of it for `tensorboard --logdir WORK_DIR`, which shows every run.
Optional and lazy: nothing is imported or created before the first record, and without the tensorboard package
it does nothing at all (one line in the log says so).
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
        self._unavailable = False

    def _open(self, first_step: int) -> Optional[Any]:
        if self._writer is None and not self._unavailable:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._unavailable = True
                get_logger().info("tensorboard is not installed: no TensorBoard logs for this run "
                                  "(pip install 'stride[tensorboard]')")
                return None
            # A resumed run redoes the steps after its checkpoint (and drops them from metrics.jsonl); purge_step
            # makes TensorBoard drop the earlier attempt's events from the first step this process writes.
            self._writer = SummaryWriter(str(self.log_dir), purge_step=first_step, flush_secs=FLUSH_EVERY_S)
        return self._writer

    def write(self, record: dict) -> None:
        writer = self._open(record["step"])
        if writer is None:
            return
        split = record.get("split", "train")
        for key, value in record.items():
            if key not in NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(tag_for(key, split), value, global_step=record["step"], walltime=record.get("time"))
        if split != "train":
            writer.flush()  # epoch and test results show up at once, not FLUSH_EVERY_S later

    def close(self) -> None:
        """Flush and close the event file (at the end of fit(), a stop, or an error); safe to call twice."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
