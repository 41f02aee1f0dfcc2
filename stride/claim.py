"""One writer per run: an exclusive claim in the run folder, held for a whole attempt, seen at once on any host.

Standard library only. A claim is a small JSON file (`claims/<N>.json`: host, pids, job, attempt, start time) that
appears complete or not at all: it is written under a temporary name and `link()`ed into place, which fails when the
name exists, atomically even on NFS (where O_EXCL and fcntl locks are not reliable between hosts). The holder's
background thread touches it every HEARTBEAT_S. The claim with the highest N is the run's; a second starter refuses
with one line naming the holder. A holder that is provably dead (this host: its processes are gone; another host: no
heartbeat for STALE_AFTER_S) is taken over by claiming N+1, which only one starter can win, and the takeover is
recorded in metadata.json. What must not happen here: training, or reading status.json to decide anything.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Optional, Sequence

from stride.errors import RunError
from stride.rundir import FILE_MODE, RunDir, fsync_dir, now_iso

HEARTBEAT_S = 5.0
STALE_AFTER_S = 120.0
"""A claim from another host whose file was not touched for this long is dead (its holder stopped, or its node)."""
RESUME_WAIT_S = 120.0
"""How long a SLURM attempt waits for the `stride resume` that submitted it to let go of the claim."""
POLL_S = 0.2
MAX_TRIES = 100
TRAIN, RESUME = "train", "resume"
"""What a holder is doing: training an attempt, or a `stride resume` preparing one (it submits, or launches here)."""

# Claims this process holds, by run folder: a `stride resume` claims before it writes, then its launcher claims the
# same run again; the second claim is the first one held deeper.
_HELD: dict[str, "Claim"] = {}
_HELD_GUARD = threading.Lock()


class ClaimRefused(RunError):
    """Another live process holds the run."""


@contextlib.contextmanager
def deferred_signals(signums: Sequence[int] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """SIGINT/SIGTERM arriving inside the block are handled right after it, so a Ctrl-C cannot leave a claim or a
    final state half-made. (Masking the main thread is not enough: CPython runs a handler in the main thread whichever
    thread the kernel gave the signal to.) Outside the main thread, where handlers cannot be set, a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {signum: signal.getsignal(signum) for signum in signums}
    for signum in signums:
        signal.signal(signum, lambda number, frame: pending.append(number))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        for signum in pending:
            signal.raise_signal(signum)


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return None


def _boot_id() -> Optional[str]:
    return _read_text("/proc/sys/kernel/random/boot_id")


def _pid_namespace() -> Optional[str]:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _start_ticks(pid: int) -> Optional[int]:
    """The process's start time since boot (clock ticks), so a recycled pid is not mistaken for the holder."""
    text = _read_text(f"/proc/{pid}/stat")
    if not text:
        return None
    try:
        return int(text.rpartition(")")[2].split()[19])
    except (IndexError, ValueError):
        return None


def process_alive(pid: Any) -> bool:
    """Whether a process with this pid exists on this host (in this pid namespace)."""
    try:
        return _pid_alive(int(pid), None)
    except (TypeError, ValueError):
        return False


def _pid_alive(pid: int, start_ticks: Optional[int]) -> bool:
    if pid <= 0:  # kill(0) and kill(-n) would ask about whole process groups
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if start_ticks is None:
        return True
    now = _start_ticks(pid)
    return now is None or now == start_ticks


@dataclass
class Holder:
    """What a claim file says about who holds the run, and how old its heartbeat is."""

    path: Path
    info: dict
    heartbeat_age_s: float

    @property
    def token(self) -> str:
        return str(self.info.get("token", ""))

    def describe(self) -> str:
        info = self.info
        who = f"pid {info.get('pid')} on host {info.get('host')}"
        job = f" (job {info['job_id']})" if info.get("job_id") else ""
        return f"{who} since {info.get('started_at')}{job}"

    def why_dead(self) -> Optional[str]:
        """Why the holder is provably gone, or None when it may still be alive."""
        info = self.info
        if info.get("host") == socket.gethostname():
            if info.get("boot_id") and info.get("boot_id") != _boot_id():
                return f"host {info.get('host')} restarted since pid {info.get('pid')} claimed the run"
            if info.get("pid_ns") == _pid_namespace():  # pids mean the same here: decisive at once
                pids = [(p["pid"], p.get("start")) for p in info.get("pids") or []]
                if not any(_pid_alive(int(pid), start) for pid, start in pids):
                    return f"pid {info.get('pid')} on host {info.get('host')} is gone"
                return None
        if self.heartbeat_age_s > STALE_AFTER_S:
            return (f"no heartbeat from pid {info.get('pid')} on host {info.get('host')} for "
                    f"{self.heartbeat_age_s:.0f}s (more than {STALE_AFTER_S:.0f}s)")
        return None


def _generations(folder: Path) -> list[int]:
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return sorted(int(name[:-5]) for name in names if name.endswith(".json") and name[:-5].isdigit())


