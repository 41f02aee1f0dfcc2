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
    out = subprocess.run(["squeue", "-h", "-o", "%i|%Z"], capture_output=True, text=True, timeout=30).stdout
    return {job for job, _, workdir in (line.partition("|") for line in out.splitlines())
            if Path(workdir).resolve() == Path(folder).resolve()}


def job_state(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
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
