"""What every rank runs: rebuild the run from its folder, join the process group, train, report failures.

Launchers (`stride local`, submitit on SLURM) hand a rank only the run folder's path, never a pickled user object,
so any run can be re-run from its folder alone. Signals only set a flag; the loop acts at the next step boundary.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import sys
import traceback
from pathlib import Path
from typing import Any, Optional

from stride import claim as claim_lib
from stride import distenv, network
from stride import requeue as requeue_lib
from stride import runstate
from stride.errors import StrideError
from stride.rundir import RunDir, now_iso, write_json
from stride.slurm import ATTEMPT_MARK

ERROR_TAIL_LINES = 20
# How gloo and NCCL report a peer that went away: the rank raising it is a victim, not the cause.
PEER_LOST = re.compile(r"closed by peer|reset by peer|broken pipe|remote process exited|ncclRemoteError", re.I)


def choose_backend(config: dict) -> str:
    backend = config["distributed_kwargs"]["backend"]
    if backend != "auto":
        return backend
    import torch

    wants_cuda = config["device"] != "cpu" and torch.cuda.is_available()
    return "nccl" if wants_cuda else "gloo"


def _requeue_decision(run: RunDir, env: distenv.DistEnv, config: dict, reason: str,
                      error: Optional[str] = None, **context: Any) -> requeue_lib.Decision:
    """Decide, record in metadata["requeues"], then (if so decided) put the SLURM job back in the queue.

    The record is written before `scontrol requeue`: a decision that could not be recorded is never acted on, so a
    crash loop cannot escape the rules that look at the history.
    """
    from stride import slurm

    limits = config["slurm"]
    history = requeue_lib.history_since_resume(run.read_metadata())
    decision = requeue_lib.decide(reason, history, limits["max_timeout_requeues"], limits["max_crash_requeues"], error)
    record = decision.record(job_id=env.job_id, restart=env.restart_count, time=now_iso(), error=error, **context)
    run.update_metadata(lambda m: m.setdefault("requeues", []).append(record))
    failure = slurm.requeue(env.job_id) if decision.requeue else None
    if failure:
        decision = requeue_lib.Decision(reason, False, f"scontrol requeue failed: {failure}")
        run.update_metadata(lambda m: m["requeues"][-1].update(requeue=False, why=decision.why))
    return decision


def record_failure(run: RunDir, env: distenv.DistEnv, exc: BaseException, signalled: Optional[str] = None,
                   config: Optional[dict] = None) -> None:
    """Each rank writes its own failure file (no contention); `stride status` names the rank, node and error.

    The first rank to fail in an attempt is the cause (the others usually fail because it left their collectives);
    on SLURM it also decides whether the job is retried. A rank that only lost a peer (gloo/NCCL: connection closed)
    marks the run failed without claiming the cause: the rank that raised may still claim it, and one that died
    without a Python exception (SIGKILL, OOM, segfault) is named by `stride status` from srun's report; such a death
    is not retried. A rank that raised after SLURM or the user signalled it (scancel, preemption) was interrupted,
    not broken: the run is marked stopped and the scheduler's own record (cancelled, preempted, timeout) says the rest.
    """
    holder = claim_lib.live_holder(run)
    if holder is not None and holder.info.get("attempt") not in (None, env.rendezvous_id):
        return  # another attempt holds the run (this one's rank 0 was refused): its story is not ours to write
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
    tail = "".join(lines).rstrip().splitlines()[-ERROR_TAIL_LINES:]
    error = f"{type(exc).__name__}: {exc}"
    peer_lost = bool(PEER_LOST.search(error))
    failure = {"rank": env.rank, "host": env.hostname, "job_id": env.job_id, "error": error,
               "traceback_tail": tail, "time": now_iso(), "pid": os.getpid(), "after_signal": signalled,
               "peer_lost": peer_lost}
    folder = run.path / "failures"
    folder.mkdir(exist_ok=True)
    write_json(folder / f"rank_{env.rank}.json", failure)
    with run.locked():
        status = run.read_status()
        claimed = status.get("failed_attempt") == env.rendezvous_id
        if claimed and (peer_lost or not status.get("failed_peer_lost")):
            return
        if signalled:
            if not claimed and status.get("state") not in ("stopped", "cancelled"):
                runstate.apply(status, "stopped", stop_reason=signalled, updated_at=now_iso())
                write_json(run.status_file, status)
            return
        if peer_lost:
            cause = {"failed_rank": None, "failed_host": None, "error": f"lost contact with another rank: {error}",
                     "error_tail": None}
        else:
            cause = {"failed_rank": env.rank, "failed_host": env.hostname, "error": error, "error_tail": tail[-5:]}
        runstate.apply(status, "failed", failed_job=env.job_id, failed_attempt=env.rendezvous_id,
                      failed_peer_lost=peer_lost, updated_at=now_iso(), **cause)
        write_json(run.status_file, status)
    # This rank claimed the failure for its attempt above; it alone decides whether the job is retried.
    if env.launcher == "slurm" and config is not None and not peer_lost:
        decision = _requeue_decision(run, env, config, "crashed", error=error, rank=env.rank, host=env.hostname)
        if decision.requeue:
            runstate.move(run, "requeued")


def after_stop(run: RunDir, env: distenv.DistEnv, config: dict, result: dict) -> None:
    """Rank 0 of a SLURM job that stopped on a signal: classify it, record it, requeue when the rules say so."""
    from stride import slurm

    signal_name = result.get("reason", "")
    preempted = slurm.being_preempted(env.job_id)
    seconds_left = slurm.time_left_s(env.job_id) if signal_name != "SIGTERM" and not preempted else None
    reason = requeue_lib.classify_signal(signal_name, seconds_left, config["slurm"]["signal_delay_s"], preempted)
    decision = _requeue_decision(run, env, config, reason, signal=signal_name, step=result.get("step"),
                                 epoch=result.get("epoch"), seconds_left=seconds_left)
    state = "requeued" if decision.requeue else ("timeout" if reason == "timeout" else "stopped")
    runstate.move(run, state, stop_reason=f"{signal_name}: {decision.why}")


def record_attempt(run: RunDir, env: distenv.DistEnv) -> None:
    """metadata["attempts"]: one line per start of the run (first launch, each requeue, each resume)."""
    record = {"launcher": env.launcher, "job_id": env.job_id, "restart": env.restart_count,
              "started_at": now_iso(), "host": env.hostname, "world_size": env.world_size, "pid": os.getpid()}
    run.update_metadata(lambda m: m.setdefault("attempts", []).append(record))


STOP_SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGUSR2: "SIGUSR2", signal.SIGINT: "SIGINT"}


class StopFlag:
    """SIGTERM/SIGUSR2/SIGINT ask the loop to checkpoint and stop at the next step; a second SIGINT interrupts.

    Installed when the rank starts, before the rendezvous and data loading: until then submitit's own USR2 handler
    would requeue the job with no decision recorded. The handler only sets flags; the trainer picks the reason up
    once it exists.
    """

    def __init__(self) -> None:
        self.reason: Optional[str] = None
        self.trainer: Any = None

    def install(self) -> "StopFlag":
        import threading

        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                signal.signal(signum, self.handle)
        return self

    def handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.reason is not None:
            raise KeyboardInterrupt
        self.reason = STOP_SIGNALS.get(signum, str(signum))
        if self.trainer is not None:
            self.trainer.request_stop(self.reason)

    def attach(self, trainer: Any) -> None:
        self.trainer = trainer
        if self.reason is not None:
            trainer.request_stop(self.reason)


def run_rank(run_path: Path, env: Optional[distenv.DistEnv] = None) -> dict:
    """Train one rank of the run stored in `run_path`; returns the results (rank 0) or a summary."""
    stop = StopFlag().install()
    run = RunDir(run_path)
    env = env or distenv.detect()
    config = run.read_config()
    dk = config["distributed_kwargs"]
    network.apply_env(dk["env"])  # first: OMP_NUM_THREADS, NCCL_* and the rest hold from here on
    if dk["nccl_debug"]:
        network.nccl_debug_env(run.logs_dir, env.rank)
    if env.launcher != "single":
        from stride import placement

        placement.apply_threads(env.cpus_per_task, env.local_world_size)
    if env.launcher == "slurm" and env.is_main:
        # Lands in the job's stderr, where srun later reports dead tasks: `stride status` reads only this attempt.
        print(f"{ATTEMPT_MARK}{env.rendezvous_id} (job {env.job_id}) starting on {env.hostname}", file=sys.stderr,
              flush=True)
    from stride.registry import import_from_launch_folder

    import_from_launch_folder(run)
    # One writer per run: rank 0 of each SLURM attempt (requeues too) claims the run before it writes anything, and is
    # refused at once while another process trains it; a `stride local` launcher holds the claim for its ranks.
    claim = claim_lib.for_rank(run, env.launcher, env.is_main, env.job_id, env.rendezvous_id)
    try:
        network.check_interfaces(env.rank, os.environ.get("SLURMD_NODENAME") or env.hostname)
        distenv.init_process_group(env, choose_backend(config), run.rendezvous_dir, dk["init_timeout_s"],
                                   dk["timeout_s"])
        env = distenv.with_node_gpus(env, dk["init_timeout_s"])
        from stride.training.trainer import trainer_class

        if env.is_main:
            record_attempt(run, env)
        trainer = trainer_class(config)(config=config, dist_env=env, run_dir=run)
        stop.attach(trainer)
        result = trainer.fit()
    except BaseException as exc:
        if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            record_failure(run, env, exc, signalled=stop.reason, config=config)
        claim.release()
        raise
    finally:
        distenv.destroy_process_group()
    if result.get("stopped") and env.launcher == "slurm" and env.is_main:
        after_stop(run, env, config, result)
    claim.release()
    return result


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
    except KeyboardInterrupt:  # a second Ctrl-C, forwarded by the launcher: it says so, once, for every rank
        return 130
    return 0


def exit_now(code: int) -> None:
    """Flush and leave without running C++ static destructors: gloo/TCPStore threads torn down at interpreter exit
    can abort a rank whose work is already done and saved ("terminate called without an active exception")."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())