def _read_holder(path: Path, now_s: float) -> Optional[Holder]:
    try:
        with open(path) as handle:
            info = json.load(handle)
        mtime = os.stat(path).st_mtime
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        info, mtime = {}, 0.0  # unreadable: treated as a claim whose holder is unknown, judged by its age only
    if not isinstance(info, dict):
        info = {}
    return Holder(path, info, max(0.0, now_s - mtime))


def current(run: RunDir) -> Optional[Holder]:
    """The run's claim (the highest-numbered file), live or dead; None when nobody holds it."""
    folder = run.claims_dir
    for _ in range(MAX_TRIES):
        generations = _generations(folder)
        if not generations:
            return None
        holder = _read_holder(folder / f"{generations[-1]}.json", time.time())
        if holder is not None:
            return holder
    return None


def live_holder(run: RunDir) -> Optional[Holder]:
    """The run's claim when its holder may be alive (held by another process or this one); else None."""
    holder = current(run)
    if holder is None or holder.why_dead() is not None:
        return None
    return holder


def refusal(run: RunDir, holder: Holder) -> str:
    """One line: who holds the run since when, and what to do."""
    doing = "resumed" if holder.info.get("purpose") == RESUME else "trained"
    if holder.info.get("job_id"):
        fix = f"wait for it, or `stride cancel {run.path}`"
    else:
        fix = f"wait for it, or stop it (Ctrl-C where it runs, or kill -INT {holder.info.get('pid')})"
    return f"run {run.path} is being {doing} by {holder.describe()}: {fix}"


class Claim:
    """This process's hold on a run; `release()` when the attempt is over (also at interpreter exit)."""

    def __init__(self, run: RunDir, path: Path, info: dict, on_lost: Optional[Callable[[str], None]] = None):
        self.run, self.path, self.info = run, path, info
        self.depth = 1
        self.on_lost = on_lost or (lambda message: _exit_on_lost(self, message))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="stride-claim", daemon=True)
        self._thread.start()

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    @property
    def token(self) -> str:
        return self.info["token"]

    def add_pids(self, pids: Sequence[int], purpose: Optional[str] = None) -> None:
        """Name the processes that hold the run with this one (the ranks a launcher started): while any of them
        lives the claim is alive, even after the launcher itself died."""
        self.info["pids"] = [*self.info["pids"], *({"pid": int(p), "start": _start_ticks(int(p))} for p in pids)]
        if purpose:
            self.info["purpose"] = purpose
        _write_info(self.path, self.info)

    def update(self, **fields: Any) -> None:
        """Change what the claim says (a `stride resume` that now launches the attempt it claimed for)."""
        fields = {k: v for k, v in fields.items() if v is not None and self.info.get(k) != v}
        if fields:
            self.info.update(fields)
            _write_info(self.path, self.info)

    def release(self) -> None:
        """Let go one level; the outermost release removes the file (only if it is still ours)."""
        with deferred_signals():
            with _HELD_GUARD:
                self.depth -= 1
                if self.depth > 0:
                    return
                if _HELD.get(str(self.run.path)) is self:
                    del _HELD[str(self.run.path)]
            self._stop.set()
            holder = _read_holder(self.path, time.time())
            if holder is not None and holder.token == self.token:
                self.path.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
                continue
            except FileNotFoundError:
                pass
            except OSError:
                continue  # a filesystem hiccup: the next beat tries again, long before the claim goes stale
            holder = current(self.run)
            if self._stop.is_set():
                return
            if holder is None:
                try:
                    _link_info(self.path, self.info)  # removed by hand: put it back
                except OSError:
                    pass
            elif holder.token != self.token:
                self.on_lost(f"run {self.run.path} was taken over by {holder.describe()} while this process "
                             f"(pid {os.getpid()}) held it; stopping at once without writing anything more")
                return


def _exit_on_lost(claim: "Claim", message: str) -> None:
    """Two writers must never share a folder: end this holder and the processes it named at once, without any
    cleanup that writes (a graceful stop would write a checkpoint)."""
    import signal

    print(f"stride: error: {message}", file=sys.stderr, flush=True)
    for entry in claim.info.get("pids") or []:
        if entry["pid"] != os.getpid():
            try:
                os.kill(entry["pid"], signal.SIGKILL)
            except OSError:
                pass
    os._exit(75)


def _info_for(launcher: str, job_id: Optional[str], attempt: Optional[str], purpose: str) -> dict:
    pid = os.getpid()
    return {"token": uuid.uuid4().hex, "host": socket.gethostname(), "pid": pid,
            "pids": [{"pid": pid, "start": _start_ticks(pid)}], "boot_id": _boot_id(), "pid_ns": _pid_namespace(),
            "launcher": launcher, "job_id": job_id, "attempt": attempt, "purpose": purpose,
            "started_at": now_iso()}


def _temp_with(folder: Path, info: dict) -> Path:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".claim.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(info) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp)


def _link_info(path: Path, info: dict) -> None:
    """Create `path` holding `info`, or raise FileExistsError: complete or absent, never half-written."""
    tmp = _temp_with(path.parent, info)
    try:
        os.link(tmp, path)
    finally:
        os.unlink(tmp)
    fsync_dir(path.parent)


