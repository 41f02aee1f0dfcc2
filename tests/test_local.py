"""`stride local` end to end: real training on the shipped digits data, real multi-process gloo, bad input."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import read_json, read_jsonl


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The README's first command: `stride local work_dir=...` with nothing else."""
    from conftest import run_stride

    cwd = tmp_path_factory.mktemp("default")
    proc = run_stride("local", "work_dir=exp", cwd=cwd, check=True)
    return cwd / "exp" / "0", proc


def test_default_reaches_95_percent_and_says_where_the_run_is(default_run):
    run, proc = default_run
    assert f"run folder: {run}" in proc.stdout
    results = read_json(run / "results.json")
    assert results["test_accuracy"] >= 0.95
    assert results["train_time_s"] < 120


def test_run_folder_holds_everything(default_run):
    run, _ = default_run
    config = read_json(run / "config.json")
    assert config["run"] == "0" and config["work_dir"] == str(run.parent)
    assert config["model_kwargs"]["model_name"] == "CNN" and config["dataset_kwargs"]["dataset_name"] == "digits"
    assert set(config) >= {"work_dir", "run", "device", "dataset_kwargs", "load_data_kwargs", "model_kwargs",
                           "training_kwargs"}
    metadata = read_json(run / "metadata.json")
    # The tests start `python -m stride`: recorded as typed, not as .../stride/__main__.py.
    assert metadata["argv"] == [Path(sys.executable).name, "-m", "stride", "local", "work_dir=exp"]
    assert metadata["command"] == f"{Path(sys.executable).name} -m stride local work_dir=exp"
    assert metadata["versions"]["torch"] and metadata["versions"]["python"] and metadata["hostname"]
    status = read_json(run / "status.json")
    assert status["state"] == "completed" and status["started_at"] and status["ended_at"]
    log = (run / "logs" / "rank_0.log").read_text()
    assert " rank 0 local 0 INFO " in log and "finished:" in log
    assert (run / "weights" / "best.pt").is_file() and (run / "weights" / "final.pt").is_file()
    assert (run / "checkpoints" / "latest").is_file()
    metrics = read_jsonl(run / "metrics.jsonl")
    val_epochs = [m["epoch"] for m in metrics if m["split"] == "val"]
    assert val_epochs == list(range(1, config["training_kwargs"]["epochs"] + 1))  # epoch N of E, from 1
    assert any(m["split"] == "train" and "train_loss" in m for m in metrics)
    assert [m for m in metrics if m["split"] == "test"][0]["test_accuracy"] == read_json(run / "results.json")[
        "test_accuracy"]


def test_second_run_gets_next_integer_and_overrides_land_in_config(tmp_path, stride):
    proc = stride("local", "work_dir=exp", "--config", "training_kwargs.epochs=1",
                  "--config", "model_kwargs.model_name=MLP", "model_kwargs.hidden=[32]", check=True)
    proc2 = stride("local", "work_dir=exp", "run=named", "training_kwargs.epochs=1", "training_kwargs.lr=3e-4",
                   check=True)
    assert read_json(tmp_path / "exp/0/config.json")["model_kwargs"] == {"model_name": "MLP", "hidden": [32]}
    named = read_json(tmp_path / "exp/named/config.json")
    assert named["training_kwargs"]["lr"] == pytest.approx(3e-4) and named["run"] == "named"
    assert "run folder" in proc.stdout and "run folder" in proc2.stdout


def test_two_processes_reach_the_accuracy_of_one(tmp_path, stride, default_run):
    stride("local", "work_dir=exp", "--nproc", "2", check=True)
    run = tmp_path / "exp" / "0"
    results = read_json(run / "results.json")
    single = read_json(default_run[0] / "results.json")
    assert results["world_size"] == 2
    assert results["test_accuracy"] >= 0.95
    assert abs(results["test_accuracy"] - single["test_accuracy"]) <= 0.03
    for rank in (0, 1):
        assert f" rank {rank} local {rank} INFO " in (run / "logs" / f"rank_{rank}.log").read_text()
    assert "rank 1" not in (run / "logs" / "rank_0.log").read_text().replace("rank 1/", "")


def test_failing_rank_fails_the_run(tmp_path, stride):
    """A model that crashes only on rank 1: the run ends non-zero, marked failed, naming rank 1."""
    (tmp_path / "crashy.py").write_text(
        "import os, torch\n"
        "class Crashy(torch.nn.Module):\n"
        "    def __init__(self, input_shape, num_outputs):\n"
        "        super().__init__(); self.lin = torch.nn.Linear(64, num_outputs)\n"
        "    def forward(self, x):\n"
        "        if os.environ.get('RANK') == '1': raise ValueError('boom on rank one')\n"
        "        return self.lin(x.flatten(1))\n")
    proc = stride("local", "work_dir=exp", "model_kwargs.model_name=crashy:Crashy", "--nproc", "2",
                  env={"PYTHONPATH": str(tmp_path)}, timeout=120)
    assert proc.returncode != 0
    status = read_json(tmp_path / "exp/0/status.json")
    assert status["state"] == "failed" and status["failed_rank"] == 1
    failure = read_json(tmp_path / "exp/0/failures/rank_1.json")
    assert "boom on rank one" in failure["error"]


