"""Stopping and resuming on this machine: exact resume, `stride resume` rules, damaged checkpoints, SIGKILL mid-write."""
from __future__ import annotations

import json
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import cli_env, one_line_error, read_json, read_jsonl, start_stride

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


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, split: str = "train", timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        try:
            steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if r["split"] == split]
        except (FileNotFoundError, json.JSONDecodeError):
            steps = []
        if steps and steps[-1] >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"run never reached step {step}")


def metrics_story(run: Path) -> list[tuple[str, int]]:
    return [(r["split"], r["step"]) for r in read_jsonl(run / "metrics.jsonl")]


STOP_CHECK_S = 0.2


@pytest.mark.parametrize("nproc, stop_after, extra", [
    (1, ("train", 233), []),  # mid-epoch: a lone process stops at the very next step
    # Two ranks, with DataLoader workers, and no log point in the whole run (~320 steps): the ranks still agree on
    # the stop within about stop_check_seconds, whenever it comes.
    (2, ("val", 1), ["training_kwargs.log_every_steps=1000", f"training_kwargs.stop_check_seconds={STOP_CHECK_S}",
                     "load_data_kwargs.num_workers=1"]),
])
def test_sigterm_then_resume_ends_bitwise_identical_to_an_uninterrupted_run(tmp_path, stride, nproc, stop_after,
                                                                            extra):
    stride("local", "work_dir=whole", *EXACT, *extra, "--nproc", str(nproc), check=True)
    proc = start_stride("local", "work_dir=cut", *EXACT, *extra, "--nproc", str(nproc), cwd=tmp_path)
    cut = tmp_path / "cut" / "0"
    split, stop_after_step = stop_after
    wait_for_step(cut, stop_after_step, proc, split)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    status = read_json(cut / "status.json")
    assert status["state"] == "stopped" and status["step"] < status["total_steps"]
    assert f"stride resume {cut}" in (tmp_path / "stride.out").read_text()
    log = (cut / "logs" / "rank_0.log").read_text()
    requested = int(re.search(r"stop requested \(SIGTERM\) at step (\d+)", log).group(1))
    stopped = re.search(r"stopping at epoch \d+ step (\d+) \(SIGTERM, ([\d.]+)s after the request\)", log)
    assert status["step"] == int(stopped.group(1))
    if nproc == 1:
        assert int(stopped.group(1)) == requested
    else:  # planned from the step time, so a few steps, not the 1000 to the next log point
        assert requested <= int(stopped.group(1)) and float(stopped.group(2)) < STOP_CHECK_S + 3, stopped.group(0)

    resumed = stride("resume", str(cut), "--local", check=True)
    assert "test_accuracy=" in resumed.stdout
    assert_bitwise_equal(tmp_path / "whole" / "0", cut)
    # One continuous story: every train and val record once, in order; two attempts recorded.
    assert metrics_story(cut) == metrics_story(tmp_path / "whole" / "0")
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


def test_completed_run_says_so_and_more_epochs_continue_it(tmp_path, stride, finished_run):
    run = copy_run(finished_run, tmp_path)
    before = (run / "weights" / "final.pt").read_bytes()
    proc = stride("resume", str(run), "--local", check=True)
    assert "already completed (2 epochs): nothing to do" in proc.stdout
    assert f"To train longer: stride resume {run} --local training_kwargs.epochs=4" in proc.stdout  # flags kept
    assert (run / "weights" / "final.pt").read_bytes() == before
    # Fewer epochs than it has trained: refused in one line, with a command that keeps the user's flags.
    metadata = (run / "metadata.json").read_bytes()
    one_line_error(stride("resume", str(run), "--local", "training_kwargs.epochs=1"),
                   "has already trained 2 epochs, so training_kwargs.epochs=1 would end before where it is",
                   f"e.g. stride resume {run} --local training_kwargs.epochs=4")
    assert (run / "metadata.json").read_bytes() == metadata

    proc = stride("resume", str(run), "--local", "training_kwargs.epochs=3", check=True)
    assert "test_accuracy=" in proc.stdout
    assert read_json(run / "config.json")["training_kwargs"]["epochs"] == 3
    assert read_json(run / "results.json")["epochs"] == 3
    amendments = read_json(run / "metadata.json")["amendments"]
    assert amendments[-1]["changes"] == {"training_kwargs.epochs": [2, 3]}
    val_epochs = [r["epoch"] for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "val"]
    assert val_epochs == [1, 2, 3]


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
    assert f"checkpoint {newest.name} is truncated" in log
    assert f"resumed from {checkpoints[-2].name}" in log
    assert "test_accuracy=" in proc.stdout

    # With every checkpoint cut short, there is nothing to resume from.
    for path in (run / "checkpoints").glob("step_*.pt"):
        path.write_bytes(path.read_bytes()[:100])
    mark_stopped(run)
    one_line_error(stride("resume", str(run), "--local"), "has no complete checkpoint")


def flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_byte_in_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, stride, finished_run):
    run = copy_run(finished_run, tmp_path)
    mark_stopped(run)
    folder = run / "checkpoints"
    newest = folder / (folder / "latest").read_text().strip()
    previous = sorted(folder.glob("step_*.pt"))[-2]
    flip_middle_byte(newest)
    torch.load(newest, weights_only=True)  # torch alone does not notice: only stride's checksum does
    stride("resume", str(run), "--local", "training_kwargs.epochs=3", check=True)
    log = (run / "logs" / "rank_0.log").read_text()
    assert re.search(rf"checkpoint {newest.name} is corrupt: CRC32 [0-9a-f]{{8}} on disk, [0-9a-f]{{8}} written; "
                     rf"trying the previous one", log), log
    assert f"moved {newest.name} aside to {newest.name}.corrupt" in log
    assert f"resumed from {previous.name}" in log
    assert (folder / f"{newest.name}.corrupt").is_file()
    steps = [step for split, step in metrics_story(run) if split == "train"]
    assert steps == sorted(set(steps))

    # A run whose only checkpoint is corrupt: one line before anything starts.
    mark_stopped(run)
    for path in folder.glob("step_*.pt"):
        if path.name != (folder / "latest").read_text().strip():
            path.unlink()
    (only,) = folder.glob("step_*.pt")
    flip_middle_byte(only)
    one_line_error(stride("resume", str(run), "--local"), "has no complete checkpoint", f"{only.name} is corrupt")


def test_unreadable_checkpoint_is_moved_aside_so_pruning_keeps_the_good_one(tmp_path, stride, finished_run):
    """A bad file numbered above the others must not keep a slot of keep_last_checkpoints=1: the file just written
    (the one `latest` names) would be pruned in its place."""
    run = copy_run(finished_run, tmp_path)
    mark_stopped(run)
    folder = run / "checkpoints"
    bad = folder / "step_000099999.pt"
    bad.write_bytes(b"not a checkpoint")
    (folder / "latest").write_text(bad.name + "\n")
    stride("resume", str(run), "--local", "training_kwargs.epochs=3", "training_kwargs.keep_last_checkpoints=1",
           check=True)
    latest = folder / (folder / "latest").read_text().strip()
    assert sorted(p.name for p in folder.glob("step_*.pt")) == [latest.name]
    assert torch.load(latest, weights_only=True)["step"] == read_json(run / "results.json")["steps"]
    assert (folder / f"{bad.name}.corrupt").read_bytes() == b"not a checkpoint"
    log = (run / "logs" / "rank_0.log").read_text()
    assert f"checkpoint {bad.name} is truncated" in log and f"moved {bad.name} aside to {bad.name}.corrupt" in log


def test_checkpoints_that_all_fail_to_load_stop_the_run_instead_of_restarting_it(tmp_path, finished_run):
    from stride import Trainer
    from stride.errors import RunError
    from stride.rundir import RunDir

    run = copy_run(finished_run, tmp_path)
    mark_stopped(run)
    for path in (run / "checkpoints").glob("step_*.pt"):
        path.write_bytes(path.read_bytes()[:100])
    metrics_before = (run / "metrics.jsonl").read_text()
    trainer = Trainer(config=read_json(run / "config.json"), run_dir=RunDir(run))
    with pytest.raises(RunError, match=r"no checkpoint in .*checkpoints can be loaded \(step_\d+\.pt is truncated"):
        trainer.fit()
    assert (run / "metrics.jsonl").read_text() == metrics_before  # nothing was redone from step 0
    assert len(list((run / "checkpoints").glob("step_*.pt"))) == 3  # left where they are: nothing to protect


CRASHY = """
import pathlib, torch
class Crashy(torch.nn.Module):  # raises at its 25th training step, once: the marker file remembers that it did
    def __init__(self, input_shape, num_outputs, marker: str = ""):
        super().__init__()
        self.lin = torch.nn.Linear(64, num_outputs)
        self.marker, self.calls = pathlib.Path(marker), 0
    def forward(self, x):
        self.calls += self.training
        if self.calls == 25 and not self.marker.exists():
            self.marker.write_text("crashed")
            raise RuntimeError("crash before the first checkpoint")
        return self.lin(x.flatten(1))
"""


def test_crash_retry_before_the_first_checkpoint_keeps_one_metrics_story(tmp_path, stride):
    """A retried job that had no checkpoint yet starts over: what the crashed attempt logged must go."""
    (tmp_path / "crashy.py").write_text(CRASHY)
    env = {"PYTHONPATH": str(tmp_path)}
    args = ["training_kwargs.epochs=2", "load_data_kwargs.batch_size=8", "training_kwargs.log_every_steps=10",
            "training_kwargs.checkpoint_every_minutes=0", "model_kwargs.model_name=crashy:Crashy"]
    (tmp_path / "never").write_text("")
    stride("local", "work_dir=clean", *args, f"model_kwargs.marker={tmp_path / 'never'}", env=env, check=True)
    proc = stride("local", "work_dir=exp", *args, f"model_kwargs.marker={tmp_path / 'crashed'}", env=env)
    assert proc.returncode != 0 and "crash before the first checkpoint" in proc.stderr
    run = tmp_path / "exp" / "0"
    assert metrics_story(run) == [("train", 10), ("train", 20)] and not list(run.glob("checkpoints/step_*"))
    assert read_json(run / "status.json")["step"] in (10, 20)  # live progress between epoch ends
    # What a SLURM crash retry runs: the same rank entry point on the same folder.
    subprocess.run([sys.executable, "-m", "stride.job", str(run)], cwd=tmp_path, check=True, timeout=300,
                   env=cli_env(env), capture_output=True)
    story = metrics_story(run)
    assert story == metrics_story(tmp_path / "clean" / "0") and len(story) == len(set(story))


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
