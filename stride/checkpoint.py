"""Complete-or-absent, verified checkpoints: step-numbered files, a `latest` pointer, background writes, safe loading.

A checkpoint is copied to host memory on the training thread (cheap), then written by a background thread to a
temporary name, fsynced and renamed, with its size and CRC32 in a sidecar; only then does `latest` move. A process
killed at any moment leaves `latest` naming a whole file; a file that fails its checksum or does not load is moved
aside (`.corrupt`) in favour of the previous one, and never counted again when old files are pruned.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from stride import checkpoint_files
from stride.checkpoint_files import LATEST  # noqa: F401  (re-exported)
from stride.errors import RunError
from stride.logs import get_logger
from stride.rundir import atomic_write

HISTORY_LENGTH = 100
QUIET_NICE = 19


class HostStaging:
    """Host copies of a state's tensors, in buffers kept from one checkpoint to the next.

    Fresh host memory costs a page fault per 4 KiB page on first touch, as much as the copy itself; a reused buffer
    costs one memcpy. Tensors on CUDA go to pinned buffers with `non_blocking=True` on the current stream (which
    orders them before the next optimizer step), so the training thread only enqueues them. CPU tensors named in
    `late` (weights and optimizer state, which only the next optimizer step changes) are copied on a helper thread
    while the next forward and backward run; the caller calls `ready()` before that step, and the writer before
    reading. The caller must not copy again until the previous copy was written (Checkpointer waits).
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._events: list[Any] = []
        self._copier: Optional[threading.Thread] = None
        self._copy_error: Optional[BaseException] = None
        self.state: Any = None
        """What the last `copy()` returned."""

    def copy(self, state: Any, late: frozenset = frozenset()) -> Any:
        """`late`: data pointers of CPU tensors that may be copied after this returns (until `ready()`)."""
        used: dict[tuple, torch.Tensor] = {}
        cuda_devices: set[int] = set()
        deferred: list[tuple[torch.Tensor, torch.Tensor]] = []
        out = self.state = self._copy(state, (), used, {}, cuda_devices, (late, deferred))
        self._buffers = used
        self._events = []
        for index in sorted(cuda_devices):
            with torch.cuda.device(index):
                event = torch.cuda.Event()
                event.record()
                self._events.append(event)
        if deferred:
            self._copier = threading.Thread(target=self._copy_pairs, args=(deferred,), name="stride-staging",
                                            daemon=True)
            self._copier.start()
        return out

    @property
    def pending(self) -> bool:
        """Whether a late copy may still be running (until `ready()`)."""
        return self._copier is not None

    def ready(self) -> None:
        """Block until every copy `copy()` started has landed; re-raise a failed copy's error."""
        copier = self._copier
        if copier is not None:
            copier.join()
            self._copier = None
        for event in self._events:
            event.synchronize()
        self._events = []
        if self._copy_error is not None:
            error, self._copy_error = self._copy_error, None
            raise error

    def _copy_pairs(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        try:
            for buffer, tensor in pairs:
                buffer.copy_(tensor)
        except BaseException as exc:  # re-raised by ready(), on a thread that can report it
            self._copy_error = exc

    def _copy(self, value: Any, key: tuple, used: dict, memo: dict, cuda_devices: set, later: tuple) -> Any:
        if isinstance(value, torch.Tensor):
            if id(value) not in memo:  # a tensor reachable twice (tied weights) gets one copy, as torch.save keeps it
                memo[id(value)] = self._copy_tensor(value.detach(), key, used, cuda_devices, later)
            return memo[id(value)]
        if isinstance(value, dict):
            return {k: self._copy(v, key + (k,), used, memo, cuda_devices, later) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._copy(v, key + (i,), used, memo, cuda_devices, later)
                               for i, v in enumerate(value))
        return value

    def _copy_tensor(self, tensor: torch.Tensor, key: tuple, used: dict, cuda_devices: set,
                     later: tuple) -> torch.Tensor:
        if type(tensor) is not torch.Tensor or tensor.layout != torch.strided or not tensor.is_contiguous():
            return tensor.to("cpu", copy=True)  # subclasses, sparse, strided views: a plain copy, not reused
        on_cuda = tensor.device.type == "cuda"
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=on_cuda)
        late, deferred = later
        if not on_cuda and tensor.data_ptr() in late:
            deferred.append((buffer, tensor))
        else:
            buffer.copy_(tensor, non_blocking=on_cuda)
        if on_cuda:
            cuda_devices.add(tensor.device.index)
        used[key] = buffer
        return buffer


