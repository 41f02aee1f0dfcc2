"""Stopping and resuming on this machine: exact resume, `stride resume` rules, damaged checkpoints, SIGKILL mid-write."""
from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import read_json, read_jsonl, start_stride

# Deterministic, small batches: ~145 steps per epoch on one process, long enough to be interrupted mid-epoch.
EXACT = ["training_kwargs.deterministic=true", "training_kwargs.epochs=4", "load_data_kwargs.batch_size=8",
         "training_kwargs.log_every_steps=10"]


def weights(run: Path, name: str) -> dict:
    return torch.load(run / "weights" / f"{name}.pt", weights_only=True)["model"]


def assert_bitwise_equal(run_a: Path, run_b: Path) -> None:
    for name in ("final", "best"):
        a, b = weights(run_a, name), weights(run_b, name)
        assert a.keys() == b.keys()
        different = [key for key in a if not torch.equal(a[key], b[key])]
        assert not different, f"{name}.pt differs in {different}"


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        try:
            steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "train"]
        except (FileNotFoundError, json.JSONDecodeError):
            steps = []
        if steps and steps[-1] >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"run never reached step {step}")


@pytest.mark.parametrize("nproc, stop_after, extra", [
    (1, 233, []),  # mid-epoch: a lone process stops at the very next step
    # Two ranks agree to stop only at log points, here the epoch's last step; with DataLoader workers.
    (2, 79, ["training_kwargs.log_every_steps=79", "load_data_kwargs.num_workers=1"]),
])
def test_sigterm_then_resume_ends_bitwise_identical_to_an_uninterrupted_run(tmp_path, stride, nproc, stop_after,
                                                                            extra):
    stride("local", "work_dir=whole", *EXACT, *extra, "--nproc", str(nproc), check=True)
    proc = start_stride("local", "work_dir=cut", *EXACT, *extra, "--nproc", str(nproc), cwd=tmp_path)
    cut = tmp_path / "cut" / "0"
    wait_for_step(cut, stop_after, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    status = read_json(cut / "status.json")
    assert status["state"] == "stopped" and status["step"] < status["total_steps"]
    assert f"stride resume {cut}" in (tmp_path / "stride.out").read_text()

    resumed = stride("resume", str(cut), "--local", check=True)
    assert "test_accuracy=" in resumed.stdout
    assert_bitwise_equal(tmp_path / "whole" / "0", cut)
    # One continuous story: every train step logged once, in order; two attempts recorded.
    def train_steps(run: Path) -> list[int]:
        return [r["step"] for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "train"]

    assert train_steps(cut) == train_steps(tmp_path / "whole" / "0")
    metadata = read_json(cut / "metadata.json")
    assert len(metadata["attempts"]) == 2 and len(metadata["resumes"]) == 1
    assert "resumed from step_" in (cut / "logs" / "rank_0.log").read_text()
    assert read_json(cut / "status.json")["state"] == "completed"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A completed deterministic 2-epoch run, copied by tests that damage it."""
    from conftest import run_stride

    folder = tmp_path_factory.mktemp("finished")
    run_stride("local", "work_dir=exp", "training_kwargs.deterministic=true", "training_kwargs.epochs=2",
               "training_kwargs.checkpoint_every_steps=5", "training_kwargs.keep_last_checkpoints=3",
               cwd=folder, check=True)
    return folder / "exp" / "0"


def copy_run(run: Path, tmp_path: Path, name: str = "0") -> Path:
    target = tmp_path / "exp" / name
    shutil.copytree(run, target)
    return target


def mark_stopped(run: Path) -> None:
    status = read_json(run / "status.json")
    status["state"] = "stopped"
    (run / "status.json").write_text(json.dumps(status))


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stride: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_completed_run_says_so_and_more_epochs_continue_it(tmp_path, stride, finished_run):
    run = copy_run(finished_run, tmp_path)
    before = (run / "weights" / "final.pt").read_bytes()
    proc = stride("resume", str(run), "--local", check=True)
    assert "already completed (2 epochs): nothing to do" in proc.stdout
    assert (run / "weights" / "final.pt").read_bytes() == before

    proc = stride("resume", str(run), "--local", "training_kwargs.epochs=3", check=True)
    assert "test_accuracy=" in proc.stdout
    assert read_json(run / "config.json")["training_kwargs"]["epochs"] == 3
    assert read_json(run / "results.json")["epochs"] == 3
    amendments = read_json(run / "metadata.json")["amendments"]
    assert amendments[-1]["changes"] == {"training_kwargs.epochs": [2, 3]}
    val_epochs = [r["epoch"] for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "val"]
    assert val_epochs == [0, 1, 2]


def test_keys_that_would_change_the_run_are_refused(tmp_path, stride, finished_run):
    run = copy_run(finished_run, tmp_path)
    config_before = (run / "config.json").read_text()
    one_line_error(stride("resume", str(run), "--local", "training_kwargs.lr=0.1"),
                   "cannot change training_kwargs.lr when resuming")
    one_line_error(stride("resume", str(run), "--local", "model_kwargs.model_name=MLP"), "cannot change model_kwargs")
    one_line_error(stride("resume", str(run), "--local", "training_kwargs.epoch=9"), "unknown config key")
    assert (run / "config.json").read_text() == config_before


def test_missing_run_and_run_without_checkpoint_are_one_line(tmp_path, stride, finished_run):
    one_line_error(stride("resume", "7", "--work-dir", "exp", "--local"), "run '7' does not exist")
    one_line_error(stride("resume", "../x", "--work-dir", "exp", "--local"), "not allowed")
    run = copy_run(finished_run, tmp_path)
    mark_stopped(run)
    shutil.rmtree(run / "checkpoints")
    one_line_error(stride("resume", str(run), "--local"), "has no complete checkpoint")


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, stride, finished_run):
    run = copy_run(finished_run, tmp_path)
    mark_stopped(run)
    checkpoints = sorted((run / "checkpoints").glob("step_*.pt"))
    newest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    assert newest == checkpoints[-1] and len(checkpoints) == 3
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    proc = stride("resume", str(run), "--local", check=True)
    log = (run / "logs" / "rank_0.log").read_text()
    assert f"checkpoint {newest.name} is unreadable" in log
    assert f"resumed from {checkpoints[-2].name}" in log
    assert "test_accuracy=" in proc.stdout

    # With every checkpoint cut short, there is nothing to resume from.
    for path in (run / "checkpoints").glob("step_*.pt"):
        path.write_bytes(path.read_bytes()[:100])
    mark_stopped(run)
    one_line_error(stride("resume", str(run), "--local"), "has no complete checkpoint")


def test_checkpoint_of_another_model_is_refused(tmp_path, stride, finished_run):
    run = copy_run(finished_run, tmp_path)
    mark_stopped(run)
    stride("local", "work_dir=other", "model_kwargs.model_name=MLP", "training_kwargs.epochs=1", check=True)
    foreign = sorted((tmp_path / "other" / "0" / "checkpoints").glob("step_*.pt"))[-1]
    for path in (run / "checkpoints").glob("step_*.pt"):
        path.unlink()
    shutil.copy(foreign, run / "checkpoints" / foreign.name)
    (run / "checkpoints" / "latest").write_text(foreign.name + "\n")
    # Found once training starts (the file must be read): the run's own start-up lines, then one error line.
    proc = stride("resume", str(run), "--local")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"stride: error: checkpoint {run / 'checkpoints' / foreign.name} was written for "
                           f"model_kwargs") and "resume with the run's own model settings" in last


WRITER = """
import sys, time, torch
from stride.checkpoint import Checkpointer
ckpt = Checkpointer(sys.argv[1], keep_last=2, background=True)
step = int(sys.argv[2])
open(sys.argv[3], "w").close()  # imports done: the test kills at a random moment from here on
while True:
    step += 1
    ckpt.save({"step": step, "weights": torch.full((1_500_000,), float(step))}, step)
"""


def test_sigkill_during_checkpoint_writes_never_leaves_latest_unreadable(tmp_path):
    from stride.checkpoint import Checkpointer, LATEST, load_file

    folder = tmp_path / "checkpoints"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    rng = random.Random(0)
    kills, step = 0, 0
    ready = tmp_path / "ready"
    for _ in range(25):
        ready.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, str(script), str(folder), str(step), str(ready)],
                                cwd=Path(__file__).parents[1])
        deadline = time.monotonic() + 60
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ready.exists(), "the writer did not start"
        time.sleep(rng.uniform(0.05, 0.6))  # a random moment inside the write loop
        proc.kill()
        proc.wait(timeout=30)
        kills += 1
        if not (folder / LATEST).exists():
            continue
        named = folder / (folder / LATEST).read_text().strip()
        state = load_file(named)  # the file `latest` names is always whole: no fallback needed
        assert torch.equal(state["weights"], torch.full((1_500_000,), float(state["step"])))
        step = state["step"]
        found = Checkpointer(folder).load_latest()
        assert found is not None and found[0]["step"] == step
    assert kills == 25 and step > 0
    assert list(folder.glob(".*.tmp")), "no kill landed inside a write: the test proved nothing"
    Checkpointer(folder).remove_partial_writes()
    assert not list(folder.glob(".*.tmp"))


def test_sampler_resumed_after_the_last_partial_batch_has_nothing_left():
    from stride.trainer import ResumableDistributedSampler

    sampler = ResumableDistributedSampler(list(range(23)), num_replicas=2, rank=1, shuffle=True, seed=0)
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.set_epoch(3, start_index=8)
    assert list(sampler) == full[8:] and len(sampler) == len(full) - 8
    sampler.set_epoch(3, start_index=2 * 8)  # 2 batches of 8 > the 12 samples of this rank
    assert list(sampler) == [] and len(sampler) == 0
