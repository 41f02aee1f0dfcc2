"""Pure SLURM helpers: --time and --mem as sbatch reads them, the sbatch parameters, and srun's log lines."""
from __future__ import annotations

import pytest

from stride.config import SlurmKwargs
from stride.errors import ConfigError
from stride.slurm import (dead_task, job_ending, last_attempt, make_sbatch_text, mem_text, parse_mem_gb,
                          parse_time_min, submitit_parameters)


@pytest.mark.parametrize("value, minutes", [
    (90, 90), ("90", 90), ("45:00", 45), ("0:30", 1), ("1:30", 2), ("1:30:00", 90), ("0:00:01", 1),
    ("1-12", 2160), ("1-12:30", 2190), ("2-00:00:00", 2880), ("1-0:0:30", 1441), (" 1-12 ", 2160), (90.0, 90),
])
def test_time_takes_every_sbatch_form(value, minutes):
    assert parse_time_min(value) == minutes


@pytest.mark.parametrize("value, message", [
    ("-5", "--time must be positive, got '-5'"), (-5, "--time must be positive, got -5"),
    ("0", "--time must be positive"), ("0:00", "--time must be positive"), ("soon", "--time 'soon' is not a time"),
    ("1-", "is not a time"), ("-1-2", "is not a time"), ("1:2:3:4", "is not a time"), ("1-1:2:3:4", "is not a time"),
    ("1.5", "is not a time"), (1.5, "is not a time"), ("1:30:00.5", "is not a time"), ("", "is not a time"),
    (True, "is not a time"), ("1-12h", "is not a time"),
])
def test_bad_times_are_one_clear_error(value, message):
    with pytest.raises(ConfigError) as caught:
        parse_time_min(value)
    assert message in str(caught.value) and "D-HH:MM:SS" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("value, gb", [
    (16, 16.0), ("16", 16.0), ("16G", 16.0), ("16gb", 16.0), ("500M", 500 / 1024), ("1T", 1024.0),
    ("2048K", 2 / 1024), ("0.5", 0.5), (".5G", 0.5), ("1024KB", 1 / 1024),
])
def test_memory_units(value, gb):
    assert parse_mem_gb(value) == pytest.approx(gb)


@pytest.mark.parametrize("value, message", [
    ("500K", "is below 1 MB"), ("0", "is below 1 MB"), (0, "is below 1 MB"), ("0.0001", "is below 1 MB"),
    ("1.2.3", "is not a memory size"), ("16B", "is not a memory size"), ("-1", "is not a memory size"),
    (-1, "is not a memory size"), ("16 GiB", "is not a memory size"), ("lots", "is not a memory size"),
])
def test_bad_memory_is_refused(value, message):
    with pytest.raises(ConfigError, match=message):
        parse_mem_gb(value)


@pytest.mark.parametrize("value, text", [
    ("16G", "16GB"), ("500M", "500MB"), ("1500K", "2MB"), ("1024K", "1MB"), ("1025K", "2MB"), ("1.5G", "1536MB"),
])
def test_memory_is_never_written_as_zero(value, text):
    assert mem_text(parse_mem_gb(value)) == text


def slurm_section(**changes) -> dict:
    from dataclasses import asdict

    return {**asdict(SlurmKwargs()), "nodes": 2, "tasks_per_node": 2, "time_min": 10, **changes}


def test_jobs_ask_to_be_requeueable(tmp_path):
    params = submitit_parameters(slurm_section(), "stride-exp")
    text = make_sbatch_text(params, tmp_path / "a folder")
    assert "\n#SBATCH --requeue\n" in text and "--no-requeue" not in text
    assert "\n#SBATCH --mem=" not in text
    refused = submitit_parameters(slurm_section(sbatch_args={"no-requeue": True}), "stride-exp")
    assert "requeue" not in refused["additional_parameters"]
    with pytest.raises(ConfigError, match="below 1 MB"):
        submitit_parameters(slurm_section(mem_gb=1e-6), "stride-exp")


# What srun and slurmstepd wrote into a real job's stderr (job 44 on the local cluster: rank 1 got kill -9).
KILLED_LOG = """\
stride: attempt slurm-44-0 (job 44) starting on node1
[rank0]: RuntimeError: [../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.11]:29065: Connection reset by peer.
slurmstepd-node1: error: *** STEP 44.0 ON node1 CANCELLED AT 2026-12-01T16:32:11 ***
srun: error: node1: task 0: Terminated
srun: launch/slurm: _step_signal: Terminating StepId=44.0
srun: error: node1: task 1: Killed
srun: error: node2: tasks 2-3: Exited with exit code 1
"""


def test_srun_names_the_task_that_died_by_a_signal():
    assert dead_task(KILLED_LOG) == {"rank": 1, "node": "node1", "how": "Killed", "tasks": "1"}
    assert job_ending(KILLED_LOG) is None  # a STEP line: srun ended the step, nobody cancelled the job
    exited = "srun: error: node2: tasks 2-3: Exited with exit code 3\nsrun: error: node1: task 0: Terminated\n"
    assert dead_task(exited) == {"rank": 2, "node": "node2", "how": "Exited with exit code 3", "tasks": "2-3"}
    assert dead_task("srun: error: node1: task 0: Segmentation fault (core dumped)\n")["how"].startswith("Segm")
    assert dead_task("srun: error: node1: task 0: Terminated\n") is None
    assert dead_task("all good\n") is None


def test_only_the_latest_attempt_of_a_requeued_job_counts():
    log = ("stride: attempt slurm-7-0 (job 7) starting on node1\nsrun: error: node1: task 1: Killed\n"
           "slurmstepd-node1: error: *** JOB 7 ON node1 CANCELLED AT 2026-01-01T00:00:00 DUE TO JOB REQUEUE ***\n"
           "stride: attempt slurm-7-1 (job 7) starting on node2\n")
    assert dead_task(last_attempt(log)) is None and last_attempt(log).startswith("stride: attempt slurm-7-1")
    assert job_ending(log) is None  # a requeue is not how the job ended
    for why, state in (("", "cancelled"), (" DUE TO TIME LIMIT", "timeout"), (" DUE TO PREEMPTION", "preempted"),
                       (" DUE TO NODE FAILURE", "node_fail")):
        assert job_ending(f"slurmstepd: error: *** JOB 7 ON node1 CANCELLED AT 2026-01-01T00:00:00{why} ***\n") == state