def _write_info(path: Path, info: dict) -> None:
    tmp = _temp_with(path.parent, info)
    os.replace(tmp, path)


def acquire(run: RunDir, launcher: str, job_id: Optional[str] = None, attempt: Optional[str] = None,
            purpose: str = TRAIN, wait_for_resume_s: float = 0.0,
            on_lost: Optional[Callable[[str], None]] = None, ended_jobs: Collection[str] = ()) -> Claim:
    """Claim `run` for this process, or raise ClaimRefused naming the live holder.

    Re-entrant: a run this process holds already is held one level deeper. A SLURM attempt (`job_id`) takes over a
    claim of its own job (a requeued attempt, while the previous one's heartbeat is still fresh), and waits up to
    `wait_for_resume_s` for a `stride resume` that is still submitting it. A claim held by one of `ended_jobs` (SLURM
    jobs the caller saw leave the queue: their processes are gone, however they ended) is dead at once.
    """
    key = str(run.path)
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None:
            held.depth += 1
    if held is not None:
        if purpose == TRAIN:  # the `stride resume` that claimed first now launches the attempt
            held.update(purpose=TRAIN, launcher=launcher, attempt=attempt, job_id=job_id)
        return held
    folder = run.claims_dir
    folder.mkdir(exist_ok=True)
    info = _info_for(launcher, job_id, attempt, purpose)
    deadline = time.monotonic() + wait_for_resume_s
    for _ in range(MAX_TRIES):
        generations = _generations(folder)
        top = generations[-1] if generations else -1
        holder = None
        if top >= 0:
            # The filesystem's clock, not this host's: a temporary file's mtime is "now" where the claims live.
            probe = _temp_with(folder, {})
            try:
                now_s = os.stat(probe).st_mtime
            finally:
                os.unlink(probe)
            holder = _read_holder(folder / f"{top}.json", now_s)
            if holder is None:
                continue  # released while we looked
            why = holder.why_dead()
            if why is None and holder.info.get("job_id") and str(holder.info["job_id"]) in ended_jobs:
                why = f"its SLURM job {holder.info['job_id']} has left the queue"
            if why is None and job_id and holder.info.get("job_id") == job_id:
                why = f"attempt {holder.info.get('attempt')} of the same job {job_id} was requeued"
            if why is None:
                if holder.info.get("purpose") == RESUME and time.monotonic() < deadline:
                    time.sleep(POLL_S)
                    continue
                raise ClaimRefused(refusal(run, holder))
        path = folder / f"{top + 1}.json"
        with deferred_signals():  # created and registered (released at exit), or not created at all
            try:
                _link_info(path, info)
            except FileExistsError:
                continue  # another starter won this number: look again
            claim = Claim(run, path, info, on_lost)
            with _HELD_GUARD:
                _HELD[key] = claim
        if holder is not None:
            _record_takeover(run, holder, why, info)
        for old in generations:
            (folder / f"{old}.json").unlink(missing_ok=True)
        return claim
    raise RunError(f"could not claim run {run.path}: {MAX_TRIES} other starters raced for {folder}; retry")


def _record_takeover(run: RunDir, holder: Holder, why: Optional[str], info: dict) -> None:
    record = {"time": now_iso(), "by": {k: info[k] for k in ("host", "pid", "job_id", "attempt")},
              "from": {k: holder.info.get(k) for k in ("host", "pid", "job_id", "attempt", "started_at")},
              "why": why}
    try:
        run.update_metadata(lambda m: m.setdefault("claim_takeovers", []).append(record))
    except (RunError, OSError):
        pass  # a broken metadata.json must not keep a dead holder's claim alive; the file itself is replaced


def held(run: RunDir) -> Optional[Claim]:
    """This process's claim on `run`, if it holds one."""
    with _HELD_GUARD:
        return _HELD.get(str(run.path))


def release_held(run: RunDir) -> None:
    """Let go of this process's claim on `run` entirely (e.g. once a submitted job's id is recorded)."""
    claim = held(run)
    while claim is not None and claim.depth > 0:
        claim.release()


class NoClaim:
    """What ranks that do not hold the run get: a launcher (or SLURM's rank 0) holds it for them."""

    def release(self) -> None:
        pass


def for_rank(run: RunDir, launcher: str, is_main: bool, job_id: Optional[str], attempt: str) -> Any:
    """The claim a rank takes for its attempt: rank 0 of a SLURM job, of torchrun, or of a bare
    `python -m stride.job RUN`; ranks that a `stride local` launcher started are covered by the launcher's."""
    if not is_main or launcher == "local":
        return NoClaim()
    return acquire(run, launcher, job_id=job_id, attempt=attempt,
                   wait_for_resume_s=RESUME_WAIT_S if launcher == "slurm" else 0.0)


@atexit.register
def _release_all() -> None:
    with _HELD_GUARD:
        claims = list(_HELD.values())
    for claim in claims:
        claim.depth = 1
        try:
            claim.release()
        except OSError:
            pass
