"""Complete-or-absent checkpoints: step-numbered files, a `latest` pointer, background writes, safe loading.

A checkpoint is snapshotted to host memory on the training thread (cheap), then written by a background thread to a
temporary name, fsynced and renamed; only then does `latest` move. A process killed at any moment leaves `latest`
naming a whole file, and loading falls back to the previous file if the newest one is unreadable anyway.
"""
from __future__ import annotations

import re
import threading
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch

from stride.logs import get_logger
from stride.rundir import atomic_write

LATEST = "latest"
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def snapshot(state: Any) -> Any:
    """A deep copy with every tensor on the CPU, safe to write while training mutates the originals."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {key: snapshot(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(snapshot(value) for value in state)
    return state


def save_file(state: Any, path: Path) -> None:
    """torch.save through a temporary name, fsync and rename."""
    atomic_write(path, lambda handle: torch.save(state, handle), mode="wb")


def load_file(path: Path, map_location: Any = "cpu") -> Any:
    """Load tensors and plain containers only (`weights_only=True`): a checkpoint never runs code."""
    return torch.load(path, map_location=map_location, weights_only=True)


def looks_complete(path: Path) -> bool:
    """Cheap check that a file is a whole torch checkpoint: its zip central directory (written last) is readable."""
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


class Checkpointer:
    """Writes `step_<N>.pt` files into one folder, keeps the newest `keep_last`, and finds the newest good one."""

    def __init__(self, directory: Path, keep_last: int = 2, background: bool = True):
        self.directory = Path(directory)
        self.keep_last = max(1, keep_last)
        self.background = background
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def path_for(self, step: int) -> Path:
        return self.directory / f"step_{step:09d}.pt"

    def step_files(self) -> list[Path]:
        """Checkpoint files, newest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _STEP_FILE.match(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def save(self, state: dict, step: int, wait: bool = False) -> None:
        """Snapshot `state` now; write it in the background unless `wait` (or background writes are off)."""
        self.wait()
        cpu_state = snapshot(state)
        if not self.background or wait:
            self._write(cpu_state, step)
            return
        self._thread = threading.Thread(target=self._write_guarded, args=(cpu_state, step),
                                        name="stride-checkpoint", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Block until the pending write is on disk; re-raise its error here, on the training thread."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _write_guarded(self, state: dict, step: int) -> None:
        try:
            self._write(state, step)
        except BaseException as exc:  # surfaced by wait()
            self._error = exc

    def _write(self, state: dict, step: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path_for(step)
        save_file(state, path)
        atomic_write(self.directory / LATEST, lambda handle: handle.write(path.name + "\n"))
        for old in self.step_files()[self.keep_last:]:
            old.unlink(missing_ok=True)

    def remove_partial_writes(self) -> None:
        """Delete temporary files left by a writer that was killed mid-write (call only when no writer runs)."""
        if self.directory.is_dir():
            for leftover in self.directory.glob(".step_*.tmp"):
                leftover.unlink(missing_ok=True)

    def candidates(self) -> list[Path]:
        """Files to try, best first: the one `latest` names, then every other step file, newest first."""
        files = self.step_files()
        pointer = self.directory / LATEST
        if pointer.is_file():
            named = self.directory / pointer.read_text().strip()
            if named in files:
                files.remove(named)
                files.insert(0, named)
        return files

    def load_latest(self, map_location: Any = "cpu") -> Optional[tuple[dict, Path]]:
        """The newest readable checkpoint and its path, or None when the folder holds none."""
        for path in self.candidates():
            try:
                return load_file(path, map_location), path
            except Exception as exc:  # truncated, corrupt, or not a checkpoint: fall back to an older one
                get_logger().warning("checkpoint %s is unreadable (%s: %s); trying the previous one",
                                     path.name, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return None
