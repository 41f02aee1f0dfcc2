"""What every rank runs: rebuild the run from its folder, join the process group, train, report failures.

Launchers (`stride local`, submitit on SLURM) hand a rank only the run folder's path, never a pickled user object,
so any run can be re-run from its folder alone. Signals only set a flag; the loop acts at the next step boundary.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import traceback
from pathlib import Path
from typing import Any, Optional

from stride import distenv
from stride.errors import StrideError
from stride.rundir import RunDir, now_iso, write_json

ERROR_TAIL_LINES = 20


def choose_backend(config: dict) -> str:
    backend = config["distributed_kwargs"]["backend"]
    if backend != "auto":
        return backend
    import torch

    wants_cuda = config["device"] != "cpu" and torch.cuda.is_available()
    return "nccl" if wants_cuda else "gloo"


def record_failure(run: RunDir, env: distenv.DistEnv, exc: BaseException, signalled: Optional[str] = None) -> None:
    """Each rank writes its own failure file (no contention); `stride status` names the rank, node and error.

    A rank that raised after SLURM or the user signalled it (scancel, preemption) was interrupted, not broken: the
    run is marked stopped and the scheduler's own record (cancelled, preempted, timeout) says the rest.
    """
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
    tail = "".join(lines).rstrip().splitlines()[-ERROR_TAIL_LINES:]
    failure = {"rank": env.rank, "host": env.hostname, "job_id": env.job_id, "error": f"{type(exc).__name__}: {exc}",
               "traceback_tail": tail, "time": now_iso(), "pid": os.getpid(), "after_signal": signalled}
    folder = run.path / "failures"
    folder.mkdir(exist_ok=True)
    write_json(folder / f"rank_{env.rank}.json", failure)
    with run.locked():
        status = run.read_status()
        # The first rank to fail is the cause; the others usually fail because it left their collectives.
        already_failed = status.get("state") == "failed" and status.get("failed_job") == env.job_id
        if signalled:
            if not already_failed and status.get("state") not in ("stopped", "cancelled"):
                status.update(state="stopped", stop_reason=signalled, ended_at=now_iso(), updated_at=now_iso())
                write_json(run.status_file, status)
        elif not already_failed:
            status.update(state="failed", ended_at=now_iso(), failed_rank=env.rank, failed_host=env.hostname,
                          failed_job=env.job_id, error=failure["error"], error_tail=tail[-5:], updated_at=now_iso())
            write_json(run.status_file, status)


STOP_SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGUSR2: "SIGUSR2", signal.SIGINT: "SIGINT"}


def _install_stop_handlers(trainer: Any) -> None:
    """SIGTERM/SIGUSR2/SIGINT ask the loop to checkpoint and stop at the next step; a second SIGINT interrupts."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def handle(signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and trainer.stop_reason is not None:
            raise KeyboardInterrupt
        trainer.request_stop(STOP_SIGNALS.get(signum, str(signum)))

    for signum in STOP_SIGNALS:
        signal.signal(signum, handle)


def run_rank(run_path: Path, env: Optional[distenv.DistEnv] = None) -> dict:
    """Train one rank of the run stored in `run_path`; returns the results (rank 0) or a summary."""
    run = RunDir(run_path)
    env = env or distenv.detect()
    config = run.read_config()
    dk = config["distributed_kwargs"]
    trainer = None
    try:
        distenv.init_process_group(env, choose_backend(config), run.rendezvous_dir, dk["init_timeout_s"],
                                   dk["timeout_s"])
        from stride.trainer import Trainer

        trainer = Trainer(config=config, dist_env=env, run_dir=run)
        _install_stop_handlers(trainer)
        return trainer.fit()
    except BaseException as exc:
        if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            record_failure(run, env, exc, signalled=trainer.stop_reason if trainer is not None else None)
        raise
    finally:
        distenv.destroy_process_group()


class SlurmTrain:
    """The callable submitit pickles: only the run folder's path travels, by reference to this importable class."""

    def __init__(self, run_path: str):
        self.run_path = str(run_path)

    def __call__(self) -> dict:
        return run_rank(Path(self.run_path))

    def __repr__(self) -> str:
        return f"SlurmTrain({self.run_path!r})"


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m stride.job RUN_DIR`: one rank of a local multi-process run (env vars say which)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m stride.job RUN_DIR", file=sys.stderr)
        return 2
    try:
        run_rank(Path(args[0]))
    except StrideError as exc:
        print(f"stride: error: rank {os.environ.get('RANK', '0')} on {socket.gethostname()}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

