"""Preemption, time limits and `stride resume` on the real local Slurm: the requeued run is the same run."""
from __future__ import annotations

import subprocess

import pytest

from conftest import read_json, read_jsonl
from slurm_helpers import (job_state, needs_slurm, processes_of_job, run_status, submitted, train_step,
                           wait_for, wait_gone)
from test_resume import assert_bitwise_equal

pytestmark = [pytest.mark.slurm, needs_slurm]
JOB = ["--nodes", "2", "--tasks-per-node", "2", "--time", "10"]
# Deterministic, 4 ranks, one DataLoader worker each (they must survive the signal and die with the job).
EXACT = ["training_kwargs.deterministic=true", "training_kwargs.epochs=25", "load_data_kwargs.batch_size=8",
         "training_kwargs.log_every_steps=10", "load_data_kwargs.num_workers=1"]


def scontrol(*args: str) -> None:
    subprocess.run(["scontrol", *args], check=True, timeout=30, capture_output=True)


def test_usr2_checkpoints_requeues_and_resumes_to_the_same_weights(tmp_path, stride):
    whole, whole_job = submitted(stride("submit", "work_dir=whole", *EXACT, *JOB))
    cut, job_id = submitted(stride("submit", "work_dir=cut", *EXACT, *JOB))
    wait_for(lambda: train_step(cut) >= 150, 240, 0.2, what="the job to train 150 steps")
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)

    wait_for(lambda: job_state(job_id) == "PENDING", 90, 0.2, what="the job to be requeued")
    assert stride("status", "cut").stdout.splitlines()[1].split()[1] == "requeued"
    wait_for(lambda: not processes_of_job(job_id), 5, 0.2, what="every process of the first attempt to end")
    requeues = read_json(cut / "metadata.json")["requeues"]
    assert [(r["reason"], r["requeue"], r["signal"]) for r in requeues] == [("preempted", True, "SIGUSR2")]
    stopped_at = requeues[0]["step"]
    assert 150 <= stopped_at < run_status(cut)["total_steps"]

    scontrol("update", f"JobId={job_id}", "StartTime=now")  # skip Slurm's requeue delay
    wait_gone(job_id, timeout_s=300)
    wait_gone(whole_job, timeout_s=300)
    assert run_status(cut)["state"] == "completed" and run_status(whole)["state"] == "completed"
    assert_bitwise_equal(whole, cut)

    metadata = read_json(cut / "metadata.json")
    assert [(a["job_id"], a["restart"]) for a in metadata["attempts"]] == [(job_id, 0), (job_id, 1)]
    rank_log = (cut / "logs" / "rank_3.log").read_text()
    assert "stopping at epoch" in rank_log and f"step {stopped_at}" in rank_log and "resumed from" in rank_log
    steps = [r["step"] for r in read_jsonl(cut / "metrics.jsonl") if r["split"] == "train"]
    assert steps == [r["step"] for r in read_jsonl(whole / "metrics.jsonl") if r["split"] == "train"]


def test_a_real_preemption_checkpoints_requeues_and_resumes_to_the_same_weights(tmp_path, stride):
    """A job in the higher-tier `urgent` partition takes both nodes: Slurm sends SIGTERM and starts GraceTime; stride
    sees the job's PreemptTime, checkpoints, requeues it and the run continues as if nothing happened."""
    cut, job_id = submitted(stride("submit", "work_dir=cut", *EXACT, *JOB))
    wait_for(lambda: train_step(cut) >= 100, 240, 0.2, what="the job to train 100 steps")
    urgent = subprocess.run(["sbatch", "--parsable", "--partition", "urgent", "--nodes", "2", "--exclusive",
                             "--time", "2", "--output", str(tmp_path / "urgent.out"), "--wrap", "sleep 5"],
                            check=True, capture_output=True, text=True, timeout=30).stdout.strip()
    whole, whole_job = submitted(stride("submit", "work_dir=whole", *EXACT, *JOB))

    wait_for(lambda: read_json(cut / "metadata.json").get("requeues"), 90, 0.2, what="a recorded decision")
    requeues = read_json(cut / "metadata.json")["requeues"]
    assert [(r["reason"], r["requeue"], r["signal"]) for r in requeues] == [("preempted", True, "SIGTERM")]
    wait_for(lambda: job_state(job_id) == "PENDING", 60, 0.2, what="the preempted job to be requeued")
    wait_for(lambda: not processes_of_job(job_id), 10, 0.2, what="every process of the preempted attempt to end")
    assert stride("status", "cut").stdout.splitlines()[1].split()[1] == "requeued"
    stopped_at = requeues[0]["step"]
    assert 100 <= stopped_at < run_status(cut)["total_steps"]

    wait_gone(urgent, timeout_s=120)
    scontrol("update", f"JobId={job_id}", "StartTime=now")  # skip Slurm's requeue delay
    wait_gone(job_id, timeout_s=300)
    wait_gone(whole_job, timeout_s=300)
    assert run_status(cut)["state"] == "completed" and run_status(whole)["state"] == "completed"
    assert_bitwise_equal(whole, cut)
    attempts = read_json(cut / "metadata.json")["attempts"]
    assert [(a["job_id"], a["restart"]) for a in attempts] == [(job_id, 0), (job_id, 1)]
    assert "resumed from" in (cut / "logs" / "rank_0.log").read_text()


