"""Comparing real `stride local` runs: `stride diff`, `stride plot`, TensorBoard event files; completion and help."""
from __future__ import annotations

import re
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import cli_env, read_jsonl, run_stride
from stride import compare, plot
from stride.rundir import RunDir
from stride.tensorboard import TensorBoardLog, tag_for

COMMON = ("training_kwargs.epochs=2", "training_kwargs.log_every_steps=5")  # 20 steps an epoch: 8 train records
SETTINGS = {
    "a": ("training_kwargs.lr=1e-3", "training_kwargs.seed=1"),
    "b": ("training_kwargs.lr=3e-4", "training_kwargs.seed=2", "model_kwargs.dropout=0.2"),
    "a2": ("training_kwargs.lr=1e-3", "training_kwargs.seed=1"),  # a's settings again, in another run
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COMMANDS = ("local", "submit", "resume", "status", "logs", "cancel", "config", "diff", "plot")
CLI_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory) -> Path:
    """Three real runs trained side by side: a, b (lr, seed and a model key changed) and a2 (a's settings)."""
    cwd = tmp_path_factory.mktemp("compare")

    def train(name: str):
        return run_stride("local", "work_dir=exp", f"run={name}", *COMMON, *SETTINGS[name], cwd=cwd,
                          timeout=300, check=True)

    with ThreadPoolExecutor(len(SETTINGS)) as pool:
        list(pool.map(train, SETTINGS))
    return cwd / "exp"


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stride: error: "), proc.stderr
    return lines[0]


# ------------------------------------------------------------------------------------------------------------- diff
def test_diff_shows_exactly_the_differing_keys(work_dir, stride):
    proc = stride("diff", str(work_dir / "a"), str(work_dir / "b"), check=True, timeout=CLI_TIMEOUT_S)
    assert proc.stdout.strip().splitlines() == [
        "training_kwargs.lr: 0.001 -> 0.0003",
        "training_kwargs.seed: 1 -> 2",
        "model_kwargs.dropout: (not set) -> 0.2",
    ]


def test_diff_by_run_name_the_other_way_round(work_dir, stride):
    proc = stride("diff", "b", "a", "--work-dir", str(work_dir), check=True, timeout=CLI_TIMEOUT_S)
    assert proc.stdout.strip().splitlines() == [
        "model_kwargs.dropout: 0.2 -> (not set)",
        "training_kwargs.lr: 0.0003 -> 0.001",
        "training_kwargs.seed: 2 -> 1",
    ]


def test_diff_of_identical_configs_says_so(work_dir, stride):
    proc = stride("diff", str(work_dir / "a"), str(work_dir / "a2"), check=True, timeout=CLI_TIMEOUT_S)
    assert proc.stdout.strip() == f"identical configs: {work_dir / 'a'} and {work_dir / 'a2'}"


def test_diff_pure_logic_on_nested_configs():
    before = {"work_dir": "x", "run": "0", "training_kwargs": {"lr": 0.001, "deterministic": False},
              "model_kwargs": {"model_name": "MLP", "hidden": [256, 128]}, "slurm": {"sbatch_args": {}}}
    after = {"work_dir": "y", "run": "1", "training_kwargs": {"lr": 0.001, "deterministic": True},
             "model_kwargs": {"model_name": "MLP"}, "slurm": {"sbatch_args": {"mail-type": "END"}}}
    assert [str(c) for c in compare.diff_configs(before, after)] == [
        "training_kwargs.deterministic: false -> true",
        "model_kwargs.hidden: [256, 128] -> (not set)",
        "slurm.sbatch_args: {} -> (not set)",
        "slurm.sbatch_args.mail-type: (not set) -> END",
    ]
    assert compare.diff_configs(before, dict(before, run="7")) == []


