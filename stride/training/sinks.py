"""Metric sinks: where every metrics record goes. metrics.jsonl always; TensorBoard and user sinks by name.

One small interface (open / write / close, told at open which step the run resumes from, so records of redone
steps are replaced rather than duplicated), written from rank 0 only, fanned out by `Sinks`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from stride.logs import get_logger
from stride.registry import register_sink
from stride.rundir import RunDir, atomic_write


class MetricSink:
    """Receives every metrics record: {"time", "epoch", "step", "split", metric: value, ...}.

    `open(run_dir, config, resume_step)`: before the first record; records this sink holds for steps after
    `resume_step` are about to be written again (a resumed run redoes them) and must be dropped or overwritten.
    """

    def open(self, run_dir: RunDir, config: Mapping, resume_step: int) -> None:
        pass

    def write(self, record: dict) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class JsonlSink(MetricSink):
    """metrics.jsonl: one JSON line per record, the run's own record of its curves."""

    def open(self, run_dir: RunDir, config: Mapping, resume_step: int) -> None:
        self.path = run_dir.metrics_file
        forget_after(self.path, resume_step)
        self.handle = open(self.path, "a")

    def write(self, record: dict) -> None:
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()

    def close(self) -> None:
        handle = getattr(self, "handle", None)
        if handle is not None and not handle.closed:
            handle.close()


def forget_after(path: Path, step: int) -> None:
    """Drop the records after `step` (step 0: all of them) and old test lines, so the file stays one story."""
    if not path.is_file():
        return
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            dropped += 1
            continue
        if not isinstance(record, dict) or not 0 < record.get("step", 0) <= step or record.get("split") == "test":
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        atomic_write(path, lambda handle: handle.write("".join(f"{line}\n" for line in kept)))


@register_sink("tensorboard")
class TensorBoardSink(MetricSink):
    """TensorBoard scalars in RUN/tensorboard (nothing at all when the tensorboard package is missing)."""

    def open(self, run_dir: RunDir, config: Mapping, resume_step: int) -> None:
        from stride.tensorboard import TensorBoardLog

        self.log = TensorBoardLog(run_dir.tensorboard_dir)
        self.log.prepare()

    def write(self, record: dict) -> None:
        self.log.write(record)

    def close(self) -> None:
        if hasattr(self, "log"):
            self.log.close()


class Sinks:
    """Every sink in order. A user sink that fails is logged and dropped: a view of the metrics never stops
    training (metrics.jsonl, written first, is the record)."""

    def __init__(self, sinks: Sequence[MetricSink]):
        self.sinks = list(sinks)

    def open(self, run_dir: RunDir, config: Mapping, resume_step: int) -> None:
        for sink in list(self.sinks):
            self._guard(sink, "open", run_dir, config, resume_step)

    def write(self, record: dict) -> None:
        for sink in list(self.sinks):
            self._guard(sink, "write", record)

    def close(self) -> None:
        for sink in list(self.sinks):
            self._guard(sink, "close")

    def _guard(self, sink: MetricSink, method: str, *args: Any) -> None:
        if isinstance(sink, JsonlSink):
            getattr(sink, method)(*args)  # the run's own record: its errors are the run's errors
            return
        try:
            getattr(sink, method)(*args)
        except Exception as exc:
            get_logger().warning("metric sink %s.%s failed (%s: %s): it gets no more records; metrics.jsonl is "
                                 "unaffected", type(sink).__name__, method, type(exc).__name__, exc)
            self.sinks.remove(sink)


def build_sinks(config: Mapping, extra: Sequence[MetricSink] = ()) -> Sinks:
    from stride.training.hooks import build_plugin

    return Sinks([JsonlSink(), *(build_plugin("sink", spec, MetricSink) for spec in config["sinks"]), *extra])
