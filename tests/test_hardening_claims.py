"""One writer per run, and honest states after any interruption: real `stride` processes racing, killed and
interrupted twice (issue 18, items 2 and 4). Training is tiny: a linear model that sleeps a few ms a step."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import cli_env, read_json, read_jsonl, run_stride, start_stride
from slurm_helpers import job_state, needs_slurm, wait_gone

SLOW = """
import time, torch
class Slow(torch.nn.Module):  # a few ms a training step: slow enough to race and interrupt, fast enough to finish
    def __init__(self, input_shape, num_outputs, delay_s: float = 0.004):
        super().__init__()
        self.lin, self.delay_s = torch.nn.Linear(64, num_outputs), delay_s
    def forward(self, x):
        if self.training:
            time.sleep(self.delay_s)
        return self.lin(x.flatten(1))
"""
TINY = ["model_kwargs.model_name=slow:Slow", "load_data_kwargs.batch_size=16", "training_kwargs.log_every_steps=10"]


def slow_env(folder: Path) -> dict:
    (folder / "slow.py").write_text(SLOW)
    return {"PYTHONPATH": str(folder)}


def wait_for(condition, what: str, proc: subprocess.Popen | None = None, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        assert proc is None or proc.poll() is None, f"stride ended (code {proc.returncode}) before {what}"
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def trained_steps(run: Path) -> list[tuple[str, int]]:
    try:
        return [(r["split"], r["step"]) for r in read_jsonl(run / "metrics.jsonl")]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stride: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory) -> Path:
    """A completed one-epoch run: `stride resume --local training_kwargs.epochs=N` continues it."""
    folder = tmp_path_factory.mktemp("one_epoch")
    run_stride("local", "work_dir=exp", *TINY, "training_kwargs.epochs=1", cwd=folder, env=slow_env(folder),
               check=True)
    return folder / "exp" / "0"


def copy_run(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "exp" / "0"
    shutil.copytree(run, target)
    return target


def test_two_resumes_started_together_one_trains_and_the_other_refuses_at_once(tmp_path, one_epoch):
    run = copy_run(one_epoch, tmp_path)
    argv = [sys.executable, "-m", "stride", "resume", str(run), "--local", "training_kwargs.epochs=4"]
    env = cli_env(slow_env(tmp_path))
    procs = [subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    ended: dict[int, float] = {}
    outputs: dict[int, tuple[str, str]] = {}

    def drain(index: int) -> None:
        outputs[index] = procs[index].communicate(timeout=300)
        ended[index] = time.monotonic()

    readers = [threading.Thread(target=drain, args=(i,)) for i in range(2)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(timeout=320)
    assert sorted(p.returncode for p in procs) == [0, 2], outputs
    winner, loser = (0, 1) if procs[0].returncode == 0 else (1, 0)
    line = one_error_line(outputs[loser][1])
    assert line.startswith(f"stride: error: run {run} is being ")
    assert f" by pid {procs[winner].pid} on host {socket.gethostname()} since " in line
    assert "wait for it, or stop it" in line
    assert ended[loser] < ended[winner]  # refused while the other was still training, not after it
    # One continuous story: each step once, one resume, one more attempt than the first run's.
    steps = trained_steps(run)
    assert len(steps) == len(set(steps)), steps
    assert [step for split, step in steps if split == "val"] == sorted({s for sp, s in steps if sp == "val"})
    assert len([1 for split, _ in steps if split == "val"]) == 4
    metadata = read_json(run / "metadata.json")
    assert len(metadata["attempts"]) == 2 and len(metadata["resumes"]) == 1
    assert read_json(run / "status.json")["state"] == "completed"
    assert not list((run / "claims").glob("*.json"))  # the winner let go when it finished


def test_a_killed_run_is_not_running_forever_and_its_claim_is_taken_over(tmp_path, stride):
    env = slow_env(tmp_path)
    proc = start_stride("local", "work_dir=exp", *TINY, "training_kwargs.epochs=3",
                        "training_kwargs.checkpoint_every_steps=20", cwd=tmp_path, env=env)
    run = tmp_path / "exp" / "0"
    wait_for(lambda: (run / "checkpoints" / "latest").is_file(), "a first checkpoint", proc)
    (claim_file,) = (run / "claims").glob("*.json")
    assert read_json(claim_file)["pid"] == proc.pid
    proc.kill()  # SIGKILL: no handler, no finaliser, no atexit runs
    proc.wait(timeout=30)
    assert read_json(run / "status.json")["state"] == "running"  # what it left behind

    shown = stride("status", str(run), check=True).stdout
    assert "state:    lost" in shown and f"pid {proc.pid} on host {socket.gethostname()} is gone" in shown, shown
    assert "lost" in stride("status", str(tmp_path / "exp"), check=True).stdout
    follow = stride("logs", str(run), "--follow", timeout=60)  # the run's process is gone: it ends
    assert follow.returncode == 0 and "rank 0 local 0 INFO" in follow.stdout, follow.stderr

    resumed = stride("resume", str(run), "--local", env=env, check=True)
    assert "test_accuracy=" in resumed.stdout
    (takeover,) = read_json(run / "metadata.json")["claim_takeovers"]
    assert takeover["from"]["pid"] == proc.pid and "is gone" in takeover["why"]
    assert read_json(run / "status.json")["state"] == "completed"
    steps = trained_steps(run)
    assert len(steps) == len(set(steps))


def fake_claim(run: Path, host: str = "node-elsewhere", age_s: float = 0.0, number: int = 0, **info) -> Path:
    """A claim as another host's process would leave it (its pids mean nothing here: judged by its heartbeat)."""
    folder = run / "claims"
    folder.mkdir(exist_ok=True)
    record = {"token": f"fake-{number}", "host": host, "pid": 4242, "pids": [{"pid": 4242, "start": None}],
              "boot_id": "another-boot", "pid_ns": "pid:[1]", "launcher": "slurm", "job_id": "977",
              "attempt": "slurm-977-0", "purpose": "train", "started_at": "2026-12-01T10:00:00+0000", **info}
    path = folder / f"{number}.json"
    path.write_text(json.dumps(record))
    if age_s:
        os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def test_a_claim_held_on_another_host_refuses_until_its_heartbeat_is_stale(tmp_path, stride, one_epoch):
    run = copy_run(one_epoch, tmp_path)
    claim = fake_claim(run, launcher="torchrun", job_id=None, attempt="torchrun-1")
    config_before = (run / "config.json").read_text()
    for args in (["--local"], []):  # on SLURM too: refused before anything is submitted
        line = one_error_line(stride("resume", str(run), *args, "training_kwargs.epochs=2").stderr)
        assert (f"run {run} is being trained by pid 4242 on host node-elsewhere since 2026-12-01T10:00:00+0000: "
                f"wait for it, or stop it (Ctrl-C where it runs, or kill -INT 4242)") in line
    assert (run / "config.json").read_text() == config_before and "resumes" not in read_json(run / "metadata.json")

    from stride.claim import STALE_AFTER_S

    os.utime(claim, (time.time() - STALE_AFTER_S - 60,) * 2)  # its holder stopped beating two minutes ago
    stride("resume", str(run), "--local", "training_kwargs.epochs=2", env=slow_env(tmp_path), check=True)
    (takeover,) = read_json(run / "metadata.json")["claim_takeovers"]
    assert takeover["from"]["host"] == "node-elsewhere" and "no heartbeat" in takeover["why"]
    assert not claim.exists()