@dataclasses.dataclass
class SaveRecord:
    """What one checkpoint cost: the training thread's stall, and the background write."""

    step: int
    started: float
    """time.perf_counter() when save() was called."""
    stall_s: float = math.nan
    """How long save() blocked its caller: waiting for the previous write, then copying to host memory."""
    written: float = math.nan
    """time.perf_counter() when the file was durable and `latest` named it."""
    write_s: float = math.nan
    """Serialise, write, fsync and rename, on the writer thread."""
    num_bytes: int = 0


_crc32_lock = threading.Lock()
_crc32_users = 0
_crc32_setting = True


@contextlib.contextmanager
def _without_crc32() -> Iterator[None]:
    """torch.save computes a CRC32 per record by default, in software at ~0.7 GB/s (slower than an NVMe disk), and
    torch.load never checks it: a flipped byte loads silently either way. stride checksums the whole file itself as
    it is written (zlib, ~4 GB/s) and checks that on load, so its own saves skip torch's. The switch is process-wide
    (torch.serialization.set_crc32_options): a count of concurrent saves restores the previous setting when the last
    one ends."""
    global _crc32_users, _crc32_setting
    with _crc32_lock:
        if _crc32_users == 0:
            _crc32_setting = torch.serialization.get_crc32_options()
            torch.serialization.set_crc32_options(False)
        _crc32_users += 1
    try:
        yield
    finally:
        with _crc32_lock:
            _crc32_users -= 1
            if _crc32_users == 0:
                torch.serialization.set_crc32_options(_crc32_setting)


def save_file(state: Any, path: Path) -> tuple[int, int]:
    """torch.save through a temporary name, fsync and rename; returns (bytes, CRC32) of what was written.

    The checksum is taken on another thread while the file is fsynced (see Crc32Writer); the tensors of `state`
    must not change until this returns (host copies, or a caller that waits).
    """
    counted: list[checkpoint_files.Crc32Writer] = []

    def write(handle: Any) -> None:
        writer = checkpoint_files.Crc32Writer(handle, stable=_storage_ranges(state))
        counted.append(writer)
        torch.save(state, writer)
        writer.start_checksum()  # atomic_write flushes and fsyncs meanwhile

    with _without_crc32():
        atomic_write(path, write, mode="wb")  # a full disk is a FileSystemError naming `path` and the OS's reason
    return counted[0].num_bytes, counted[0].crc32


def _storage_ranges(state: Any) -> list[tuple[int, int]]:
    """(address, size) of the CPU storages in `state`: the bytes torch.save writes straight from them."""
    ranges: dict[int, int] = {}

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if value.device.type == "cpu":
                storage = value.untyped_storage()
                ranges[storage.data_ptr()] = storage.nbytes()
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    visit(state)
    return list(ranges.items())


def load_file(path: Path, map_location: Any = "cpu") -> Any:
    """Load tensors and plain containers only (`weights_only=True`): a checkpoint never runs code."""
    return torch.load(path, map_location=map_location, weights_only=True)


def yield_cpu_to_training() -> None:
    """Give the calling thread (and every thread it starts) the lowest CPU priority, nice 19 (on Linux, per thread).

    On a machine whose cores training keeps busy, a background write at normal priority takes a core from the step
    for its whole CPU part, and that step runs at half speed (2 cores: 0.7 s of write, the 2-3 steps beside it ~130 %
    slower). At nice 19 the same work spreads over the time training leaves idle plus a small share: the steps beside
    it run ~5 % slower, the write takes seconds instead of a fraction of one, and should training wait for it (the
    next checkpoint, the end of the run) the cores go idle and it finishes at full speed. The total it costs training
    stays about the same (docs/benchmarks.md). An unprivileged thread may lower its priority but never raise it
    again, so this is only for threads that do nothing but background work.
    """
    if not sys.platform.startswith("linux"):
        return  # elsewhere setpriority(PRIO_PROCESS, id) would renice the whole process, training included
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), QUIET_NICE)


