"""Logging for a run: every line carries time, hostname, rank and local rank; a file per rank, console from rank 0.

Configured by `setup_logging` when a run starts, never at import time, so importing stride changes nothing.
"""
from __future__ import annotations

import logging
import platform
import sys
import time
from pathlib import Path
from typing import Optional, TextIO

import stride

LOGGER_NAME = "stride"
FORMAT = "%(asctime)s %(hostname)s rank %(rank)d local %(local_rank)d %(levelname)s %(message)s"


class _ContextFilter(logging.Filter):
    def __init__(self, hostname: str, rank: int, local_rank: int):
        super().__init__()
        self.hostname, self.rank, self.local_rank = hostname, rank, local_rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.hostname, record.rank, record.local_rank = self.hostname, self.rank, self.local_rank
        return True


def setup_logging(log_file: Optional[Path], hostname: str, rank: int, local_rank: int, console: bool,
                  level: int = logging.INFO) -> logging.Logger:
    """Send stride's log to `log_file` (appended: a resumed run keeps one story) and, if asked, to stderr."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(level)
    logger.propagate = False
    context = _ContextFilter(hostname, rank, local_rank)
    formatter = logging.Formatter(FORMAT, datefmt="%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = []
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="a"))
    if console:
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        handler.addFilter(context)
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    # Which interpreter and which stride each rank runs: in a container run, every rank's log shows the image's.
    logger.info("python %s %s, stride %s from %s", sys.executable, platform.python_version(), stride.__version__,
                Path(stride.__file__).parent)
    from stride import placement

    logger.info("%s", placement.describe())  # what Slurm's binding left this rank, and what it uses of it
    return logger


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


class ProgressBar:
    """A one-line progress bar on an interactive terminal; silent otherwise (periodic log lines take over)."""

    def __init__(self, enabled: bool, stream: TextIO = sys.stderr, min_interval_s: float = 0.2):
        self.enabled = enabled and stream.isatty()
        self.stream, self.min_interval_s, self._last = stream, min_interval_s, 0.0

    def update(self, epoch: int, epochs: int, step_in_epoch: int, steps_per_epoch: int, loss: Optional[float]) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self._last < self.min_interval_s and step_in_epoch < steps_per_epoch):
            return
        self._last = now
        width = 30
        filled = int(width * step_in_epoch / max(1, steps_per_epoch))
        loss_text = f" loss {loss:.4f}" if loss is not None else ""
        self.stream.write(f"\repoch {epoch + 1}/{epochs} [{'#' * filled}{'.' * (width - filled)}] "
                          f"{step_in_epoch}/{steps_per_epoch}{loss_text}  ")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