@needs_slurm
def test_a_fresh_claim_of_a_slurm_job_that_left_the_queue_is_taken_over_at_once(tmp_path, stride, one_epoch):
    """A job killed before its rank 0 let go (scancel's SIGKILL after KillWait) leaves a claim with a fresh heartbeat;
    squeue, asked by `stride resume`, says its job is over, so the resume does not wait minutes for it to go stale."""
    run = copy_run(one_epoch, tmp_path)
    held = submitted_sleeper(tmp_path)
    try:
        fake_claim(run, job_id=held)  # a job the queue still runs: its claim stands
        line = one_error_line(stride("resume", str(run), "--local", "training_kwargs.epochs=2").stderr)
        assert f"(job {held}): wait for it, or `stride cancel {run}`" in line
    finally:
        subprocess.run(["scancel", held], check=True, timeout=30)
    wait_gone(held, timeout_s=60)
    claim = fake_claim(run, job_id=held)  # touched just now: on another host, its heartbeat alone would keep it
    stride("resume", str(run), "--local", "training_kwargs.epochs=2", env=slow_env(tmp_path), check=True)
    (takeover,) = read_json(run / "metadata.json")["claim_takeovers"]
    assert takeover["why"] == f"its SLURM job {held} has left the queue", takeover
    assert not claim.exists() and read_json(run / "status.json")["state"] == "completed"