class BackgroundWriter:
    """Runs writes in order on one thread, so the training thread never waits for an fsync (checkpoints, status).

    Hand it host copies, never live tensors. `wait()` drains the queue and re-raises the first error on the caller's
    thread; after an error the remaining writes are skipped. `close()` ends the thread. The thread runs at the lowest
    CPU priority (`yield_cpu_to_training`), as does the checksum thread it starts.
    """

    def __init__(self, name: str = "stride-writer"):
        self.name = name
        self._queue: "queue.Queue[Optional[tuple]]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def submit(self, write: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self._raise()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        self._queue.put((write, args, kwargs))

    def busy(self) -> bool:
        """True while a submitted write has not finished."""
        return self._queue.unfinished_tasks > 0

    def wait(self) -> None:
        """Block until every submitted write is done; re-raise the first error here."""
        if self._thread is not None:
            self._queue.join()
        self._raise()

    def close(self) -> None:
        """Finish the queued writes and end the thread (re-raises a write's error)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _run(self) -> None:
        yield_cpu_to_training()
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                write, args, kwargs = item
                if self._error is None:
                    write(*args, **kwargs)
            except BaseException as exc:  # surfaced by submit(), wait() or close()
                self._error = exc
            finally:
                self._queue.task_done()


class Checkpointer:
    """Writes `step_<N>.pt` files into one folder, keeps the newest `keep_last`, and finds the newest good one.

    `history` holds a `SaveRecord` for each of the last saves: what the training thread paid, what the write took.
    """

    def __init__(self, directory: Path, keep_last: int = 2, background: bool = True):
        self.directory = Path(directory)
        self.keep_last = max(1, keep_last)
        self.background = background
        self.history: collections.deque[SaveRecord] = collections.deque(maxlen=HISTORY_LENGTH)
        self._staging = HostStaging()
        self._writer = BackgroundWriter("stride-checkpoint")

    def path_for(self, step: int) -> Path:
        return self.directory / checkpoint_files.step_file_name(step)

    def step_files(self) -> list[Path]:
        """Checkpoint files, newest first."""
        return checkpoint_files.step_files(self.directory)

    def save(self, state: dict, step: int, wait: bool = False,
             weights: Optional[tuple[Path, dict, HostStaging]] = None, late: frozenset = frozenset()) -> None:
        """Copy `state` to host memory now; write it in the background unless `wait` (or background writes are off).

        `weights=(path, extra, staging)` also writes `{"model": <the model state staging holds>, **extra}` there
        (best.pt) before the checkpoint, so a checkpoint's record of the best weights never runs ahead of the file.
        The caller must not copy into `staging` again before this write is done (`wait()`). `late` (CPU tensors'
        data pointers) may be copied while training goes on, until `staging_ready()`, which the caller must call
        before anything changes them.
        """
        record = SaveRecord(step=step, started=time.perf_counter())
        self.wait()  # the previous write holds the staging buffers until it is on disk
        host_state = self._staging.copy(state, late if self.background and not wait else frozenset())
        record.stall_s = time.perf_counter() - record.started
        self.history.append(record)
        if not self.background or wait:
            self._write(host_state, record, weights)
        else:
            self._writer.submit(self._write, host_state, record, weights)

    @property
    def copy_pending(self) -> bool:
        """Whether the last save's late copy may still be reading its tensors: call `staging_ready()` first."""
        return self._staging.pending

    def staging_ready(self) -> None:
        """Block until the last checkpoint's host copy is whole: before the next optimizer step changes weights."""
        start = time.perf_counter()
        self._staging.ready()
        if self.history:
            self.history[-1].stall_s += time.perf_counter() - start  # what the training thread paid, in all

    def wait(self) -> None:
        """Block until the pending write is on disk; re-raise its error here, on the training thread."""
        self._writer.wait()

    def close(self) -> None:
        """Finish the pending write and end the writer thread (re-raises its error)."""
        self._writer.close()

    def _write(self, state: dict, record: SaveRecord, weights: Optional[tuple[Path, dict, HostStaging]] = None) -> None:
        start = time.perf_counter()
        self._staging.ready()
        if weights is not None:
            path, extra, staging = weights
            staging.ready()
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"model": staging.state, **extra}, path)
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path_for(record.step)
        # A sidecar left from an earlier attempt at this step would not match the new file if we die mid-way.
        checkpoint_files.sidecar_for(path).unlink(missing_ok=True)
        record.num_bytes, crc32 = save_file(state, path)
        checkpoint_files.write_sidecar(path, record.num_bytes, crc32)
        atomic_write(self.directory / LATEST, lambda handle: handle.write(path.name + "\n"))
        record.written = time.perf_counter()
        record.write_s = record.written - start
        get_logger().debug("checkpoint %s: %.1f MB written in %.3f s; training paused %.1f ms", path.name,
                           record.num_bytes / 1e6, record.write_s, record.stall_s * 1e3)
        self._prune(path)

    def _prune(self, newest: Path) -> None:
        """Keep `newest` (what `latest` names) and the `keep_last - 1` files just before it. Files numbered after it
        are left from an attempt this run went back on (it resumed from an earlier file): they go too."""
        step = checkpoint_files.step_of(newest)
        older = [p for p in self.step_files() if checkpoint_files.step_of(p) < step]
        keep = {newest, *older[: self.keep_last - 1]}
        for old in self.step_files():
            if old not in keep:
                old.unlink(missing_ok=True)
                checkpoint_files.sidecar_for(old).unlink(missing_ok=True)

    def remove_partial_writes(self) -> None:
        """Delete temporary files left by a writer that was killed mid-write (call only when no writer runs)."""
        if self.directory.is_dir():
            for pattern in (".step_*.tmp", f".{LATEST}.*.tmp"):  # atomic_write's temporary names
                for leftover in self.directory.glob(pattern):
                    leftover.unlink(missing_ok=True)

    def candidates(self) -> list[Path]:
        """Files to try, best first: the one `latest` names, then every other step file, newest first."""
        return checkpoint_files.candidates(self.directory)

    def load(self, path: Path, map_location: Any = "cpu", verify: bool = True) -> dict:
        """One checkpoint, checked against its sidecar first (unless not `verify`); raises RunError naming what is
        wrong."""
        state, problem = self._try_load(path, map_location, verify)
        if problem is not None:
            raise RunError(f"checkpoint {path} is {problem}")
        return state

    def _try_load(self, path: Path, map_location: Any, verify: bool = True) -> tuple[Any, Optional[str]]:
        """(state, None), or (None, what is wrong with the file)."""
        problem = checkpoint_files.problem(path) if verify else None
        if problem is not None:
            return None, problem
        try:
            return load_file(path, map_location), None
        except Exception as exc:  # truncated, corrupt, or not a checkpoint
            return None, f"unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"

    def load_latest(self, map_location: Any = "cpu", move_aside: bool = False) -> Optional[tuple[dict, Path]]:
        """The newest good checkpoint and its path, or None when the folder holds no checkpoint at all.

        Bad files before the good one are skipped, and with `move_aside` (the run is about to write checkpoints
        again) renamed `step_N.pt.corrupt`. When files exist but none loads, raise: restarting from step 0 would
        silently throw the run away.
        """
        bad: list[tuple[Path, str]] = []
        for path in self.candidates():
            state, problem = self._try_load(path, map_location)
            if problem is not None:
                bad.append((path, problem))
                get_logger().warning("checkpoint %s is %s; trying the previous one", path.name, problem)
                continue
            for bad_path, _ in bad if move_aside else ():
                moved = checkpoint_files.move_aside(bad_path)
                get_logger().warning("moved %s aside to %s", bad_path.name, moved.name)
            return state, path
        if bad:
            problems = "; ".join(f"{path.name} is {reason}" for path, reason in bad)
            raise RunError(f"no checkpoint in {self.directory} can be loaded ({problems}): restore a good copy, or "
                           f"move the folder away to train the run again from step 0")
        return None