def test_labels_name_what_differs_and_fall_back_to_run_names():
    configs = [{"run": "0", "training_kwargs": {"lr": 0.001, "seed": 1}, "dataset_kwargs": {"seed": 5}},
               {"run": "1", "training_kwargs": {"lr": 0.0003, "seed": 2}, "dataset_kwargs": {"seed": 6}},
               {"run": "2", "training_kwargs": {"lr": 0.0003, "seed": 2}, "dataset_kwargs": {"seed": 6}}]
    assert compare.differing_keys(configs) == ["training_kwargs.lr", "training_kwargs.seed", "dataset_kwargs.seed"]
    wide = 80
    assert compare.run_labels(configs, ["0", "1", "2"], max_chars=wide) == [  # two keys named seed: in full
        "lr=0.001 training_kwargs.seed=1 dataset_kwargs.seed=5",
        "run 1: lr=0.0003 training_kwargs.seed=2 dataset_kwargs.seed=6",
        "run 2: lr=0.0003 training_kwargs.seed=2 dataset_kwargs.seed=6"]
    assert compare.run_labels(configs[1:], ["1", "2"]) == ["run 1", "run 2"]  # identical settings
    assert compare.run_labels(configs[:2], ["0", "1"], max_chars=wide) == [
        "lr=0.001 training_kwargs.seed=1 dataset_kwargs.seed=5",
        "lr=0.0003 training_kwargs.seed=2 dataset_kwargs.seed=6"]
    # Short by default: whole settings while they fit, then an ellipsis.
    assert compare.run_labels(configs[:2], ["0", "1"]) == ["lr=0.001 training_kwargs.seed=1 …",
                                                          "lr=0.0003 training_kwargs.seed=2 …"]


def test_labels_are_what_differs_in_training_with_the_swept_keys_first():
    base = {"training_kwargs": {"lr": 0.001, "seed": 0, "log_every_steps": 10},
            "slurm": {"nodes": 1, "partition": "a"}, "distributed_kwargs": {"backend": "gloo"}}
    other = {"training_kwargs": {"lr": 0.003, "seed": 1, "log_every_steps": 50},
             "slurm": {"nodes": 4, "partition": "b"}, "distributed_kwargs": {"backend": "nccl"}}
    assert compare.run_labels([base, other], ["0", "1"]) == ["lr=0.001 seed=0", "lr=0.003 seed=1"]
    assert compare.run_labels([base, other], ["0", "1"], first=["training_kwargs.seed"]) == ["seed=0 lr=0.001",
                                                                                         "seed=1 lr=0.003"]
    placed = dict(base, slurm={"nodes": 4, "partition": "a"})
    assert compare.run_labels([base, placed], ["0", "1"]) == ["nodes=1", "nodes=4"]  # all that differs


# ------------------------------------------------------------------------------------------------------------- plot
def test_plotted_series_are_the_runs_metrics(work_dir):
    records = read_jsonl(work_dir / "a" / "metrics.jsonl")
    panels = plot.build_panels([RunDir(work_dir / "a"), RunDir(work_dir / "b")])
    assert list(panels) == ["train_loss", "val_accuracy"]
    train = panels["train_loss"][0]
    assert train.label == "lr=0.001 seed=1 dropout=(not set)"
    assert [s.label for s in panels["val_accuracy"]] == ["lr=0.001 seed=1 dropout=(not set)",
                                                        "lr=0.0003 seed=2 dropout=0.2"]
    assert train.steps == [5, 10, 15, 20, 25, 30, 35, 40]
    assert list(zip(train.steps, train.values)) == [(r["step"], r["train_loss"]) for r in records
                                                    if r["split"] == "train"]
    val = panels["val_accuracy"][0]
    assert list(zip(val.steps, val.values)) == [(r["step"], r["val_accuracy"]) for r in records
                                                if r["split"] == "val"]


def test_metric_series_keeps_the_last_value_of_a_redone_step():
    records = [{"step": 5, "train_loss": 2.0}, {"step": 10, "train_loss": 1.5}, {"step": 10, "val_loss": 1.7},
               {"step": 10, "train_loss": 1.2}, {"step": 15, "lr": 0.1}]
    assert plot.metric_series(records, "train_loss") == ([5, 10], [2.0, 1.2])
    assert plot.default_metrics({"train_loss", "val_loss", "lr"}) == ["train_loss", "val_loss"]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])  # the IHDR chunk: width, height


def test_plot_writes_a_png_of_both_panels_and_prints_its_path(work_dir, stride):
    proc = stride("plot", str(work_dir), "a", "b", check=True, timeout=CLI_TIMEOUT_S)
    path = Path(proc.stdout.strip())
    assert path == work_dir / "plots" / "train_loss-val_accuracy.png"
    width, height = png_size(path)
    assert width > 1.5 * height  # two panels side by side
    assert proc.stderr == ""  # no library warnings on the user's terminal


