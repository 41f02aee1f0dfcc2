"""Checks that the local Slurm test cluster (slurm/cluster.sh) really works.

Needs the cluster up and SLURM_CONF set:

    bash slurm/cluster.sh up && eval "$(bash slurm/cluster.sh env)"
    pytest tests/test_slurm_cluster.py

Every wait is bounded: a broken cluster fails these tests, it never hangs them.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from typing import Callable, Optional

import pytest

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(
        not os.environ.get("SLURM_CONF"),
        reason="SLURM_CONF is not set: run `bash slurm/cluster.sh up` and "
        '`eval "$(bash slurm/cluster.sh env)"` first',
    ),
]

# States after which a job never changes again (sacct spelling).
TERMINAL = {
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED",
    "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT",
}
CMD_TIMEOUT_S = 30  # any single Slurm client command
JOB_TIMEOUT_S = 120  # a trivial job, from submission to accounting record


def slurm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a Slurm client command (bounded), capturing text output."""
    proc = subprocess.run(args, capture_output=True, text=True, timeout=CMD_TIMEOUT_S)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} -> rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def wait_for(fetch: Callable[[], Optional[str]], done: Callable[[Optional[str]], bool],
             timeout_s: float, what: str, interval_s: float = 0.5) -> Optional[str]:
    """Poll fetch() until done(value); fail with the last value after timeout_s."""
    deadline = time.monotonic() + timeout_s
    value = None
    while True:
        value = fetch()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last value: {value!r}")
        time.sleep(interval_s)


def sacct_state(job_id: str) -> Optional[str]:
    """The allocation's state in accounting ('CANCELLED by 0' -> 'CANCELLED'); None if not recorded yet."""
    out = slurm("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State", check=False).stdout.split()
    return out[0] if out else None


def squeue_state(job_id: str) -> Optional[str]:
    """The job's state in the controller's queue (RUNNING, PENDING...); None once it has left."""
    out = slurm("squeue", "-h", "-j", job_id, "-o", "%T", check=False).stdout.split()
    return out[0] if out else None


def sbatch(*args: str) -> str:
    return slurm("sbatch", "--parsable", *args).stdout.strip().split(";")[0]


@pytest.fixture(scope="module")
def node_names() -> list[str]:
    names = sorted(set(slurm("sinfo", "-h", "-N", "-o", "%N").stdout.split()))
    assert len(names) >= 2, f"the test cluster should have at least 2 nodes, sinfo shows {names}"
    return names


@pytest.fixture(scope="module")
def two_node_job(tmp_path_factory) -> tuple[str, str]:
    """A finished 2-node batch job that ran `srun hostname`: (job id, its output)."""
    folder = tmp_path_factory.mktemp("two_node_job")
    out = folder / "out.txt"
    job_id = sbatch("-N", "2", "--ntasks-per-node=1", "--time=2", "--job-name=stride-hostname",
                    f"--chdir={folder}", f"--output={out}", "--wrap", "srun hostname")
    wait_for(lambda: squeue_state(job_id), lambda s: s is None, JOB_TIMEOUT_S, f"job {job_id} to leave the queue")
    return job_id, out.read_text() if out.exists() else ""


def test_two_node_job_runs_on_both_nodes(two_node_job, node_names):
    job_id, output = two_node_job
    hosts = output.split()
    assert sorted(hosts) == sorted(node_names[:2]), f"job {job_id} printed {hosts!r}, expected one line per node"


def test_sacct_reports_completed(two_node_job):
    job_id, _ = two_node_job
    state = wait_for(lambda: sacct_state(job_id), lambda s: s in TERMINAL, JOB_TIMEOUT_S,
                     f"sacct to record job {job_id} as finished")
    assert state == "COMPLETED"


def _default_partition() -> tuple[str, int]:
    """(name, MaxTime in minutes) of the default partition."""
    for line in slurm("scontrol", "-o", "show", "partition").stdout.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if fields.get("Default") == "YES":
            m = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d+):(\d+)", fields["MaxTime"])
            assert m, f"partition {fields['PartitionName']} has no finite MaxTime: {fields['MaxTime']}"
            days, hours, minutes, _ = (int(g or 0) for g in m.groups())
            return fields["PartitionName"], days * 1440 + hours * 60 + minutes
    raise AssertionError("no default partition")


def test_time_above_partition_max_is_refused(tmp_path):
    partition, max_minutes = _default_partition()
    common = ["sbatch", "--test-only", f"--partition={partition}", f"--chdir={tmp_path}", "--wrap", "true"]
    ok = slurm(*common, f"--time={max_minutes}", check=False)
    assert ok.returncode == 0, f"a job at exactly MaxTime should be accepted: {ok.stderr}"
    refused = slurm(*common, f"--time={max_minutes + 1}", check=False)
    assert refused.returncode != 0, f"--time above MaxTime was accepted: {refused.stdout}{refused.stderr}"
    assert "time limit" in refused.stderr.lower(), refused.stderr


def test_scancel_gives_cancelled(tmp_path):
    job_id = sbatch("--time=5", "--job-name=stride-cancel", f"--chdir={tmp_path}",
                    f"--output={tmp_path / 'out.txt'}", "--wrap", "sleep 300")
    try:
        wait_for(lambda: squeue_state(job_id), lambda s: s == "RUNNING" or s is None, 60,
                 f"job {job_id} to start")
        slurm("scancel", job_id)
        state = wait_for(lambda: sacct_state(job_id), lambda s: s in TERMINAL, JOB_TIMEOUT_S,
                         f"sacct to record job {job_id} as finished")
        assert state == "CANCELLED"
        wait_for(lambda: squeue_state(job_id), lambda s: s is None, 60, f"job {job_id} to leave the queue")
    finally:
        slurm("scancel", job_id, check=False)
