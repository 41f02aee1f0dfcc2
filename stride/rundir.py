"""A run folder (`work_dir/<run>`): every path in it, atomic allocation, and atomic writes of what must not be lost.

Standard library only. A run folder is the single source of truth: config.json rebuilds the run, status.json and
metadata.json tell its story, so `stride status`, `stride resume` and a requeued job need nothing else.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

from stride.errors import ConfigError, RunError

MAX_ALLOCATION_TRIES = 10_000
LOCK_TIMEOUT_S = 60.0
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK
"""Files stride writes get the mode an ordinary `open()` would give them under this process's umask."""
# Run-folder locks this process holds, per thread, so that nested `locked()` blocks do not deadlock on flock.
_HELD: dict[tuple[int, str], int] = {}
_HELD_GUARD = threading.Lock()
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


def validate_run_name(name: str) -> str:
    """A run name is one plain folder name: no separators, no '..', nothing that leaves work_dir."""
    if not isinstance(name, str) or not _RUN_NAME.match(name) or name in (".", ".."):
        raise ConfigError(f"run name {name!r} is not allowed: use letters, digits, '.', '_', '+' or '-' "
                          f"(no '/' or '..', at most 128 characters), e.g. run=lr3e-4")
    return name


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Union[str, Path], write: Callable[[Any], None], mode: str = "w") -> None:
    """Write through `write(file)` to a temporary name beside `path`, fsync, then rename: complete or absent."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)  # mkstemp's 0600 would hide runs from collaborators sharing the work_dir
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_json(path: Union[str, Path], data: Any) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=2, default=str) + "\n"))


def read_json(path: Union[str, Path], default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return default


class RunDir:
    """One run's folder and every path inside it."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path).absolute()

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def work_dir(self) -> Path:
        return self.path.parent

    @property
    def config_file(self) -> Path:
        return self.path / "config.json"

    @property
    def metadata_file(self) -> Path:
        return self.path / "metadata.json"

    @property
    def status_file(self) -> Path:
        return self.path / "status.json"

    @property
    def results_file(self) -> Path:
        return self.path / "results.json"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def tensorboard_dir(self) -> Path:
        """TensorBoard event files (when tensorboard is installed): `tensorboard --logdir WORK_DIR` shows all runs."""
        return self.path / "tensorboard"

    @property
    def git_diff_file(self) -> Path:
        return self.path / "git.diff"

    @property
    def logs_dir(self) -> Path:
        return self.path / "logs"

    def rank_log(self, rank: int) -> Path:
        return self.logs_dir / f"rank_{rank}.log"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def weights_dir(self) -> Path:
        return self.path / "weights"

    @property
    def best_weights(self) -> Path:
        return self.weights_dir / "best.pt"

    @property
    def final_weights(self) -> Path:
        return self.weights_dir / "final.pt"

    @property
    def slurm_dir(self) -> Path:
        """submitit's job folder: sbatch script, pickles and the per-task stdout/stderr of every job."""
        return self.path / "slurm"

    @property
    def rendezvous_dir(self) -> Path:
        return self.path / "rendezvous"

    @property
    def lock_file(self) -> Path:
        return self.path / ".lock"

    def exists(self) -> bool:
        return self.config_file.is_file()

    def make_subdirs(self) -> None:
        for folder in (self.logs_dir, self.checkpoints_dir, self.weights_dir):
            folder.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def locked(self, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
        """Serialise read-modify-write of status/metadata between processes (launcher, ranks, CLI).

        Re-entrant within a process (a held lock is simply held deeper), and bounded: a lock some other process holds
        for longer than `timeout_s` is an error, not a hang.
        """
        key = (threading.get_ident(), str(self.lock_file.resolve()))
        with _HELD_GUARD:
            depth = _HELD.get(key, 0)
            if depth:
                _HELD[key] = depth + 1
        if depth:
            try:
                yield
            finally:
                with _HELD_GUARD:
                    _HELD[key] -= 1
            return
        with open(self.lock_file, "a") as handle:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise RunError(f"{self.lock_file} stayed locked for {timeout_s:.0f}s: another stride process "
                                       f"is stuck updating this run; stop it and retry") from None
                    time.sleep(0.01)
            with _HELD_GUARD:
                _HELD[key] = 1
            try:
                yield
            finally:
                with _HELD_GUARD:
                    _HELD.pop(key, None)
                fcntl.flock(handle, fcntl.LOCK_UN)

    def read_config(self) -> dict:
        config = read_json(self.config_file)
        if not isinstance(config, dict):
            raise RunError(f"{self.path} is not a stride run: it has no readable config.json")
        return config

    def write_config(self, config: dict) -> None:
        write_json(self.config_file, config)

    def read_status(self) -> dict:
        return read_json(self.status_file, {}) or {}

    def update_status(self, keep_states: Iterable[str] = (), **fields: Any) -> dict:
        """Merge `fields` into status.json; a current state listed in `keep_states` is not overwritten."""
        with self.locked():
            status = self.read_status()
            if status.get("state") in tuple(keep_states):
                fields.pop("state", None)
            status.update(fields, updated_at=now_iso())
            write_json(self.status_file, status)
        return status

    def read_metadata(self) -> dict:
        return read_json(self.metadata_file, {}) or {}

    def update_metadata(self, change: Callable[[dict], None]) -> dict:
        with self.locked():
            metadata = self.read_metadata()
            change(metadata)
            write_json(self.metadata_file, metadata)
        return metadata


def next_integer_name(work_dir: Path) -> int:
    taken = [int(p.name) for p in work_dir.iterdir() if p.name.isdigit()] if work_dir.is_dir() else []
    return max(taken, default=-1) + 1


def allocate(work_dir: Union[str, Path], run: Optional[str] = None) -> RunDir:
    """Create a new run folder atomically: `run` if given, else the next free integer.

    `os.mkdir` either creates the folder or fails, so two launches at the same moment never share one.
    """
    work_dir = Path(work_dir).absolute()
    if work_dir.exists() and not work_dir.is_dir():
        raise ConfigError(f"work_dir '{work_dir}' is a file, not a folder: choose another work_dir")
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create work_dir '{work_dir}': {exc.strerror}") from None
    if run is not None:
        validate_run_name(run)
        try:
            (work_dir / run).mkdir()
        except FileExistsError:
            raise RunError(f"run '{run}' already exists in {work_dir}: choose another run name, or continue it "
                           f"with `stride resume {work_dir / run}`") from None
        return RunDir(work_dir / run)
    candidate = next_integer_name(work_dir)
    for _ in range(MAX_ALLOCATION_TRIES):
        try:
            (work_dir / str(candidate)).mkdir()
            return RunDir(work_dir / str(candidate))
        except FileExistsError:
            candidate += 1
    raise RunError(f"could not allocate a run folder in {work_dir} after {MAX_ALLOCATION_TRIES} tries")


def find_run(target: Union[str, Path], work_dir: Optional[Union[str, Path]] = None) -> RunDir:
    """A run given as a path, or as a name inside `work_dir`."""
    if work_dir is not None:
        validate_run_name(str(target))
        path = Path(work_dir) / str(target)
    else:
        path = Path(target)
    run = RunDir(path.expanduser())
    if not run.path.is_dir():
        raise RunError(f"run '{target}' does not exist" + (f" in {work_dir}" if work_dir else "")
                       + ": check the name with `stride status WORK_DIR`")
    if not run.exists():
        raise RunError(f"{run.path} is not a stride run (no config.json): give a run folder such as WORK_DIR/0")
    return run


def list_runs(work_dir: Union[str, Path]) -> list[RunDir]:
    """Runs in a work_dir: integers in numeric order, then named runs alphabetically."""
    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        raise RunError(f"work_dir '{work_dir}' does not exist: check the path")
    runs = [RunDir(p) for p in work_dir.iterdir() if p.is_dir() and (p / "config.json").is_file()]
    return sorted(runs, key=lambda r: (not r.name.isdigit(), int(r.name) if r.name.isdigit() else 0, r.name))