def test_plot_one_metric_to_a_chosen_file(work_dir, stride, tmp_path):
    proc = stride("plot", str(work_dir), "--metric", "val_loss", "--out", "curves/val.png", check=True,
                  timeout=CLI_TIMEOUT_S)
    assert Path(proc.stdout.strip()) == tmp_path / "curves" / "val.png"
    width, height = png_size(tmp_path / "curves" / "val.png")
    assert width < 1.5 * height


@pytest.mark.parametrize("args, message", [
    (["plot", "{exp}", "--metric", "val_acc"],
     "no run has the metric 'val_acc' (did you mean 'val_accuracy'?); metrics found: lr, test_accuracy, test_loss, "
     "train_loss, val_accuracy, val_loss"),
    (["plot", "{empty}"], "no runs in"),
    (["plot", "{exp}", "zz"], "run 'zz' does not exist"),
    (["plot", "{exp}/nowhere"], "does not exist"),
    (["diff", "{exp}/a", "{exp}/nowhere"], "does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(work_dir, stride, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    words = [arg.format(exp=work_dir, empty=tmp_path / "empty") for arg in args]
    assert message in one_error_line(stride(*words, timeout=CLI_TIMEOUT_S))


def test_plot_without_matplotlib_says_how_to_install_it(work_dir, stride, tmp_path):
    hidden = tmp_path / "hide" / "matplotlib"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('matplotlib is hidden by this test')\n")
    proc = stride("plot", str(work_dir), env={"PYTHONPATH": str(tmp_path / "hide")}, timeout=CLI_TIMEOUT_S)
    assert "pip install 'stride[plot]'" in one_error_line(proc)


PROBE = """
import sys
from stride.cli import main
try:
    main(sys.argv[1:])
finally:
    print("torch imported" if "torch" in sys.modules else "torch not imported", file=sys.stderr)
"""


@pytest.mark.parametrize("command", [["diff", "{exp}/a", "{exp}/b"], ["plot", "{exp}"], ["--help"]])
def test_diff_plot_and_help_do_not_import_torch(work_dir, tmp_path, command):
    words = [word.format(exp=work_dir) for word in command]
    proc = subprocess.run([sys.executable, "-c", PROBE, *words], cwd=tmp_path, capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().endswith("torch not imported"), proc.stderr


# ------------------------------------------------------------------------------------------------------ tensorboard
def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_scalars_equal_the_metrics_records(work_dir):
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in read_jsonl(work_dir / "a" / "metrics.jsonl"):
        for key, value in record.items():
            if key not in ("time", "epoch", "step", "split"):
                expected.setdefault(tag_for(key, record["split"]), []).append((record["step"], value))
    scalars = read_scalars(work_dir / "a" / "tensorboard")
    assert {"train/train_loss", "train/lr", "val/val_accuracy", "val/val_loss", "test/test_accuracy"} <= set(scalars)
    assert set(scalars) == set(expected)
    for tag, points in expected.items():
        assert [step for step, _ in scalars[tag]] == [step for step, _ in points], tag
        # TensorBoard stores scalars as float32.
        assert [v for _, v in scalars[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag


CRASHY = '''
import os, torch

class Crashy(torch.nn.Module):
    """A linear model that raises on training forward call CRASH_AT_CALL, when that variable is set."""

    def __init__(self, input_shape, num_outputs):
        super().__init__()
        self.lin = torch.nn.Linear(64, num_outputs)
        self.calls = 0

    def forward(self, x):
        self.calls += self.training
        if self.training and self.calls == int(os.environ.get("CRASH_AT_CALL", "0")):
            raise RuntimeError("crash for the test")
        return self.lin(x.flatten(1))
'''


def test_tensorboard_of_a_crashed_and_resumed_run_equals_its_metrics(tmp_path, stride):
    """Crash at step 35 (checkpoint at 30, records up to 33 written), resume: the redone records replace the old."""
    (tmp_path / "crashy.py").write_text(CRASHY)
    args = ("local", "work_dir=exp", "model_kwargs.model_name=crashy:Crashy", "training_kwargs.epochs=3",
            "training_kwargs.log_every_steps=3", "training_kwargs.checkpoint_every_steps=10")
    crashed = stride(*args, env={"PYTHONPATH": str(tmp_path), "CRASH_AT_CALL": "35"}, timeout=300)
    assert crashed.returncode != 0 and "crash for the test" in crashed.stderr
    run = tmp_path / "exp" / "0"
    assert max(r["step"] for r in read_jsonl(run / "metrics.jsonl")) == 33
    stride("resume", str(run), "--local", env={"PYTHONPATH": str(tmp_path)}, timeout=300, check=True)
    assert len(list((run / "tensorboard").iterdir())) == 2  # one event file per attempt
    records = read_jsonl(run / "metrics.jsonl")
    scalars = read_scalars(run / "tensorboard")
    for key in ("train_loss", "lr"):
        expected = [(r["step"], r[key]) for r in records if key in r]
        assert [step for step, _ in scalars[f"train/{key}"]] == [step for step, _ in expected]
        assert [v for _, v in scalars[f"train/{key}"]] == pytest.approx([v for _, v in expected], rel=1e-6)
    assert [step for step, _ in scalars["train/lr"]] == list(range(3, 61, 3))


def test_tensorboard_resumed_run_replaces_the_redone_steps(tmp_path):
    first = TensorBoardLog(tmp_path / "tb")
    for step in range(5, 45, 5):
        first.write({"time": 1.0, "step": step, "split": "train", "train_loss": 1.0})
    first.close()
    resumed = TensorBoardLog(tmp_path / "tb")  # as a run resumed from its checkpoint at step 20 would
    for step in range(25, 45, 5):
        resumed.write({"time": 2.0, "step": step, "split": "train", "train_loss": 2.0})
    resumed.close()
    assert read_scalars(tmp_path / "tb")["train/train_loss"] == [(5, 1.0), (10, 1.0), (15, 1.0), (20, 1.0),
                                                                (25, 2.0), (30, 2.0), (35, 2.0), (40, 2.0)]


def test_tensorboard_missing_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail as if not installed
    log = TensorBoardLog(tmp_path / "tb")
    log.write({"time": 1.0, "step": 5, "split": "train", "train_loss": 1.0})
    log.close()
    assert not (tmp_path / "tb").exists()


# ------------------------------------------------------------------------------------------------ completion, help
def test_completion_script_offers_every_command(stride):
    proc = stride("--", "--completion", check=True, timeout=CLI_TIMEOUT_S)
    script = proc.stdout
    top = re.search(r"^\s*stride\)\s*\n\s*opts=\"([^\"]*)\"", script, re.MULTILINE)
    assert top, script
    assert set(COMMANDS) <= set(top.group(1).split())
    assert "--self" not in script
    bash = """source /dev/stdin <<< "$SCRIPT"
COMP_WORDS=(stride pl); COMP_CWORD=1; _complete-stride; echo "${COMPREPLY[@]}"
COMP_WORDS=(stride diff --w); COMP_CWORD=2; _complete-stride; echo "${COMPREPLY[@]}"
"""
    completed = subprocess.run(["bash", "-c", bash], capture_output=True, text=True, timeout=60,
                               env={"SCRIPT": script, "PATH": "/usr/bin:/bin"})
    assert completed.stdout.splitlines() == ["plot", "--work-dir"], completed.stderr


def help_text(stride, *words: str) -> str:
    proc = stride(*words, "--help", check=True, timeout=CLI_TIMEOUT_S)
    return proc.stdout + proc.stderr  # Fire writes help to stderr when it is not a terminal


def test_help_introduces_diff_and_plot(stride):
    top = help_text(stride)
    assert re.search(r"^\s+diff\n\s+Show the config settings that differ", top, re.MULTILINE), top
    assert re.search(r"^\s+plot\n\s+Draw the runs' training and validation curves", top, re.MULTILINE), top
    for command in COMMANDS:
        assert f"stride {command} - " in help_text(stride, command)
    text = help_text(stride, "plot")
    assert "pip install 'stride[plot]'" in text and "--metric" in text
