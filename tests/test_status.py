"""`stride status` from a run folder and a given queue/accounting answer (pure: no cluster needed)."""
from __future__ import annotations

import json

from stride.rundir import RunDir
from stride.status import describe, format_detail
from test_slurm_parsing import KILLED_LOG


def slurm_run(tmp_path, job_id: str = "44", log: str = "", **status) -> RunDir:
    run = RunDir(tmp_path / "exp" / "0")
    (run.path / "slurm").mkdir(parents=True)
    (run.path / "config.json").write_text(json.dumps({"training_kwargs": {"epochs": 5}}))
    (run.path / "status.json").write_text(json.dumps({"state": "running", "launcher": "slurm", "job_id": job_id,
                                                      **status}))
    (run.path / "slurm" / f"{job_id}_0_log.err").write_text(log)
    return run


def test_a_rank_killed_by_a_signal_is_named_even_without_sacct(tmp_path):
    run = slurm_run(tmp_path, log=KILLED_LOG)
    row = describe(run, queue={}, accounting={})
    assert row["state"] == "failed"
    assert row["failure"]["failed_rank"] == 1 and row["failure"]["failed_host"] == "node1"
    assert "failed:   rank 1 on node1: died without a Python exception: srun: task 1: Killed" in format_detail(row)
    # With accounting the state comes from sacct, the rank still from srun's report.
    assert describe(run, queue={}, accounting={"44": {"state": "FAILED"}})["failure"]["failed_rank"] == 1
    # A rank that only lost its peers recorded no cause: srun's report still names the one that died.
    lost = slurm_run(tmp_path / "b", log=KILLED_LOG, state="failed", failed_rank=None,
                     error="lost contact with another rank: RuntimeError: Connection reset by peer")
    assert describe(lost, queue={}, accounting={})["failure"]["failed_host"] == "node1"


def test_a_recorded_exception_and_a_cancellation_are_left_as_they_are(tmp_path):
    run = slurm_run(tmp_path, log=KILLED_LOG, state="failed", failed_rank=2, failed_host="node2",
                    error="ValueError: broke")
    assert "rank 2 on node2: ValueError: broke" in format_detail(describe(run, queue={}, accounting={}))
    cancelled = slurm_run(tmp_path / "b", log=KILLED_LOG)
    assert describe(cancelled, queue={}, accounting={"44": {"state": "CANCELLED"}})["state"] == "cancelled"


def test_a_run_stopped_by_a_signal_is_not_called_completed_by_its_clean_job_exit(tmp_path):
    stopped = slurm_run(tmp_path, state="stopped", epoch=2)
    assert describe(stopped, queue={}, accounting={"44": {"state": "COMPLETED"}})["state"] == "stopped"
    assert describe(stopped, queue={}, accounting={"44": {"state": "TIMEOUT"}})["state"] == "timeout"


def test_a_step_ended_by_srun_is_not_a_cancelled_job(tmp_path):
    step_only = "slurmstepd-node1: error: *** STEP 44.0 ON node1 CANCELLED AT 2026-12-01T16:32:11 ***\n"
    assert describe(slurm_run(tmp_path, log=step_only), queue={}, accounting={})["state"] == "lost"
    job = "slurmstepd-node1: error: *** JOB 44 ON node1 CANCELLED AT 2026-12-01T16:32:11 ***\n"
    assert describe(slurm_run(tmp_path / "b", log=job), queue={}, accounting={})["state"] == "cancelled"


def test_a_queued_array_task_is_pending(tmp_path):
    run = slurm_run(tmp_path, job_id="45_1", state="pending")
    queue = {"45_1": {"state": "PENDING", "nodes": "", "elapsed": "0:00", "reason": "JobArrayTaskLimit"}}
    assert describe(run, queue=queue, accounting={})["state"] == "pending"


def test_sort_puts_the_best_first_whatever_the_metric_is_called():
    from stride.status import sort_rows

    rows = [{"name": n, "metrics": m} for n, m in (("a", {"val_loss": 0.5, "val_f1": 0.7}),
                                                   ("b", {"val_loss": 0.2, "val_f1": 0.9}),
                                                   ("c", {}))]
    assert [r["name"] for r in sort_rows(rows, "val_loss")] == ["b", "a", "c"]
    assert [r["name"] for r in sort_rows(rows, "val_f1")] == ["b", "a", "c"]
