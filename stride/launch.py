"""Start a validated run: on this machine (one process in-process, or N ranks as subprocesses) or on SLURM.

Side effects live here: processes, signals. A launcher hands every rank the run folder's path and nothing else. A
local launcher claims the run (stride.claim) for the whole attempt, and leaves it in a final state however the attempt
ends: a second Ctrl-C, SIGTERM before training started, an exception no rank recorded.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator, Optional, Sequence

from stride import claim as claim_lib
from stride import placement
from stride import runstate
from stride.errors import ClusterError, StrideError
from stride.logs import get_logger
from stride.rundir import RunDir, now_iso

POLL_S = 0.2
TERMINATE_GRACE_S = 10.0
INTERRUPT_GRACE_S = 3.0
"""After a second Ctrl-C: how long ranks get to end before they are killed (the first one asked them to stop)."""
UNFINISHED_STATES = ("pending", "running")


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def finalise(run: RunDir, unfinished: Sequence[str] = UNFINISHED_STATES, only_without: Optional[str] = None,
             **fields: object) -> bool:
    """Write `fields` (a final state) and ended_at only if the run's state is one of `unfinished` (and it has no
    `only_without` yet); True if it was written."""
    with claim_lib.deferred_signals():  # a third Ctrl-C must not cut the write short: it is handled after it
        for _ in range(3):  # a KeyboardInterrupt already on its way in before the deferral: write again
            try:
                with run.locked():
                    status = run.read_status()
                    if status.get("state", "pending") not in unfinished or (only_without and status.get(only_without)):
                        return False
                    if "state" in fields:
                        runstate.move(run, str(fields.pop("state")), ended_at=now_iso(), **fields)
                    else:
                        run.update_status(ended_at=now_iso(), **fields)
                    return True
            except KeyboardInterrupt:
                continue
            except (StrideError, OSError):
                return False  # a broken status.json or a full disk: the error on its way out says more
    return False


def interrupted_fields(signal_name: str = "SIGINT") -> dict:
    return {"state": "stopped", "stop_reason": f"interrupted ({signal_name}), no checkpoint written at the stop"}


def stopped_with_checkpoint(run: RunDir) -> bool:
    """The run stopped as asked: stopped, and `latest` names a checkpoint of the step it stopped at (a rank that only
    lost its peers on the way down also says stopped, without one)."""
    from stride import checkpoint_files

    try:
        status = run.read_status()
        files = checkpoint_files.candidates(run.checkpoints_dir)
    except (StrideError, OSError):
        return False
    return status.get("state") == "stopped" and bool(files) and checkpoint_files.step_of(files[0]) == status.get("step")


def mark_interrupted(run: RunDir, signal_name: str) -> bool:
    """Stopped without a checkpoint at the stop, unless it stopped properly or recorded a failure of its own."""
    if stopped_with_checkpoint(run):
        return False
    return finalise(run, unfinished=(*UNFINISHED_STATES, "stopped"), **interrupted_fields(signal_name))


@contextlib.contextmanager
def final_state(run: RunDir) -> Iterator[None]:
    """However the attempt ends, the run is left stopped, failed or completed, never pending or running.

    Ranks record their own ends (completed, stopped with a checkpoint, failed with the error); this covers what they
    cannot: KeyboardInterrupt (a second Ctrl-C) or SystemExit cutting a rank short, an error before its loop began.
    """
    try:
        yield
    except BaseException as exc:
        name = _interruption(exc)
        if name:
            mark_interrupted(run, name)
        else:
            finalise(run, state="failed", error=f"{type(exc).__name__}: {exc}")
        _stamp_end(run)
        raise
    finalise(run, state="failed", error="the run's processes ended without recording how")
    _stamp_end(run)


def _stamp_end(run: RunDir) -> None:
    """Every final state says when the run ended (the loop's own stop records the step, not the time)."""
    finalise(run, unfinished=("stopped", "completed", "failed"), only_without="ended_at")


def _interruption(exc: BaseException) -> Optional[str]:
    """The signal that ended the attempt through `exc`: a Ctrl-C (KeyboardInterrupt) or `exit_on_signal`."""
    if isinstance(exc, KeyboardInterrupt):
        return "SIGINT"
    if isinstance(exc, SystemExit) and isinstance(exc.code, int) and exc.code > 128:
        return _signal_name(exc.code - 128)
    return None


def exit_on_signal(signum: int, frame: object) -> None:
    """SIGTERM before a rank installed its own handlers: exit 128+signal through every finaliser (the default
    action would end the process on the spot, leaving the run pending)."""
    raise SystemExit(128 + signum)


def run_in_process(run: RunDir) -> dict:
    """One rank in this process. SIGINT/SIGTERM ask the loop to checkpoint and stop at the next step; a second SIGINT
    interrupts at once, and the run is marked stopped without a checkpoint at the stop."""
    from stride import job

    main = threading.current_thread() is threading.main_thread()
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)} if main else {}
    if main:
        signal.signal(signal.SIGTERM, exit_on_signal)  # until run_rank sets its own
    stopping = True
    try:
        with claim_lib.acquire(run, launcher="single"), final_state(run):
            result = job.run_rank(run.path)
        stopping = bool(result.get("stopped"))
        return result
    except Exception:
        stopping = False
        raise
    finally:
        _restore_handlers(previous, stopping)


