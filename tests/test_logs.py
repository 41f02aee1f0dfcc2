"""`stride logs` on a real SLURM run: a rank's own log, the task's SLURM stdout/stderr, and --follow ending with the
run. Every wait is bounded."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import cli_env
from slurm_helpers import needs_slurm, run_status, submitted, wait_gone
from stride.slurm import ATTEMPT_MARK

pytestmark = [pytest.mark.slurm, needs_slurm]
FOLLOW_TIMEOUT_S = 300  # submission to the end of a 3-epoch job, plus follow's quiet period


def test_logs_of_a_slurm_run_by_rank_and_stream_and_followed_to_the_end(tmp_path, stride):
    run, job_id = submitted(stride("submit", "work_dir=exp", "--nodes", "1", "--tasks-per-node", "2",
                                   "training_kwargs.epochs=3"))
    # Started while the job is still pending: it waits for the log to appear, prints it, and ends with the run.
    follower = subprocess.Popen([sys.executable, "-m", "stride", "logs", str(run), "--rank", "1", "--follow"],
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    try:
        followed, errors = follower.communicate(timeout=FOLLOW_TIMEOUT_S)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.communicate(timeout=30)
    assert follower.returncode == 0, errors
    wait_gone(job_id, timeout_s=60)
    assert run_status(run)["state"] == "completed"
    rank_log = (run / "logs" / "rank_1.log").read_text()
    assert followed == rank_log and " rank 1 local 1 INFO " in followed
    assert stride("logs", str(run), "--rank", "1", check=True).stdout == rank_log
    assert " rank 0 local 0 INFO " in stride("logs", str(run), check=True).stdout

    out = stride("logs", str(run), "--rank", "1", "--slurm", "out", check=True).stdout
    assert out == (run / "slurm" / f"{job_id}_1_log.out").read_text() and "global_rank=1(2)" in out
    err = stride("logs", str(run), "--slurm", "err", check=True).stdout
    assert err == (run / "slurm" / f"{job_id}_0_log.err").read_text()
    assert f"{ATTEMPT_MARK}slurm-{job_id}-0" in err  # rank 0's stderr is also the batch script's

    for args, message in ((["--slurm", "both"], "--slurm takes out or err, not 'both'"),
                          (["--rank", "7"], "no log at "), (["--rank", "-1"], "--rank")):
        proc = stride("logs", str(run), *args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("stride: error: "), proc.stderr
        assert message in lines[0]
