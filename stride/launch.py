"""Start a validated run: on this machine (one process in-process, or N ranks as subprocesses) or on SLURM.

Side effects live here: processes, signals. A launcher hands every rank the run folder's path and nothing else.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Optional, Sequence

from stride.errors import ClusterError
from stride.logs import get_logger
from stride.rundir import RunDir, now_iso

POLL_S = 0.2
TERMINATE_GRACE_S = 10.0


def run_in_process(run: RunDir) -> dict:
    """One rank in this process. SIGINT/SIGTERM ask the loop to checkpoint and stop at the next step."""
    from stride import job

    return job.run_rank(run.path)


def _rank_env(rank: int, world_size: int, rendezvous_id: str) -> dict:
    env = dict(os.environ)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
               MASTER_ADDR="127.0.0.1", STRIDE_RENDEZVOUS_ID=rendezvous_id)
    # Each rank gets its share of the cores: N ranks x all cores oversubscribes the machine.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world_size)))
    return env


def _stop_all(procs: list[subprocess.Popen], sig: int = signal.SIGTERM) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(sig)
    deadline = time.monotonic() + TERMINATE_GRACE_S
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=TERMINATE_GRACE_S)


def _forward_signals(procs: list[subprocess.Popen]) -> dict:
    """SIGINT/SIGTERM/SIGUSR2 sent to the launcher reach every rank once; they checkpoint and stop together.

    Ranks run in their own session, so a terminal's Ctrl-C reaches them only through here (a second Ctrl-C
    interrupts at once). Returns the previous handlers.
    """
    def forward(signum: int, frame: object) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

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
    procs: list[subprocess.Popen] = []
    previous = _forward_signals(procs)
    procs += [subprocess.Popen(command, env=_rank_env(rank, nproc, rendezvous_id), start_new_session=True,
                               preexec_fn=_die_with_parent) for rank in range(nproc)]
    try:
        while True:
            codes = [proc.poll() for proc in procs]
            # A rank killed by a signal (negative code) is the cause; ranks that lost it exit 1 moments later.
            failed = sorted((rank for rank, code in enumerate(codes) if code not in (None, 0)),
                            key=lambda rank: codes[rank] >= 0)
            if failed:
                rank = failed[0]
                get_logger().error("rank %d exited with code %s: stopping the other ranks", rank, codes[rank])
                _stop_all(procs)
                status = run.read_status()
                # Unless a rank recorded its own exception (a rank that only lost its peers names no one).
                if status.get("state") != "failed" or status.get("failed_rank") is None:
                    run.update_status(state="failed", ended_at=now_iso(), failed_rank=rank,
                                      failed_host=socket.gethostname(), error=f"rank {rank} {_exit_text(codes[rank])}")
                return codes[rank] or 1
            if all(code == 0 for code in codes):
                return 0
            time.sleep(POLL_S)
    finally:
        _stop_all(procs)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


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
        run.update_status(state="failed", error=f"submission failed: {exc}")
        raise ClusterError(f"submission of {run.path} failed: {str(exc).strip().splitlines()[-1]}") from None
    job_id = str(job.job_id)
    record = {"job_id": job_id, "submitted_at": now_iso(), "nodes": config["slurm"]["nodes"],
              "tasks_per_node": params["ntasks_per_node"]}
    run.update_metadata(lambda m: m.setdefault("jobs", []).append(record))
    run.update_status(state="pending", job_id=job_id, launcher="slurm", nodes=config["slurm"]["nodes"],
                      submitted_at=record["submitted_at"])
    marker.unlink()
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
            run.update_status(state="failed", error=f"submission failed: {exc}")
        raise ClusterError(f"submission of the sweep failed: {str(exc).strip().splitlines()[-1]}") from None
    for run, job, marker in zip(runs, jobs, markers):
        job_id = str(job.job_id)
        record = {"job_id": job_id, "submitted_at": now_iso(), "nodes": configs[0]["slurm"]["nodes"],
                  "tasks_per_node": params["ntasks_per_node"], "array": True}
        run.update_metadata(lambda m, record=record: m.setdefault("jobs", []).append(record))
        run.update_status(state="pending", job_id=job_id, launcher="slurm", nodes=configs[0]["slurm"]["nodes"],
                          submitted_at=record["submitted_at"])
        marker.unlink()
    return str(jobs[0].job_id).split("_")[0]