def _restore_handlers(previous: dict, stopping: bool) -> None:
    """The handlers from before the attempt; but after a stop signal the command is on its way out, and one more
    Ctrl-C (the second of a double press) must not cut short its exit or what it still records."""
    for signum, handler in previous.items():
        signal.signal(signum, signal.SIG_IGN if stopping and signum == signal.SIGINT else handler)


def _rank_env(rank: int, world_size: int, rendezvous_id: str) -> dict:
    env = dict(os.environ)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
               MASTER_ADDR="127.0.0.1", STRIDE_RENDEZVOUS_ID=rendezvous_id)
    # Each rank gets its share of the launcher's CPUs: N ranks x all cores oversubscribes the machine.
    cores = len(placement.affinity())
    env.setdefault("OMP_NUM_THREADS", str(placement.rank_threads(None, cores, cores, world_size)))
    return env


def _stop_all(procs: list[subprocess.Popen], sig: int = signal.SIGTERM, grace_s: float = TERMINATE_GRACE_S) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(sig)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=TERMINATE_GRACE_S)


def _forward_signals(procs: list[subprocess.Popen], received: list[int]) -> dict:
    """SIGINT/SIGTERM/SIGUSR2 sent to the launcher reach every rank once; they checkpoint and stop together.

    Ranks run in their own session, so a terminal's Ctrl-C reaches them only through here. A second Ctrl-C
    interrupts at once: the ranks get it too, and the launcher stops waiting for their checkpoint
    (KeyboardInterrupt). Each signal is noted in `received`. Returns the previous handlers.
    """
    def forward(signum: int, frame: object) -> None:
        received.append(signum)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)
        if signum == signal.SIGINT and received.count(signal.SIGINT) == 2:
            raise KeyboardInterrupt

    return {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)}


def _exit_text(code: int) -> str:
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"was killed by {signal.Signals(-code).name} (no Python exception)"
    except ValueError:
        return f"was killed by signal {-code} (no Python exception)"