def test_time_limit_stops_with_a_checkpoint_and_respects_the_requeue_bound(tmp_path, stride):
    # A one-minute job warned 45 s before its limit; no timeout requeue allowed.
    run, job_id = submitted(stride("submit", "work_dir=exp", "--nodes", "1", "--tasks-per-node", "2", "--time", "1",
                                   "slurm.signal_delay_s=45", "slurm.max_timeout_requeues=0",
                                   "training_kwargs.epochs=10000", "load_data_kwargs.batch_size=8"))
    wait_gone(job_id, timeout_s=180)
    requeues = read_json(run / "metadata.json")["requeues"]
    assert [(r["reason"], r["requeue"]) for r in requeues] == [("timeout", False)], requeues
    assert "max_timeout_requeues=0" in requeues[0]["why"]
    assert run_status(run)["state"] == "timeout"
    assert (run / "checkpoints" / "latest").is_file()
    detail = stride("status", str(run)).stdout
    assert "state:    timeout" in detail


def test_cancelled_run_resumes_on_slurm_with_its_own_resources(tmp_path, stride):
    run, job_id = submitted(stride("submit", "work_dir=exp", *JOB, "training_kwargs.epochs=6",
                                   "load_data_kwargs.batch_size=8", "training_kwargs.checkpoint_every_steps=20"))
    wait_for(lambda: train_step(run) >= 60, 240, 0.2, what="the job to train 60 steps")
    busy = stride("resume", str(run))
    assert busy.returncode == 2 and f"still has SLURM job {job_id} (running)" in busy.stderr, busy.stderr
    stride("cancel", str(run), check=True)
    wait_gone(job_id, timeout_s=60)
    assert "state:    cancelled" in stride("status", str(run)).stdout

    proc = stride("resume", str(run), "--time", "5", "training_kwargs.epochs=7", check=True)
    new_job = proc.stdout.split("submitted job ")[1].split()[0]
    assert new_job != job_id
    wait_gone(new_job, timeout_s=300)
    assert run_status(run)["state"] == "completed"
    config = read_json(run / "config.json")
    assert config["slurm"]["nodes"] == 2 and config["slurm"]["tasks_per_node"] == 2
    assert config["slurm"]["time_min"] == 5 and config["training_kwargs"]["epochs"] == 7
    metadata = read_json(run / "metadata.json")
    assert [j["job_id"] for j in metadata["jobs"]] == [job_id, new_job]
    assert metadata["amendments"][-1]["changes"] == {"slurm.time_min": [10, 5], "training_kwargs.epochs": [6, 7]}
    assert read_json(run / "results.json")["world_size"] == 4
    assert (run / "slurm" / f"{new_job}_0_log.out").is_file()


def test_usr2_before_the_trainer_exists_goes_through_strides_decision(tmp_path, stride):
    """A USR2 while the data loads is stride's to handle (flag, then checkpoint, decision and requeue), not
    submitit's (which would requeue with nothing recorded)."""
    loading = tmp_path / "loading"
    (tmp_path / "slowdata.py").write_text(
        "import os, pathlib, time\n"
        "from stride.datasets.builtin import digits\n"
        "def slow_digits(marker: str = ''):\n"
        "    if os.environ.get('SLURM_JOB_ID'):  # the job's load, not the pre-run check `stride submit` makes\n"
        "        pathlib.Path(marker).touch()\n"
        "        time.sleep(8)\n"
        "    return digits()\n")
    env = {"PYTHONPATH": str(tmp_path)}
    run, job_id = submitted(stride("submit", "work_dir=exp", "--nodes", "1", "--tasks-per-node", "1", "--time", "10",
                                   "dataset_kwargs.dataset_name=slowdata:slow_digits",
                                   f"dataset_kwargs.marker={loading}", "training_kwargs.epochs=50", env=env))
    try:
        wait_for(loading.exists, 120, 0.2, what="the job to start loading its data")
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
        wait_for(lambda: read_json(run / "metadata.json").get("requeues"), 90, 0.5, what="a recorded decision")
        requeues = read_json(run / "metadata.json")["requeues"]
        assert [(r["reason"], r["requeue"], r.get("signal")) for r in requeues] == [("preempted", True, "SIGUSR2")]
        wait_for(lambda: job_state(job_id) == "PENDING", 60, 0.2, what="the job to be requeued")
        assert run_status(run)["state"] == "requeued" and (run / "checkpoints" / "latest").is_file()
    finally:
        subprocess.run(["scancel", job_id], timeout=30)
    wait_gone(job_id, timeout_s=60)