@pytest.mark.parametrize("args, message", [
    (["local"], "work_dir is not set"),
    (["local", "work_dir=exp", "training_kwargs.lrr=1"], "unknown config key 'training_kwargs.lrr'"),
    (["local", "work_dir=exp", "training_kwargs.epochs=many"], "expected an integer"),
    (["local", "work_dir=exp", "bad.yaml"], "is not valid YAML"),
    (["local", "work_dir=exp", "absent.yaml"], "does not exist"),
    (["local", "work_dir=exp", "model_kwargs.model_name=Resnet"], "unknown model 'Resnet' (did you mean 'ResNet'?)"),
    (["local", "work_dir=exp", "dataset_kwargs.dataset_name=mnist"], "unknown dataset 'mnist'"),
    (["local", "work_dir=exp", "model_kwargs.model_name=no_such_pkg.models:Net"], "cannot be imported"),
    (["local", "work_dir=exp", "model_kwargs.depth=3"], "unknown config key 'model_kwargs.depth' for model 'CNN'"),
    (["local", "work_dir=exp", "run=../../etc"], "is not allowed"),
    (["local", "work_dir=exp", "--nproc", "0"], "--nproc must be a positive integer"),
    (["local", "work_dir=exp", "--epochs", "3"], "unknown option --epochs for `stride local` (did you mean the "
                                                 "setting training_kwargs.epochs=...?)"),
    (["local", "work_dir=exp", "--nporc=2"], "unknown option --nporc for `stride local` (did you mean '--nproc'?)"),
    (["lcoal", "work_dir=exp"], "unknown command 'lcoal' (did you mean 'local'?)"),
    (["local", "work_dir=exp", "binary.yaml"], "is not UTF-8 text"),
    (["local", "work_dir=exp", "model_kwargs.channels=wide"], "expected a list of integers (for model 'CNN')"),
    (["local", "work_dir=exp", "device=auto:1"], "config key 'device' got 'auto:1'"),
    (["local", "work_dir=exp", "--gpus", "64"], "--gpus 64 asks for 64 GPU(s) but this machine shows"),
    (["local", "work_dir=exp", "run=x", "training_kwargs.lr=1e-3,1e-2"], "run=x names one run, but this sweep "
                                                                          "makes 2"),
])
def test_bad_input_is_one_line_exit_2_and_no_run_folder(tmp_path, stride, args, message):
    (tmp_path / "bad.yaml").write_text("training_kwargs: {epochs: 3\n")
    (tmp_path / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    proc = stride(*args, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stride: error: "), proc.stderr
    assert message in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "exp").exists() or not any((tmp_path / "exp").iterdir())


def test_config_command_prints_resolved_config_without_running(tmp_path, stride):
    proc = stride("config", "work_dir=exp", "training_kwargs.epochs=3", check=True)
    assert "epochs: 3" in proc.stdout and "model_name: CNN" in proc.stdout
    assert not (tmp_path / "exp").exists()
    # What local would refuse, config refuses: a keyword the model does not take.
    refused = stride("config", "work_dir=exp", "model_kwargs.hidden=[256,256]")
    assert refused.returncode == 2 and "hidden" in refused.stderr and "CNN" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert stride("config", "work_dir=exp", "model_kwargs.channels=[16,32]", check=True).returncode == 0


def test_every_epoch_summary_has_its_train_loss_even_when_a_step_log_ends_the_epoch(tmp_path, stride):
    # Logging every step puts a log point on each epoch's last step, which used to leave the epoch without one.
    stride("local", "work_dir=exp", "training_kwargs.epochs=2", "training_kwargs.log_every_steps=1", check=True)
    val = [r for r in read_jsonl(tmp_path / "exp/0/metrics.jsonl") if r["split"] == "val"]
    assert len(val) == 2 and all("train_loss" in r for r in val), val
    log = (tmp_path / "exp/0/logs/rank_0.log").read_text()
    done = [line for line in log.splitlines() if "/2 done:" in line]
    assert len(done) == 2 and all("train_loss" in line for line in done), done
    # One numbering, from 1, wherever epochs are shown: metrics, logs, status, results.
    assert [r["epoch"] for r in val] == [1, 2] and "epoch 2/2 done" in done[1]
    assert read_json(tmp_path / "exp/0/status.json")["epoch"] == 2
    best = read_json(tmp_path / "exp/0/results.json")["best"]
    assert best["epoch"] in (1, 2) and f"at epoch {best['epoch']})" in log
    assert {r["epoch"] for r in read_jsonl(tmp_path / "exp/0/metrics.jsonl") if r["split"] == "train"} == {1, 2}
