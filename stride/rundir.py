"""A run folder (`work_dir/<run>`): every path in it, atomic allocation, and atomic writes of what must not be lost.

Standard library only. A run folder is the single source of truth: config.json rebuilds the run, status.json and
metadata.json tell its story, so `stride status`, `stride resume` and a requeued job need nothing else.
"""
from __future__ import annotations

import atexit
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

from stride import runstate
from stride.errors import ConfigError, RunError, os_error, os_error_in

MAX_ALLOCATION_TRIES = 10_000
LOCK_TIMEOUT_S = 60.0
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK
"""Files stride writes get the mode an ordinary `open()` would give them under this process's umask..."""
PRIVATE_FILE_MODE = 0o600
"""... except those that can hold secrets (config.json, metadata.json, git.diff, rendezvous files): the user's only."""
PRIVATE_DIR_MODE = 0o700
"""Run folders, their rendezvous folder and a sweep's shared folder (its git.diff, submitit's scripts)."""
# Run-folder locks this process holds, per thread, so that nested `locked()` blocks do not deadlock on flock.
_HELD: dict[tuple[int, str], int] = {}
_HELD_GUARD = threading.Lock()
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}\Z")  # \Z: `$` also matches before a final \n


def validate_run_name(name: str) -> str:
    """A run name is one plain folder name: no separators, no '..', nothing that leaves work_dir."""
    if not isinstance(name, str) or not _RUN_NAME.fullmatch(name) or name in (".", ".."):
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


def make_private_dir(path: Union[str, Path]) -> Path:
    """Create `path` (and its parents) if needed; `path` itself ends up 0700, whoever created it and whatever umask."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    os.chmod(path, PRIVATE_DIR_MODE)
    return path


def atomic_write(path: Union[str, Path], write: Callable[[Any], None], mode: str = "w", private: bool = False) -> None:
    """Write through `write(file)` to a temporary name beside `path`, fsync, then rename: complete or absent.

    `private`: the file is 0600 (it can hold secrets); otherwise it gets the umask's mode. A write the OS refuses (a
    full disk, no permission, a read-only mount) is a FileSystemError naming `path` and the OS's reason, also when
    the writer reported it as something else (torch.save: "unexpected pos N vs M", the ENOSPC only chained).
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise os_error(exc, "write", path) from None
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE if private else FILE_MODE)  # else the umask's mode, not mkstemp's 0600
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        cause = os_error_in(exc) if isinstance(exc, Exception) else None
        if cause is None:
            raise
        raise os_error(cause, "write", path) from exc
    fsync_dir(path.parent)


def write_json(path: Union[str, Path], data: Any, private: bool = False) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=2, default=str) + "\n"), private=private)


