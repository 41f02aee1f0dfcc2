"""Helpers for tests against the real local Slurm cluster (slurm/cluster.sh up): bounded polling only."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

needs_slurm = pytest.mark.skipif(not os.environ.get("SLURM_CONF"),
                                 reason="SLURM_CONF unset: start the cluster with `bash slurm/cluster.sh up` "
                                        "(tests/run.sh always does)")


def squeue_ids(folder: Path) -> set[str]:
    """Jobs in the queue that were submitted from `folder` (other tests may share the cluster)."""
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%Z"], capture_output=True, text=True, timeout=30).stdout
    return {job for job, _, workdir in (line.partition("|") for line in out.splitlines())
            if Path(workdir).resolve() == Path(folder).resolve()}


def job_state(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-r", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip() or "GONE"


def submitted(proc: subprocess.CompletedProcess) -> tuple[Path, str]:
    assert proc.returncode == 0, proc.stderr + proc.stdout
    job_id = proc.stdout.split("submitted job ")[1].split()[0]
    run = Path(proc.stdout.split("run folder: ")[1].split()[0])
    return run, job_id


def run_status(run: Path) -> dict:
    try:
        return json.loads((run / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def wait_for(predicate, timeout_s: float, interval_s: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def wait_gone(job_id: str, timeout_s: float = 300) -> None:
    wait_for(lambda: job_state(job_id) == "GONE", timeout_s, what=f"job {job_id} to leave the queue")


def train_step(run: Path) -> int:
    """The last training step the run logged in metrics.jsonl (0 before its first log line)."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        steps = [r["step"] for r in map(json.loads, lines) if r["split"] == "train"]
    except (FileNotFoundError, ValueError):
        return 0
    return steps[-1] if steps else 0


def _environ(pid: int) -> list[bytes]:
    try:
        return (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return []


def processes_of_job(job_id: str) -> list[int]:
    """Every process on this machine (all nodes live here) started by the job."""
    marker = f"SLURM_JOB_ID={job_id}".encode()
    pids = [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    return [pid for pid in pids if marker in _environ(pid)]


def rank_process(job_id: str, rank: int) -> tuple[int, str]:
    """(pid, node) of the rank's own Python process (not one of its DataLoader workers, which fork from it)."""
    def is_rank(pid: int) -> bool:
        try:
            cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes()
        except OSError:
            return False
        return f"SLURM_PROCID={rank}".encode() in _environ(pid) and b"submitit.core._submit" in cmdline

    def parent(pid: int) -> int:
        try:
            return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return 0

    found = [pid for pid in processes_of_job(job_id) if is_rank(pid) and not is_rank(parent(pid))]
    assert len(found) == 1, f"expected one process for rank {rank} of job {job_id}, found {found}"
    node = next(v.split(b"=", 1)[1].decode() for v in _environ(found[0]) if v.startswith(b"SLURMD_NODENAME="))
    return found[0], node
