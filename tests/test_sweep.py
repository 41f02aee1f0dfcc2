"""Sweeps: expansion rules, local sweeps, and a 2 x 2 sweep as ONE job array on the real local Slurm."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import cli_env, read_json
from slurm_helpers import needs_slurm, run_status, squeue_ids, wait_for
from stride.errors import ConfigError
from stride.sweep import parse, split_top_level


def test_commas_and_ranges_expand_to_the_cartesian_product():
    sweep = parse(["work_dir=x", "training_kwargs.lr=1e-3,3e-4", "training_kwargs.seed=range(0,3)",
                   "model_kwargs.hidden=[64,64]", "slurm.sbatch_args.comment='a,b'"])
    assert sweep.keys == ["training_kwargs.lr", "training_kwargs.seed"] and sweep.size == 6
    assert sweep.points()[4] == {"training_kwargs.lr": "3e-4", "training_kwargs.seed": "1"}
    assert sweep.overrides(sweep.points()[0])[-2:] == ["training_kwargs.lr=1e-3", "training_kwargs.seed=0"]
    assert "model_kwargs.hidden=[64,64]" in sweep.fixed and "slurm.sbatch_args.comment='a,b'" in sweep.fixed
    assert split_top_level("[1,2],{a: 1, b: 2},'x,y'") == ["[1,2]", "{a: 1, b: 2}", "'x,y'"]
    assert parse(["a=range(2,10,4)"]).axes == [("a", ["2", "6"])]


@pytest.mark.parametrize("overrides, message", [
    (["lr=1e-3,"], "has an empty item"),
    (["lr=,1e-3"], "has an empty item"),
    (["seed=1,2,1"], "repeats 1"),
    (["seed=1,2", "seed=3"], "seed is given twice"),
    (["seed=3", "seed=1,2"], "seed is given twice"),
    (["run=a,b"], "run cannot be swept"),
    (["seed=range(5,1)"], "is empty"),
])
def test_ambiguous_sweeps_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        parse(overrides)


@pytest.mark.parametrize("args, message", [
    (["training_kwargs.lr=1e-3,"], "has an empty item: remove the stray comma"),
    (["training_kwargs.lrr=1e-3,3e-4"], "unknown config key 'training_kwargs.lrr'"),
    (["training_kwargs.seed=0,1", "training_kwargs.seed=2"], "training_kwargs.seed is given twice"),
    (["training_kwargs.epochs=1,two"], "expected an integer"),
])
def test_bad_sweeps_are_one_line_and_write_nothing(tmp_path, stride, args, message):
    for command in ("local", "submit"):
        proc = stride(command, "work_dir=exp", *args)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("stride: error: ") and message in lines[0], proc.stderr
        assert not (tmp_path / "exp").exists()


def test_local_sweep_runs_every_point_in_its_own_folder(tmp_path, stride):
    proc = stride("local", "work_dir=exp", "training_kwargs.epochs=1", "model_kwargs.model_name=MLP",
                  "training_kwargs.lr=1e-3,3e-3", check=True)
    configs = [read_json(tmp_path / "exp" / str(i) / "config.json") for i in range(2)]
    assert [c["training_kwargs"]["lr"] for c in configs] == [1e-3, 3e-3]
    assert all(c["model_kwargs"]["model_name"] == "MLP" for c in configs)
    sweeps = [read_json(tmp_path / "exp" / str(i) / "metadata.json")["sweep"] for i in range(2)]
    assert sweeps[0]["id"] == sweeps[1]["id"] and [s["index"] for s in sweeps] == [0, 1]
    assert all((tmp_path / "exp" / str(i) / "results.json").is_file() for i in range(2))
    assert "runs over training_kwargs.lr" in proc.stdout


@pytest.mark.slurm
@needs_slurm
def test_sweep_is_one_job_array_with_grouped_status(tmp_path, stride):
    args = ["work_dir=exp", "training_kwargs.epochs=2", "training_kwargs.lr=1e-3,3e-3",
            "training_kwargs.seed=0,1", "--nodes", "1", "--tasks-per-node", "2", "--max-parallel", "2"]
    dry = stride("submit", *args, "--dry-run", check=True)
    assert "#SBATCH --array=0-3%2" in dry.stdout and "3  0.003" in dry.stdout
    assert not (tmp_path / "exp").exists() and not squeue_ids(tmp_path)

    proc = stride("submit", *args, check=True)
    array_id = proc.stdout.split("submitted job array ")[1].split()[0]
    runs = [tmp_path / "exp" / str(i) for i in range(4)]
    job_ids = [run_status(run)["job_id"] for run in runs]
    assert job_ids == [f"{array_id}_{i}" for i in range(4)]
    queued = subprocess.run(["squeue", "-h", "-r", "-j", array_id, "-o", "%A"], capture_output=True, text=True,
                            timeout=30).stdout.split()
    assert set(queued) <= {array_id} | {str(int(array_id) + i) for i in range(1, 5)}

    wait_for(lambda: all(run_status(r).get("state") == "completed" for r in runs), 400, 1.0,
             what="all four sweep runs to complete")
    values = [(read_json(r / "config.json")["training_kwargs"]["lr"], read_json(r / "config.json")["training_kwargs"]
               ["seed"]) for r in runs]
    assert values == [(1e-3, 0), (1e-3, 1), (3e-3, 0), (3e-3, 1)]
    for run, job_id in zip(runs, job_ids):
        assert read_json(run / "results.json")["world_size"] == 2
        assert (run / "slurm" / f"{job_id}_1_log.out").is_file()
    table = stride("status", "exp", "--sort", "test_accuracy", check=True).stdout.splitlines()
    assert table[0].startswith("sweep ") and table[0].endswith("4 runs over training_kwargs.lr, training_kwargs.seed")
    header = table[1].split()
    assert header[:5] == ["RUN", "STATE", "JOB_ID", "LR", "SEED"] and "TEST_ACCURACY" in header
    column = header.index("TEST_ACCURACY")
    rows = [line.split() for line in table[2:6]]
    accuracies = [float(row[column]) for row in rows]
    assert accuracies == sorted(accuracies, reverse=True)
    for row in rows:
        result = read_json(tmp_path / "exp" / row[0] / "results.json")
        assert row[1] == "completed" and float(row[column]) == pytest.approx(result["test_accuracy"], abs=1e-4)


@pytest.mark.slurm
@needs_slurm
def test_sweep_beyond_max_array_size_is_refused(tmp_path, stride):
    limit = int(subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30)
                .stdout.split("MaxArraySize")[1].split("=")[1].split()[0])
    proc = stride("submit", "work_dir=exp", f"training_kwargs.seed=range(0,{limit + 1})")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"stride: error: this sweep has {limit + 1} points but the cluster's MaxArraySize "
                                   f"is {limit}: split it into several submissions (fewer values per key)")
    assert not (tmp_path / "exp").exists()


@pytest.mark.slurm
@needs_slurm
def test_throttled_array_tasks_waiting_their_turn_are_pending_not_lost(tmp_path, stride):
    # Three points, one at a time: while the first trains, squeue shows the other two as ONE `ID_[1-2]` line
    # unless asked for one line per task (-r).
    proc = stride("submit", "work_dir=exp", "training_kwargs.epochs=300", "training_kwargs.lr=1e-3,2e-3,3e-3",
                  "--nodes", "1", "--tasks-per-node", "1", "--max-parallel", "1", check=True)
    array_id = proc.stdout.split("submitted job array ")[1].split()[0]
    runs = [tmp_path / "exp" / str(i) for i in range(3)]
    follower = None
    try:
        wait_for(lambda: run_status(runs[0]).get("state") == "running", 120, what="the first task to train")
        rows = {line.split()[0]: line.split() for line in stride("status", "exp", check=True).stdout.splitlines()[2:]}
        assert [rows[str(i)][1] for i in range(3)] == ["running", "pending", "pending"], rows
        assert "state:    pending" in stride("status", str(runs[2]), check=True).stdout
        # `stride logs --follow` waits for a pending task instead of ending at once.
        follower = subprocess.Popen([sys.executable, "-m", "stride", "logs", str(runs[2]), "--follow"], cwd=tmp_path,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env())
        with pytest.raises(subprocess.TimeoutExpired):
            follower.wait(timeout=6)
    finally:
        if follower is not None and follower.poll() is None:
            follower.kill()
            follower.wait(timeout=30)
        subprocess.run(["scancel", array_id], timeout=30)
    wait_for(lambda: not squeue_ids(tmp_path), 60, what="the array to leave the queue")