def read_json_object(path: Union[str, Path], fix: str) -> Optional[dict]:
    """A JSON object stride keeps in a run folder, or None when the file is absent.

    Anything else (unreadable, not UTF-8, not JSON, cut short, a list or a string where an object belongs, as a hand
    edit can leave it) is a RunError naming the file, what is wrong, and `fix`: read silently as empty, it would be
    overwritten with a fresh object and its history lost.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise RunError(f"{path} is not UTF-8 text: {fix}") from None
    except OSError as exc:
        raise os_error(exc, "read", path) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        cut = exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated")
        raise RunError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno}"
                       f"{'; cut short?' if cut else ''}): {fix}") from None
    if not isinstance(data, dict):
        kind = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean",
                type(None): "null"}.get(type(data), type(data).__name__)
        raise RunError(f"{path} holds {kind} where stride keeps a JSON object ({{...}}): {fix}")
    return data


STATUS_FIX = "restore it, or delete it (the run's next start writes a new one)"
METADATA_FIX = "restore it from a copy, or delete it (its record of attempts, resumes and jobs is then lost)"
CONFIG_FIX = "restore it from a copy: the run cannot be rebuilt without it"


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
    def placement_dir(self) -> Path:
        """What each rank of the latest attempt got: host, CPUs, threads, workers, GPUs (stride.placement.record)."""
        return self.path / "placement"

    def placement_file(self, rank: int) -> Path:
        return self.placement_dir / f"rank_{rank}.json"

    @property
    def lock_file(self) -> Path:
        return self.path / ".lock"

    @property
    def claims_dir(self) -> Path:
        """Who trains the run right now: one claim file per holder (stride.claim), the highest number wins."""
        return self.path / "claims"

    def exists(self) -> bool:
        try:
            return self.config_file.is_file()
        except OSError:  # a folder this process may not look into: find_run and list_runs say why
            return False

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
        config = read_json_object(self.config_file, CONFIG_FIX)
        if config is None:
            raise RunError(f"{self.path} is not a stride run: it has no config.json")
        return config

    def write_config(self, config: dict) -> None:
        write_json(self.config_file, config, private=True)

    def read_status(self) -> dict:
        return read_json_object(self.status_file, STATUS_FIX) or {}

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
        return read_json_object(self.metadata_file, METADATA_FIX) or {}

    def update_metadata(self, change: Callable[[dict], None]) -> dict:
        with self.locked():
            metadata = self.read_metadata()
            change(metadata)
            write_json(self.metadata_file, metadata, private=True)
        return metadata


def next_integer_name(work_dir: Path) -> int:
    try:
        taken = [int(p.name) for p in work_dir.iterdir() if p.name.isdigit()] if work_dir.is_dir() else []
    except OSError as exc:
        raise os_error(exc, "list work_dir", work_dir) from None
    return max(taken, default=-1) + 1


# Run folders this process allocated: it must not leave them pending or running when it exits (see below).
_ALLOCATED: list[RunDir] = []
UNFINISHED_STATES = ("pending", "running")


@atexit.register
def _leave_none_unfinished() -> None:
    """A process exiting leaves the runs it created in a final state, unless another process has them (a SLURM job it
    submitted, a live process that recorded its pid). This covers the moments its launcher's own finaliser cannot: a
    Ctrl-C between the folder's creation and the launch, the later points of an interrupted sweep, a crash of a
    training that ran in this process without a launcher."""
    for run in _ALLOCATED:
        try:
            with run.locked(timeout_s=5.0):
                status = run.read_status()
                state = status.get("state")
                if (state not in UNFINISHED_STATES or status.get("launcher") == "slurm" or status.get("job_id")
                        or (run.path / "SUBMITTING").exists()):
                    continue
                pid = status.get("pid")
                if pid and pid != os.getpid() and _pid_exists(pid):
                    continue
                if state == "pending":
                    runstate.move(run, "stopped",
                                  stop_reason=f"its process (pid {os.getpid()}) ended before training started")
                else:
                    runstate.move(run, "failed", error=f"its process (pid {os.getpid()}) ended while it was "
                                                        f"running, without recording how")
        except Exception:  # at exit, with the run folder perhaps gone or unwritable: nothing more can be done
            pass


def _pid_exists(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError, OverflowError):
        return False
    except PermissionError:
        return True
    return int(pid) > 0


def allocate(work_dir: Union[str, Path], run: Optional[str] = None) -> RunDir:
    """Create a new run folder atomically: `run` if given, else the next free integer.

    `os.mkdir` either creates the folder or fails, so two launches at the same moment never share one. The process
    that created it leaves it in a final state when it exits (`_leave_none_unfinished`).
    """
    work_dir = Path(work_dir).absolute()
    if work_dir.exists() and not work_dir.is_dir():
        raise ConfigError(f"work_dir '{work_dir}' is a file, not a folder: choose another work_dir")
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(exc, "create work_dir", work_dir) from None
    if run is not None:
        validate_run_name(run)
        try:
            (work_dir / run).mkdir()
        except FileExistsError:
            raise RunError(f"run '{run}' already exists in {work_dir}: choose another run name, or continue it "
                           f"with `stride resume {work_dir / run}`") from None
        except OSError as exc:
            raise os_error(exc, "create a run folder in", work_dir) from None
        _ALLOCATED.append(RunDir(work_dir / run))
        return _ALLOCATED[-1]
    candidate = next_integer_name(work_dir)
    for _ in range(MAX_ALLOCATION_TRIES):
        try:
            (work_dir / str(candidate)).mkdir()
            _ALLOCATED.append(RunDir(work_dir / str(candidate)))
            return _ALLOCATED[-1]
        except FileExistsError:
            candidate += 1
        except OSError as exc:
            raise os_error(exc, "create a run folder in", work_dir) from None
    raise RunError(f"could not allocate a run folder in {work_dir} after {MAX_ALLOCATION_TRIES} tries")


def find_run(target: Union[str, Path], work_dir: Optional[Union[str, Path]] = None) -> RunDir:
    """A run given as a path, or as a name inside `work_dir`."""
    if work_dir is not None:
        validate_run_name(str(target))
        path = Path(work_dir) / str(target)
    else:
        path = Path(target)
    run = RunDir(path.expanduser())
    try:
        os.stat(run.config_file)
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError as exc:
        raise os_error(exc, "read run", run.path) from None
    if not run.path.is_dir():
        raise RunError(f"run '{target}' does not exist" + (f" in {work_dir}" if work_dir else "")
                       + ": check the name with `stride status WORK_DIR`")
    if not run.exists():
        raise RunError(f"{run.path} is not a stride run (no config.json): give a run folder such as WORK_DIR/0")
    from stride.trust import warn_if_foreign

    warn_if_foreign("run folder", run.path, run.config_file)
    warn_if_foreign("work_dir", run.work_dir)
    return run


def _is_run_folder(path: Path) -> bool:
    try:
        if not path.is_dir():
            return False
    except OSError:
        return False
    try:
        return (path / "config.json").is_file()
    except OSError:  # no permission to look inside: a run folder stride cannot read
        return True


def list_runs(work_dir: Union[str, Path]) -> list[RunDir]:
    """Runs in a work_dir: integers in numeric order, then named runs alphabetically."""
    work_dir = Path(work_dir)
    try:
        entries = list(work_dir.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        raise RunError(f"work_dir '{work_dir}' does not exist: check the path") from None
    except OSError as exc:
        raise os_error(exc, "list work_dir", work_dir) from None
    # A run folder this process cannot look into is still listed (`stride status` shows it as broken).
    runs = [RunDir(p) for p in entries if _is_run_folder(p)]
    return sorted(runs, key=lambda r: (not r.name.isdigit(), int(r.name) if r.name.isdigit() else 0, r.name))
