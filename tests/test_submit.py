"""`stride submit` against the real local Slurm cluster: real sbatch, submitit, srun and gloo across two nodes."""
from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest

from conftest import read_json
from slurm_helpers import (job_state, needs_slurm, rank_process, run_status, squeue_ids, submitted, train_step,
                           wait_for, wait_gone)

pytestmark = [pytest.mark.slurm, needs_slurm]
CPU_JOB = ["--nodes", "2", "--tasks-per-node", "2", "--time", "10"]


def test_dry_run_prints_script_and_config_and_writes_nothing(tmp_path, stride):
    before = squeue_ids(tmp_path)
    proc = stride("submit", "work_dir=exp", *CPU_JOB, "--setup", "echo 'a; b'", "--dry-run", check=True)
    assert "#SBATCH --nodes=2" in proc.stdout and "#SBATCH --ntasks-per-node=2" in proc.stdout
    assert "--kill-on-bad-exit=1" in proc.stdout and "echo 'a; b'" in proc.stdout
    assert "\n#SBATCH --requeue\n" in proc.stdout  # `scontrol requeue` works even where JobRequeue=0
    assert "model_name: CNN" in proc.stdout
    assert not (tmp_path / "exp").exists()
    assert squeue_ids(tmp_path) == before


def test_two_node_job_trains_like_local_and_collects_every_log(tmp_path, stride):
    local = stride("local", "work_dir=local", "--nproc", "4", check=True)
    assert local.returncode == 0
    proc = stride("submit", "work_dir=exp", *CPU_JOB, "--sbatch", "begin=now+4")
    run, job_id = submitted(proc)
    seen = set()

    def finished():
        out = stride("status", "exp").stdout.splitlines()[1].split()
        seen.add(out[1])
        return out[1] in ("completed", "failed", "lost", "cancelled")

    wait_for(finished, timeout_s=300, interval_s=0.5, what="the job to finish")
    assert {"pending", "running", "completed"} <= seen, seen
    results = read_json(run / "results.json")
    local_results = read_json(tmp_path / "local" / "0" / "results.json")
    assert results["world_size"] == 4
    assert results["test_accuracy"] >= 0.95
    assert abs(results["test_accuracy"] - local_results["test_accuracy"]) <= 0.02
    hosts = set()
    for rank in range(4):
        log = (run / "logs" / f"rank_{rank}.log").read_text()
        assert f" rank {rank} local {rank % 2} INFO " in log
        hosts.add(log.split()[2])
        assert (run / "slurm" / f"{job_id}_{rank}_log.out").is_file()
        assert (run / "slurm" / f"{job_id}_{rank}_log.err").is_file()
    assert hosts == {"node1", "node2"}
    for rank in range(4):  # no --cpus-per-task: the node's two ranks share its CPUs
        mask, threads = rank_cpus(run, rank)
        assert threads == max(1, mask // 2), (rank, mask, threads)
    assert (run / "slurm" / f"{job_id}_submission.sh").is_file()
    metadata = read_json(run / "metadata.json")
    assert [j["job_id"] for j in metadata["jobs"]] == [job_id]
    assert not (run / "SUBMITTING").exists()
    detail = stride("status", str(run)).stdout
    assert "state:    completed" in detail and f"job:      {job_id}" in detail and "test_accuracy" in detail


def test_two_jobs_sharing_a_node_never_collide_on_the_rendezvous(tmp_path, stride):
    runs = [submitted(stride("submit", "work_dir=exp", "--nodes", "1", "--tasks-per-node", "2",
                             "--sbatch", "nodelist=node1", "training_kwargs.epochs=3")) for _ in range(2)]
    for run, job_id in runs:
        wait_gone(job_id, timeout_s=300)
        status = run_status(run)
        assert status["state"] == "completed", status
    ports = [json.loads(next((run / "rendezvous").glob("*.json")).read_text())["port"] for run, _ in runs]
    assert ports[0] != ports[1]


def test_cancel_ends_the_job_and_marks_the_run(tmp_path, stride):
    run, job_id = submitted(stride("submit", "work_dir=exp", *CPU_JOB, "training_kwargs.epochs=500"))
    wait_for(lambda: run_status(run).get("state") == "running", 120, what="the job to start training")
    proc = stride("cancel", str(run), check=True)
    assert f"cancelled job {job_id}" in proc.stdout
    wait_gone(job_id, timeout_s=60)
    assert run_status(run)["state"] == "cancelled"
    assert "cancelled" in stride("status", "exp").stdout
    again = stride("cancel", str(run))
    assert again.returncode == 2
    assert again.stderr.strip() == f"stride: error: run {run} is already cancelled (job {job_id}): nothing to cancel"


def test_job_cancelled_outside_stride_is_reported_cancelled(tmp_path, stride):
    import subprocess

    run, job_id = submitted(stride("submit", "work_dir=exp", *CPU_JOB, "training_kwargs.epochs=500"))
    wait_for(lambda: run_status(run).get("state") == "running", 120, what="the job to start training")
    subprocess.run(["scancel", job_id], check=True, timeout=30)
    wait_gone(job_id, timeout_s=60)
    assert "state:    cancelled" in stride("status", str(run)).stdout


def test_one_failing_rank_ends_the_job_fast_and_is_named(tmp_path, stride):
    (tmp_path / "crashy.py").write_text(
        "import os, torch\n"
        "class Crashy(torch.nn.Module):\n"
        "    def __init__(self, input_shape, num_outputs):\n"
        "        super().__init__(); self.lin = torch.nn.Linear(64, num_outputs); self.calls = 0\n"
        "    def forward(self, x):\n"
        "        self.calls += 1\n"
        "        if os.environ.get('SLURM_PROCID') == '2' and self.calls == 5:\n"
        "            raise ValueError('rank two broke on purpose')\n"
        "        return self.lin(x.flatten(1))\n")
    env = {"PYTHONPATH": str(tmp_path)}
    run, job_id = submitted(stride("submit", "work_dir=exp", *CPU_JOB, "model_kwargs.model_name=crashy:Crashy",
                                   "training_kwargs.epochs=200", env=env))
    wait_for(lambda: job_state(job_id) == "RUNNING", 120, what="the job to run")
    started = time.monotonic()
    wait_gone(job_id, timeout_s=120)
    assert time.monotonic() - started < 120
    status = run_status(run)
    assert status["state"] == "failed" and status["failed_rank"] == 2, status
    assert status["failed_host"] in ("node1", "node2")
    # Retried once in a fresh allocation, then not again for the same error.
    requeues = read_json(run / "metadata.json")["requeues"]
    assert [(r["reason"], r["requeue"], r["rank"]) for r in requeues] == [("crashed", True, 2), ("crashed", False, 2)]
    assert "same error as the previous attempt" in requeues[1]["why"]
    detail = stride("status", str(run)).stdout
    assert "state:    failed" in detail
    assert f"failed:   rank 2 on {status['failed_host']}: ValueError: rank two broke on purpose" in detail


@pytest.mark.parametrize("args, message", [
    (["--nodes", "0"], "--nodes must be a positive integer"),
    (["--gpus", "-1"], "--gpus must be zero or a positive integer"),
    (["--time", "999"], "SLURM refused the request: allocation failure: Requested time limit is invalid"),
    (["--partition", "nope"], "SLURM refused the request: allocation failure: Invalid partition name specified"),
    (["--account", "nobody"], "SLURM refused the request: allocation failure: Invalid account"),
    (["--nodes", "9"], "SLURM refused the request: allocation failure: More processors requested than permitted"),
    (["--profile", "no-such-site"], "unknown profile 'no-such-site'"),
    (["--time", "soon"], "--time 'soon' is not a time"),
])
def test_impossible_requests_fail_before_anything_is_submitted(tmp_path, stride, args, message):
    before = squeue_ids(tmp_path)
    proc = stride("submit", "work_dir=exp", *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stride: error: ") and message in lines[0], proc.stderr
    assert not (tmp_path / "exp").exists() or not any((tmp_path / "exp").iterdir())
    assert squeue_ids(tmp_path) == before


def test_missing_sbatch_is_one_clear_line(tmp_path, stride):
    import shutil
    import sys

    bare_path = os.pathsep.join([os.path.dirname(sys.executable), "/usr/local/sbin"])
    proc = stride("submit", "work_dir=exp", env={"PATH": bare_path})
    assert shutil.which("sbatch", path=bare_path) is None
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("stride: error: 'sbatch' is not on PATH: run stride submit on a SLURM login node "
                                   "(or `module load slurm`), or train here with `stride local`")
    assert not (tmp_path / "exp").exists()


def test_profiles_hold_site_defaults_and_flags_still_win(tmp_path, stride):
    site = tmp_path / "profiles"
    site.mkdir()
    (site / "mysite.yaml").write_text("slurm:\n  partition: long\n  time_min: 100\n  setup: ['module load cuda']\n"
                                      "training_kwargs:\n  epochs: 7\n")
    env = {"STRIDE_PROFILE_PATH": str(site)}
    proc = stride("submit", "work_dir=exp", "--profile", "mysite", "--time", "20", "--dry-run", "--skip-slurm-checks",
                  env=env, check=True)  # (the test cluster has no partition "long")
    assert "#SBATCH --partition=long" in proc.stdout and "#SBATCH --time=20" in proc.stdout
    assert "\nmodule load cuda\n" in proc.stdout and "epochs: 7" in proc.stdout
    # The repository's profile for the local test cluster, submitted for real.
    run, job_id = submitted(stride("submit", "work_dir=exp", "--profile", "local", "training_kwargs.epochs=1"))
    config = read_json(run / "config.json")
    assert config["slurm"]["partition"] == "debug" and config["slurm"]["account"] == "stride"
    wait_gone(job_id, timeout_s=300)
    assert run_status(run)["state"] == "completed"
    assert "#SBATCH --account=stride" in (run / "slurm" / f"{job_id}_submission.sh").read_text()


def test_a_rank_killed_without_an_exception_is_named(tmp_path, stride):
    """SIGKILL leaves no traceback: srun's report in the job log names the rank and node, and the run is failed."""
    run, job_id = submitted(stride("submit", "work_dir=exp", "--profile", "local", "--nodes", "2",
                                   "--tasks-per-node", "2", "training_kwargs.epochs=500"))
    wait_for(lambda: train_step(run) >= 20, 180, 0.2, what="the job to train 20 steps")
    pid, node = rank_process(job_id, rank=1)
    os.kill(pid, signal.SIGKILL)
    started = time.monotonic()
    wait_gone(job_id, timeout_s=120)
    assert time.monotonic() - started < 120
    assert read_json(run / "metadata.json").get("requeues") is None  # nothing says what broke: not retried
    detail = stride("status", str(run)).stdout
    assert "state:    failed" in detail, detail
    assert f"failed:   rank 1 on {node}: died without a Python exception: srun: task 1: Killed (SIGKILL" in detail
    assert stride("status", "exp").stdout.splitlines()[1].split()[1] == "failed"


def rank_cpus(run, rank: int) -> tuple[int, int]:
    """(CPUs in the rank's affinity mask, its torch threads), from the line every rank logs first."""
    line = next(line for line in (run / "logs" / f"rank_{rank}.log").read_text().splitlines() if " INFO cpus " in line)
    found = re.search(r" INFO cpus \S+ \((\d+) of \d+\), (\d+) torch threads$", line)
    assert found, line
    return int(found.group(1)), int(found.group(2))


def test_each_rank_gets_the_cpus_per_task_it_asked_for(tmp_path, stride):
    """srun restates --cpus-per-task (Slurm >= 22.05 no longer passes the allocation's on to the step), and each rank
    sizes its torch threads from it."""
    proc = stride("submit", "work_dir=exp", "--profile", "local", "--nodes", "1", "--tasks-per-node", "2",
                  "--cpus-per-task", "2", "training_kwargs.epochs=1", env={"OMP_NUM_THREADS": ""})
    run, job_id = submitted(proc)
    script = (run / "slurm" / f"{job_id}_submission.sh").read_text()
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert " --kill-on-bad-exit=1 --cpus-per-task=2 " in srun, srun
    wait_gone(job_id)
    assert read_json(run / "status.json")["state"] == "completed"
    for rank in range(2):
        mask, threads = rank_cpus(run, rank)
        assert threads == min(2, mask), (rank, mask, threads)