def _die_with_parent() -> None:
    """In each rank (before exec): get SIGTERM if the launcher dies, so no rank outlives it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_local_ranks(run: RunDir, nproc: int, python: Optional[Sequence[str]] = None) -> int:
    """N ranks of one run as subprocesses on this machine; if one fails, the others are stopped too.

    `python` is the argv that starts each rank's Python (a container command ending in the image's Python);
    default: this interpreter.
    """
    rendezvous_id = f"local-{uuid.uuid4().hex[:12]}"
    command = [*(python or [sys.executable]), "-m", "stride.job", str(run.path)]
    with claim_lib.acquire(run, launcher="local", attempt=rendezvous_id) as claim, final_state(run):
        return _watch_ranks(run, claim, command, nproc, rendezvous_id)


def _watch_ranks(run: RunDir, claim: claim_lib.Claim, command: list[str], nproc: int, rendezvous_id: str) -> int:
    procs: list[subprocess.Popen] = []
    received: list[int] = []
    previous = _forward_signals(procs, received)
    grace_s = TERMINATE_GRACE_S
    try:
        for rank in range(nproc):
            procs.append(subprocess.Popen(command, env=_rank_env(rank, nproc, rendezvous_id), start_new_session=True,
                                          preexec_fn=_die_with_parent))
            for signum in received:  # a stop that came while the ranks were being started
                procs[-1].send_signal(signum)
        claim.add_pids([proc.pid for proc in procs])  # the claim lives while any rank does, even without us
        while True:
            codes = [proc.poll() for proc in procs]
            # A rank killed by a signal (negative code) is the cause; ranks that lost it exit 1 moments later.
            failed = sorted((rank for rank, code in enumerate(codes) if code not in (None, 0)),
                            key=lambda rank: codes[rank] >= 0)
            if failed and received:
                # Asked to stop, a rank that ended without its checkpoint (the signal came before its handler, or
                # it lost a peer that did) was interrupted, not broken.
                name = _signal_name(received[0])
                _stop_all(procs, grace_s=INTERRUPT_GRACE_S)
                if stopped_with_checkpoint(run) or run.read_status().get("state") == "completed":
                    return 0  # rank 0 finished or stopped as asked; the others merely lost it on the way out
                if mark_interrupted(run, name):
                    print(f"stride: run {run.path} was interrupted ({name}) before its ranks could checkpoint; "
                          f"continue it with: stride resume {run.path} --local", file=sys.stderr)
                    raise SystemExit(128 + received[0])
                # else a rank recorded a failure of its own before the stop: reported as a failure below
            if failed:
                rank = failed[0]
                get_logger().error("rank %d exited with code %s: stopping the other ranks", rank, codes[rank])
                _stop_all(procs)
                status = run.read_status()
                # Unless a rank recorded its own exception (a rank that only lost its peers names no one).
                if status.get("state") != "failed" or status.get("failed_rank") is None:
                    runstate.move(run, "failed", failed_rank=rank,
                                      failed_host=socket.gethostname(), error=f"rank {rank} {_exit_text(codes[rank])}")
                return codes[rank] or 1
            if all(code == 0 for code in codes):
                return 0
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        grace_s = INTERRUPT_GRACE_S  # a second Ctrl-C: the ranks have it too, and must not keep us long
        raise
    finally:
        _stop_all(procs, grace_s=grace_s)
        _restore_handlers(previous, stopping=bool(received))


def preflight_slurm(config: dict, python: Optional[str] = None) -> dict:
    """Everything checked before a run folder exists: sbatch present, parameters sane, Slurm would accept them.

    Returns the submitit parameters. Raises ClusterError/ConfigError with one line otherwise.
    """
    from stride import slurm
    from stride.proc import have

    params = slurm.submitit_parameters(config["slurm"], job_name=f"stride-{Path(config['work_dir']).name}")
    if not have("sbatch"):
        raise ClusterError("'sbatch' is not on PATH: run stride submit on a SLURM login node (or `module load "
                           "slurm`), or train here with `stride local`")
    probe_folder = Path(config["work_dir"]) / ".stride-preflight"
    slurm.test_only(slurm.make_sbatch_text(params, probe_folder, python))
    return params


def submit_run(config: dict, params: dict, python: Optional[str] = None,
               run: Optional[RunDir] = None) -> tuple[RunDir, str]:
    """Submit a run through submitit (a new one, or `run` when resuming) and record the job id; returns at once.

    A SUBMITTING marker is written before sbatch and removed once the job id is recorded, so a crash mid-submit is
    visible instead of silently losing a job.
    """
    import submitit

    from stride.job import SlurmTrain
    from stride.provenance import create_run

    run = run or create_run(config)
    marker = run.path / "SUBMITTING"
    marker.write_text(now_iso() + "\n")
    try:
        executor = submitit.SlurmExecutor(folder=run.slurm_dir, python=python,
                                          max_num_timeout=config["slurm"]["max_timeout_requeues"])
        executor.update_parameters(**params)
        job = executor.submit(SlurmTrain(str(run.path)))
    except Exception as exc:
        runstate.move(run, "failed", error=f"submission failed: {exc}")
        raise ClusterError(f"submission of {run.path} failed: {str(exc).strip().splitlines()[-1]}") from None
    job_id = str(job.job_id)
    record = {"job_id": job_id, "submitted_at": now_iso(), "nodes": config["slurm"]["nodes"],
              "tasks_per_node": params["ntasks_per_node"]}
    run.update_metadata(lambda m: m.setdefault("jobs", []).append(record))
    runstate.move(run, "pending", job_id=job_id, launcher="slurm", nodes=config["slurm"]["nodes"],
                      submitted_at=record["submitted_at"])
    marker.unlink()
    claim_lib.release_held(run)  # `stride resume` held the run while it submitted; the job's rank 0 claims it now
    return run, job_id


def submit_array(configs: list[dict], runs: list[RunDir], params: dict, python: Optional[str] = None,
                 max_parallel: Optional[int] = None) -> str:
    """Submit a sweep's runs as ONE SLURM job array (task i trains runs[i]); returns the array's job id.

    submitit's job folder is shared by the array (work_dir/sweeps/<id>/slurm); each run folder's `slurm` links to it,
    so `stride logs RUN --slurm out` finds the task's logs like any other job's.
    """
    import submitit

    from stride.job import SlurmTrain

    folder = runs[0].path.parent / "sweeps" / runs[0].read_metadata()["sweep"]["id"] / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    markers = [run.path / "SUBMITTING" for run in runs]
    for run, marker in zip(runs, markers):
        marker.write_text(now_iso() + "\n")
        if run.slurm_dir.is_dir() and not run.slurm_dir.is_symlink() and not any(run.slurm_dir.iterdir()):
            run.slurm_dir.rmdir()
        os.symlink(os.path.relpath(folder, run.path), run.slurm_dir)
    try:
        executor = submitit.SlurmExecutor(folder=folder, python=python,
                                          max_num_timeout=configs[0]["slurm"]["max_timeout_requeues"])
        executor.update_parameters(**params, array_parallelism=max_parallel or len(runs))
        with executor.batch():
            jobs = [executor.submit(SlurmTrain(str(run.path))) for run in runs]
    except Exception as exc:
        for run in runs:
            runstate.move(run, "failed", error=f"submission failed: {exc}")
        raise ClusterError(f"submission of the sweep failed: {str(exc).strip().splitlines()[-1]}") from None
    for run, job, marker in zip(runs, jobs, markers):
        job_id = str(job.job_id)
        record = {"job_id": job_id, "submitted_at": now_iso(), "nodes": configs[0]["slurm"]["nodes"],
                  "tasks_per_node": params["ntasks_per_node"], "array": True}
        run.update_metadata(lambda m, record=record: m.setdefault("jobs", []).append(record))
        runstate.move(run, "pending", job_id=job_id, launcher="slurm", nodes=configs[0]["slurm"]["nodes"],
                          submitted_at=record["submitted_at"])
        marker.unlink()
    return str(jobs[0].job_id).split("_")[0]