def submitted_sleeper(folder: Path) -> str:
    """A real job that just sleeps, so its id is one squeue reports as running."""
    out = subprocess.run(["sbatch", "--parsable", "--time", "2", f"--output={folder}/sleeper.out", "--wrap",
                          "sleep 120"], capture_output=True, text=True, check=True, timeout=30).stdout
    job_id = out.strip().split(";")[0]
    wait_for(lambda: job_state(job_id) == "RUNNING", f"job {job_id} to run", timeout_s=60)
    return job_id


CLAIM_FROM_ANOTHER_PROCESS = """
import sys
from stride import claim
from stride.rundir import RunDir
try:
    claim.acquire(RunDir(sys.argv[1]), "slurm", job_id="56", attempt="slurm-56-0")
except claim.ClaimRefused as exc:
    print(exc)
    sys.exit(3)
"""


def test_a_requeued_attempt_takes_over_its_own_jobs_claim_and_no_other_jobs(tmp_path):
    from stride import claim as claim_lib
    from stride.rundir import RunDir

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    fake_claim(run.path, job_id="55", attempt="slurm-55-0")
    with pytest.raises(claim_lib.ClaimRefused, match=r"on host node-elsewhere .*\(job 55\)"):
        claim_lib.acquire(run, "slurm", job_id="56", attempt="slurm-56-0")
    claim = claim_lib.acquire(run, "slurm", job_id="55", attempt="slurm-55-1")
    try:
        assert claim_lib.current(run).token == claim.token
        (takeover,) = run.read_metadata()["claim_takeovers"]
        assert takeover["why"] == "attempt slurm-55-0 of the same job 55 was requeued"
        # Held by this process (alive, on this host): another process is refused at once, naming it.
        other = subprocess.run([sys.executable, "-c", CLAIM_FROM_ANOTHER_PROCESS, str(run.path)], capture_output=True,
                               text=True, timeout=60, env=cli_env())
        assert other.returncode == 3 and f"pid {os.getpid()} on host {socket.gethostname()}" in other.stdout, other
    finally:
        claim.release()
    assert claim_lib.current(run) is None


def test_a_slurm_attempt_waits_for_the_resume_that_submitted_it(tmp_path):
    from stride import claim as claim_lib
    from stride.rundir import RunDir

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    resume = fake_claim(run.path, purpose="resume", job_id=None, attempt=None)
    with pytest.raises(claim_lib.ClaimRefused, match="is being resumed by pid 4242"):
        claim_lib.acquire(run, "slurm", job_id="60", attempt="slurm-60-0", wait_for_resume_s=0.5)
    threading.Timer(1.0, resume.unlink).start()  # the submitter lets go once it recorded the job id
    started = time.monotonic()
    claim = claim_lib.acquire(run, "slurm", job_id="60", attempt="slurm-60-0", wait_for_resume_s=30)
    claim.release()
    assert 0.9 < time.monotonic() - started < 10


@pytest.mark.parametrize("nproc, moment, signals", [
    (1, "starting", ("SIGINT", "SIGINT")),
    (1, "training", ("SIGINT", "SIGINT")),
    (2, "starting", ("SIGINT", "SIGINT")),
    (2, "training", ("SIGINT", "SIGINT")),
    (2, "starting", ("SIGTERM",)),
])
def test_an_interrupted_run_is_left_in_a_final_state_and_follow_ends(tmp_path, stride, nproc, moment, signals):
    """A second Ctrl-C 30-60 ms after the first (or a SIGTERM as the run starts): the run ends `stopped` with
    ended_at, the command exits 128+signal, and `stride logs --follow` returns."""
    proc = start_stride("local", "work_dir=exp", *TINY, "training_kwargs.epochs=3", "--nproc", str(nproc),
                        cwd=tmp_path, env=slow_env(tmp_path))
    run = tmp_path / "exp" / "0"
    if moment == "starting":
        wait_for(lambda: (run / "status.json").is_file(), "the run folder", proc)
    else:
        wait_for(lambda: ("train", 10) in trained_steps(run), "a first train record", proc)
    for index, name in enumerate(signals):
        if index:
            time.sleep(random.uniform(0.03, 0.06))
        proc.send_signal(getattr(signal, name))
    code = proc.wait(timeout=120)
    output = (tmp_path / "stride.out").read_text()
    assert code == 128 + getattr(signal, signals[0]), output
    status = read_json(run / "status.json")
    assert status["state"] == "stopped" and status["ended_at"], (status, output)
    assert "stride: error" not in output
    assert "state:    stopped" in stride("status", str(run), check=True).stdout
    follow = stride("logs", str(run), "--follow", timeout=60)
    assert follow.returncode == 0, follow.stderr
    assert not list((run / "claims").glob("*.json")) if (run / "claims").is_dir() else True
