"""The README, run as a new user would follow it: every fenced command and code block, taken from README.md at test
time, in its order, in one project folder (a copy of this repository), against the test cluster and images.

What the test cluster cannot run as written (GPU counts, partitions, image paths, hours) is mapped by PLACEHOLDERS,
one line each with its reason; every other character runs as the README has it, and each command's documented
outcome is asserted. A README block that no test claims, or a placeholder that no block uses, fails: a README change
that breaks an example fails CI. Runs last of the suite (its final block stops and restarts the shared cluster).

Needs the local Slurm cluster (SLURM_CONF) and the container images, as tests/run.sh sets up: without them these
tests fail, they do not skip.
"""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, read_json
from slurm_helpers import run_status, wait_for
from test_examples import unigram_entropy_of_train_text

README = REPO / "README.md"
STEP_TIMEOUT_S = 600
JOB_TIMEOUT_S = 420
SIF = os.environ.get("STRIDE_TEST_SIF", "(STRIDE_TEST_SIF unset: run tests/run.sh)")
DOCKER_IMAGE = os.environ.get("STRIDE_TEST_DOCKER_IMAGE", "(STRIDE_TEST_DOCKER_IMAGE unset: run tests/run.sh)")

# (as the README writes it, what runs here instead, why): the one table of what the test cluster cannot run as written.
PLACEHOLDERS = [
    ("sudo bash slurm/cluster.sh up", "bash slurm/cluster.sh up", "the tests run as root; minimal Debian has no sudo"),
    ("/scratch/$USER/digits", "experiments/digits", "the test cluster's nodes share this machine's disk"),
    ("--gpus 4", "--gpus 2", "the test cluster's nodes have two (fake) GPUs each"),
    ("--partition gpu", "--partition long", "the test cluster's partition for jobs of hours"),
    ("--tasks-per-node 8 --cpus-per-task 4 --mem 64G", "--tasks-per-node 2 --cpus-per-task 1 --mem 1G",
     "the test cluster's nodes have 4 CPUs and 4 GB each"),
    ("/images/stride.sif", SIF, "the SIF image containers/setup.sh built"),
    ("stride:cuda", DOCKER_IMAGE, "the Docker image containers/setup.sh built (CPU torch)"),
    ("experiments/digits/3", "experiments/digits/1", "the walkthrough's first SLURM run (run 0 is the set-up's)"),
    ("--time 4:00:00", "--time 1:00:00", "the test cluster's longest partition ends at 2 hours"),
    ("work_dir=/tmp/exp", "work_dir=local-cluster/exp", "a folder of this test, not a shared one"),
    ("n_trials=20", "n_trials=3", "seconds of training per test"),
    ('"epochs": 10', '"epochs": 3', "seconds of training per test"),
]

# Files the README's commands assume the user has written; my_pkg/lm.py is the README's own Task block.
MY_SETTINGS = "training_kwargs:\n  epochs: 2\n"
MY_MODELS = '''"""A model that computes its own loss (task_kwargs.task_name=model_loss)."""
import math

import torch


class SelfLossNet(torch.nn.Module):
    def __init__(self, input_shape, num_outputs):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(math.prod(input_shape), 64),
                                       torch.nn.ReLU(), torch.nn.Linear(64, num_outputs))

    def forward(self, images, labels):
        logits = self.net(images)
        errors = (logits.argmax(dim=1) != labels).float().mean()
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "error_rate": errors}
'''
# The experiment layer of experiments/digits while the SLURM block submits its first job: rank 0 waits at each epoch end
# while HOLD exists, so the operating block (status, logs --follow, cancel at typing speed) meets that job running.
HOLD_CALLBACK = '''"""Holds rank 0 at each epoch end while a file exists (bounded)."""
import time
from pathlib import Path

from stride import Callback


class HoldWhileFileExists(Callback):
    def __init__(self, path: str, max_s: float = 300.0):
        self.path, self.max_s = Path(path), max_s

    def on_epoch_end(self, state):
        deadline = time.monotonic() + self.max_s
        while self.path.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
'''
# Four images the shape of the digits dataset's (the README's `new_images`).
NEW_IMAGES = "import torch\nnew_images = torch.rand(4, 1, 8, 8) * 16\n"


@dataclass
class Block:
    line: int
    lang: str
    text: str

    @property
    def first(self) -> str:
        return self.text.splitlines()[0]


def readme_blocks() -> list[Block]:
    blocks, lines = [], README.read_text().splitlines()
    index = 0
    while index < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[index])
        if fence:
            end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
            blocks.append(Block(index + 1, fence.group(1), "\n".join(lines[index + 1:end]) + "\n"))
            index = end
        index += 1
    return blocks


def mapped(text: str) -> str:
    for written, here, _why in PLACEHOLDERS:
        text = text.replace(written, here)
    return text


def block(first: str) -> Block:
    found = [b for b in readme_blocks() if b.text.startswith(first)]
    assert len(found) == 1, f"README has {len(found)} blocks starting with {first!r}: update tests/test_walkthrough.py"
    return found[0]


def commands(b: Block) -> list[str]:
    """The block's commands, mapped; a line ending in a backslash continues on the next."""
    joined = mapped(b.text).replace("\\\n", " ")
    return [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


class Shell:
    """The README's lines run one at a time in bash, as a user types them: exported variables carry over from one
    line to the next (`eval "$(bash slurm/cluster.sh env)"`), each line's output and exit code stay apart."""

    def __init__(self, cwd: Path, env: dict, env_file: Path):
        self.cwd, self.env_file = cwd, env_file
        self.env_file.write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()))

    def script(self, line: str) -> str:
        saved = shlex.quote(str(self.env_file))
        return f"source {saved}\ncd {shlex.quote(str(self.cwd))}\n{line}\nrc=$?\nexport -p > {saved}\nexit $rc\n"

    def run(self, line: str, timeout: float = STEP_TIMEOUT_S) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", self.script(line)], capture_output=True, text=True, timeout=timeout,
                              env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")})

    def ok(self, line: str, timeout: float = STEP_TIMEOUT_S) -> subprocess.CompletedProcess:
        proc = self.run(line, timeout)
        assert proc.returncode == 0, f"`{line}` exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    def start(self, line: str, out: Path) -> subprocess.Popen:
        """A line that runs until stopped (a server, --follow), in its own process group, output to `out`."""
        return subprocess.Popen(["bash", "-c", self.script(line)], stdout=open(out, "wb"), stderr=subprocess.STDOUT,
                                start_new_session=True,
                                env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")})


def stop(proc: subprocess.Popen, sig: int = signal.SIGINT) -> int:
    """What Ctrl-C does: the signal to the whole foreground group; bounded, then killed."""
    os.killpg(proc.pid, sig)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait(timeout=30)


def run_folder(proc: subprocess.CompletedProcess) -> Path:
    return Path(re.findall(r"run folder: (\S+)", proc.stdout)[-1])


def wait_state(run: Path, states: tuple[str, ...], timeout_s: float = JOB_TIMEOUT_S) -> dict:
    return wait_for(lambda: run_status(run) if run_status(run).get("state") in states else None, timeout_s,
                    interval_s=1.0, what=f"{run} to be {'/'.join(states)} (now {run_status(run).get('state')})")


def run_python(project: Path, code: str) -> subprocess.CompletedProcess:
    script = project / "walkthrough_block.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(script)], cwd=project, capture_output=True, text=True,
                          timeout=STEP_TIMEOUT_S, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# --------------------------------------------------------------------------------------------------- the project
@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A clone's files (tracked and new, not ignored), plus the files the README assumes the user wrote."""
    root = tmp_path_factory.mktemp("walkthrough") / "stride"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True, timeout=60).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    (root / "my_settings.yaml").write_text(MY_SETTINGS)
    (root / "my_pkg").mkdir()
    (root / "my_pkg" / "__init__.py").write_text("")
    (root / "my_pkg" / "models.py").write_text(MY_MODELS)
    (root / "my_pkg" / "lm.py").write_text(block("import torch\nfrom stride import Task").text)
    (root / "walkthrough_hold.py").write_text(HOLD_CALLBACK)
    return root


@pytest.fixture(scope="module")
def shell(project) -> Shell:
    """The user's shell: the test venv's `stride`, `python` and `tensorboard` on PATH, the test cluster's SLURM_CONF;
    one thread per process (two cores shared by every rank). No PYTHONPATH: the project folder is importable by
    itself."""
    env = {k: v for k, v in os.environ.items() if k.startswith(("SLURM_CONF", "STRIDE_SLURM_DIR", "DOCKER_HOST",
                                                                "CONTAINERS_CONF", "LANG", "USER", "HOME"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    env["OMP_NUM_THREADS"] = "1"
    return Shell(project, env, project.parent / "shell.env")


# --------------------------------------------------------------------------------------------------- every block
BLOCKS = [  # the first line of every fenced block in README.md, in order, and the test that runs it
    ("python3 -m venv .venv", "test_set_up_installs_and_trains_the_default"),
    ("bash tests/run.sh", "test_the_test_command_is_what_ci_runs"),
    ("stride config work_dir=exp", "test_configs"),
    ("$ stride local work_dir=exp training_kwargs.lrr=1e-3", "test_a_mistake_is_one_line"),
    ("import torch\nfrom stride import Trainer, DataSplits", "test_the_python_api_example_learns"),
    ("stride local work_dir=exp dataset_kwargs", "test_own_training_without_code"),
    ("import torch\nfrom stride import Task", "test_a_task_of_your_own"),
    ("import optuna", "test_optuna_pruning"),
    ("from stride import Trainer\n\ntrainer = Trainer(work_dir=\"experiments/digits\")", "test_inference"),
    ("stride submit work_dir=/scratch/$USER/digits --nodes 2 --gpus 4 --time", "test_training_on_slurm"),
    ("stride status experiments/digits ", "test_operating_runs"),
    ("stride submit work_dir=exp training_kwargs.lr=", "test_sweeps"),
    ("stride diff exp/0 exp/1", "test_comparing_runs"),
    ("stride resume experiments/digits/3 --local", "test_resuming"),
    ("stride submit work_dir=/scratch/$USER/digits --nodes 2 --gpus 4 --container", "test_containers"),
    ("experiments/digits/0/", "test_a_run_folder_holds_what_the_readme_lists"),
    ("sudo bash slurm/cluster.sh up", "test_a_local_slurm_cluster"),
]


def test_every_readme_block_is_run_and_every_placeholder_is_used():
    blocks = readme_blocks()
    unclaimed = [f"line {b.line}: {b.first}" for b in blocks
                 if sum(b.text.startswith(first) for first, _ in BLOCKS) != 1]
    assert not unclaimed, f"README blocks no test of tests/test_walkthrough.py runs: {unclaimed}"
    assert len(blocks) == len(BLOCKS), [b.first for b in blocks]
    names = {name for name in globals() if name.startswith("test_")}
    assert {test for _, test in BLOCKS} <= names
    text = README.read_text()
    assert not [written for written, _, _ in PLACEHOLDERS if written not in text], "stale placeholders"


# --------------------------------------------------------------------------------------------------- set up
def test_set_up_installs_and_trains_the_default(project, shell):
    """The first set-up command, exactly as written, in a fresh clone: a new venv, the CPU torch, the package."""
    (line,) = commands(block("python3 -m venv .venv"))
    assert line == mapped(line)
    proc = shell.ok(line)
    run = project / "experiments" / "digits" / "0"
    assert proc.stdout.strip().splitlines()[-1] == f"run folder: {run}"
    assert (project / ".venv" / "bin" / "stride").is_file()
    results = read_json(run / "results.json")
    assert results["test_accuracy"] >= 0.97  # "about 99% test accuracy"
    assert read_json(run / "config.json")["dataset_kwargs"]["dataset_name"] == "digits"
    assert read_json(run / "config.json")["model_kwargs"]["model_name"] == "CNN"


def test_the_test_command_is_what_ci_runs():
    """Not run from inside the tests (it is what runs them): CI's .ci/run calls exactly it, and it fails on skips."""
    (line,) = commands(block("bash tests/run.sh"))
    assert line in (REPO / ".ci" / "run").read_text().splitlines()
    run_sh = (REPO / "tests" / "run.sh").read_text()
    assert "STRIDE_FORBID_SKIPS=1" in run_sh and "slurm/cluster.sh up" in run_sh and "containers/setup.sh" in run_sh
    assert "torch==2.13.0" in run_sh


# --------------------------------------------------------------------------------------------------- configs
def test_configs(project, shell):
    show, five_epochs, with_file = commands(block("stride config work_dir=exp"))
    proc = shell.ok(show)
    shown = __import__("yaml").safe_load(proc.stdout)
    assert shown["model_kwargs"]["model_name"] == "ResNet" and shown["work_dir"] == str(project / "exp")
    assert not (project / "exp").exists()  # "run nothing"
    run = run_folder(shell.ok(five_epochs))
    assert run == project / "exp" / "0" and read_json(run / "results.json")["epochs"] == 5
    run = run_folder(shell.ok(with_file))
    config, results = read_json(run / "config.json"), read_json(run / "results.json")
    assert config["load_data_kwargs"]["batch_size"] == 128 and config["training_kwargs"]["epochs"] == 2
    assert results["world_size"] == 2 and results["epochs"] == 2


def test_a_mistake_is_one_line(project, shell):
    text = block("$ stride local work_dir=exp training_kwargs.lrr=1e-3").text.splitlines()
    assert text[0].startswith("$ ")
    proc = shell.run(text[0][2:])
    assert proc.returncode == 2 and proc.stdout == ""
    pattern = ".*".join(re.escape(part) for part in text[1].split("..."))
    assert len(proc.stderr.splitlines()) == 1 and re.fullmatch(pattern, proc.stderr.strip()), proc.stderr
    assert not (project / "exp" / "2").exists()


# --------------------------------------------------------------------------------------------------- your code
def test_the_python_api_example_learns(project):
    code = block("import torch\nfrom stride import Trainer, DataSplits").text
    check = ("\nimport json\nprint(json.dumps({'results': results, 'run': str(again.run_dir.path),"
             " 'loaded': type(again.model).__name__}))\n")
    out = json.loads(run_python(project, code + check).stdout.strip().splitlines()[-1])
    assert out["results"]["test_accuracy"] >= 0.9  # two separable blobs: it learns
    assert set(out["results"]) >= {"test_accuracy", "test_loss"}
    assert out["run"] == str(project / "experiments" / "blobs" / "0") and out["loaded"] == "Linear"


def test_own_training_without_code(project, shell):
    huber, f1, model_loss = commands(block("stride local work_dir=exp dataset_kwargs"))
    results = read_json(run_folder(shell.ok(huber)) / "results.json")
    assert results["best"]["metric"] == "val_r2" and results["test_r2"] > 0.5 and "test_mae" in results
    results = read_json(run_folder(shell.ok(f1)) / "results.json")
    assert results["best"]["metric"] == "val_f1_macro" and results["test_f1_macro"] > 0.9
    results = read_json(run_folder(shell.ok(model_loss)) / "results.json")
    assert results["test_error_rate"] < 0.2 and "test_loss" in results  # the model's own scalars are metrics


def test_a_task_of_your_own(project, shell):
    """The README's NextToken, saved as my_pkg/lm.py, on the charlm example's data and model (its `...`)."""
    line = "stride local work_dir=exp task_kwargs.task_name=my_pkg.lm:NextToken examples/charlm/charlm.yaml"
    assert "`stride local work_dir=exp task_kwargs.task_name=my_pkg.lm:NextToken ...`" in README.read_text()
    run = run_folder(shell.ok(line))
    config, results = read_json(run / "config.json"), read_json(run / "results.json")
    assert config["task_kwargs"]["task_name"] == "my_pkg.lm:NextToken"
    assert results["test_perplexity"] == pytest.approx(math.exp(results["test_loss"]), rel=1e-6)
    assert results["test_perplexity"] < math.exp(unigram_entropy_of_train_text())  # beats character counts


def test_optuna_pruning(project):
    code = mapped(block("import optuna").text)
    run_python(project, code)
    runs = sorted((project / "experiments" / "hpo").iterdir(), key=lambda p: p.name)
    runs = [run for run in runs if run.name.isdigit()]
    assert len(runs) == 3
    states = [read_json(run / "status.json")["state"] for run in runs]
    assert states.count("completed") >= 1, states
    best = max(read_json(run / "results.json")["best"]["value"] for run in runs if (run / "results.json").exists())
    assert best > 0.5


def test_inference(project):
    code = block('from stride import Trainer\n\ntrainer = Trainer(work_dir="experiments/digits")').text
    check = ("\nimport json\nprint(json.dumps({'shape': list(predictions.shape), 'test': test,"
             " 'classes': sorted(set(predictions.tolist()))}))\n")
    out = json.loads(run_python(project, NEW_IMAGES + code + check).stdout.strip().splitlines()[-1])
    recorded = read_json(project / "experiments" / "digits" / "0" / "results.json")
    assert out["shape"] == [4] and all(0 <= c < 10 for c in out["classes"])
    assert out["test"]["test_accuracy"] == pytest.approx(recorded["test_accuracy"])  # the best weights, again


# --------------------------------------------------------------------------------------------------- SLURM
@pytest.fixture(scope="module")
def slurm_runs() -> dict:
    """Runs the SLURM block submitted, for the blocks after it (operating them, resuming them)."""
    return {}


def test_training_on_slurm(project, shell, slurm_runs):
    gpu_job, cpu_job, dry_run = commands(block("stride submit work_dir=/scratch/$USER/digits --nodes 2 --gpus 4 --time"))
    hold, layer = project / "hold", project / "experiments" / "digits" / "config.yaml"
    hold.touch()
    layer.write_text(f"callbacks: [{{name: 'walkthrough_hold:HoldWhileFileExists', path: '{hold}'}}]\n")
    try:
        proc = shell.ok(gpu_job)
    finally:
        layer.unlink()
    assert re.search(r"^submitted job \d+$", proc.stdout, re.M)
    slurm_runs["gpu"] = run = run_folder(proc)
    assert run == project / "experiments" / "digits" / "1"
    config = read_json(run / "config.json")["slurm"]
    assert (config["nodes"], config["gpus_per_node"], config["tasks_per_node"], config["partition"],
            config["time_min"]) == (2, 2, 2, "long", 120)
    proc = shell.ok(cpu_job)
    slurm_runs["cpu"] = run = run_folder(proc)
    script = next((run / "slurm").glob("*_submission.sh")).read_text()
    for option in ("--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--mem=1GB"):
        assert f"#SBATCH {option}\n" in script, script
    proc = shell.ok(dry_run)
    assert "#SBATCH --mail-type=END\n" in proc.stdout and "\nmodule load cuda/12.4\n" in proc.stdout
    assert "#   ok    Slurm would accept the request (sbatch --test-only)" in proc.stdout
    assert "FAIL" not in proc.stdout
    assert not (run.parent / str(int(run.name) + 1)).exists()  # a dry run writes nothing


def test_operating_runs(project, shell, slurm_runs, tmp_path):
    every, one, follow, slurm_err, cancel = commands(block("stride status experiments/digits "))
    run, hold = slurm_runs["gpu"], project / "hold"
    try:
        held_while_operated(shell, run, every, one, follow, slurm_err, cancel, tmp_path / "follow.out")
    finally:
        hold.unlink(missing_ok=True)
    wait_state(run, ("cancelled",))


def held_while_operated(shell, run, every, one, follow, slurm_err, cancel, log):
    epoch_done = " rank 1 local 1 INFO epoch 1/20 done"
    wait_for(lambda: (run / "logs" / "rank_1.log").exists() and epoch_done in (run / "logs" / "rank_1.log")
             .read_text(), JOB_TIMEOUT_S, what="rank 1's first epoch")
    table = shell.ok(every).stdout
    assert re.search(r"^\s*0\s+completed\b", table, re.M) and re.search(r"^\s*1\s+running\b", table, re.M), table
    detail = shell.ok(one).stdout
    assert re.search(r"^state: +running$", detail, re.M) and re.search(r"^nodes: +node\[1-2\]$", detail, re.M), detail
    assert re.search(r"^epoch: +1/20$", detail, re.M), detail
    following = shell.start(follow, log)
    wait_for(lambda: " rank 1 local 1 INFO epoch " in log.read_text(), 120, what="--follow to print rank 1's epochs")
    assert following.poll() is None  # still following the running job
    stop(following)
    assert all(" rank 1 local 1 " in line for line in log.read_text().splitlines() if " INFO " in line)
    proc = shell.run(slurm_err)
    assert proc.returncode == 0 and re.match(r"stride: attempt slurm-\d+-0 \(job \d+\) starting on node1\n", proc.stdout)
    err_files = list((run / "slurm").glob("*_0_log.err"))
    assert len(err_files) == 1 and err_files[0].read_text().startswith(proc.stdout), proc.stdout  # task 0's stderr
    proc = shell.ok(cancel)
    assert "cancel" in proc.stdout.lower()


def test_sweeps(project, shell, slurm_runs):
    array, dry_run, status = commands(block("stride submit work_dir=exp training_kwargs.lr="))
    wait_state(slurm_runs["cpu"], ("completed",))
    proc = shell.ok(array)
    assert re.search(r"^submitted job array \d+ \(6 runs, at most 4 at once\)$", proc.stdout, re.M), proc.stdout
    points = [Path(p) for p in re.findall(r"run folder: (\S+)", proc.stdout)]
    assert len(points) == 6
    swept = {(read_json(p / "config.json")["training_kwargs"]["lr"], read_json(p / "config.json")["training_kwargs"]
              ["seed"]) for p in points}
    assert swept == {(lr, seed) for lr in (1e-3, 3e-4) for seed in range(3)}
    proc = shell.ok(dry_run)
    assert "sweep of 2 runs as one job array" in proc.stdout and "#SBATCH --array=0-1%2" in proc.stdout
    for point in points:
        wait_state(point, ("completed",))
    table = shell.ok(status).stdout
    lines = table.split("\nsweep ", 1)[1].splitlines()  # the sweep grouped, after the other runs
    assert lines[0].endswith(": 6 runs over training_kwargs.lr, training_kwargs.seed"), table
    header = lines[1].split()
    assert header[:5] == ["RUN", "STATE", "JOB_ID", "LR", "SEED"], table  # swept keys as columns
    rows = [line.split() for line in lines[2:8]]
    assert sorted(row[0] for row in rows) == sorted(point.name for point in points)
    accuracies = [float(row[header.index("TEST_ACCURACY")]) for row in rows]
    assert accuracies == sorted(accuracies, reverse=True)


def test_comparing_runs(project, shell, tmp_path):
    diff, plot, plot_two, tensorboard = commands(block("stride diff exp/0 exp/1"))
    out = shell.ok(diff).stdout.strip().splitlines()
    assert out and all(re.fullmatch(r"\S+: .+ -> .+", line) for line in out), out
    proc = shell.ok(plot)
    assert (project / "exp" / "plots" / "train_loss-val_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert proc.stderr == ""  # no library warnings on the user's terminal
    shell.ok(plot_two)
    assert (project / "val_loss.png").read_bytes()[:4] == b"\x89PNG"
    log = tmp_path / "tensorboard.out"
    server = shell.start(tensorboard, log)
    try:
        url = wait_for(lambda: re.search(r"(http://localhost:\d+/)", log.read_text()), 120,
                       what="tensorboard to serve").group(1)
        runs = wait_for(lambda: json.loads(urllib.request.urlopen(url + "data/runs", timeout=10).read()) or None,
                        60, interval_s=2.0, what="tensorboard to list the runs")
        assert "0/tensorboard" in runs, runs
    finally:
        stop(server)


def test_resuming(project, shell, slurm_runs):
    local, more_epochs = commands(block("stride resume experiments/digits/3 --local"))
    run = slurm_runs["gpu"]
    assert run_status(run)["state"] == "cancelled"
    shell.ok(local)
    status = read_json(run / "status.json")
    assert status["state"] == "completed" and status["epoch"] == 20
    assert read_json(run / "results.json")["world_size"] == 4
    proc = shell.ok(more_epochs)
    assert "submitted job" in proc.stdout
    slurm_runs["resumed"] = run


def test_containers(project, shell, slurm_runs):
    submit, local, dry_run = commands(block("stride submit work_dir=/scratch/$USER/digits --nodes 2 --gpus 4 --con"))
    proc = shell.ok(dry_run)
    assert f"apptainer exec --contain --bind {project / 'exp'}:{project / 'exp'} " in proc.stdout
    run = run_folder(shell.ok(local))
    assert read_json(run / "metadata.json")["container"]["image"] == DOCKER_IMAGE
    assert all(" INFO python /usr/bin/python3 " in (run / "logs" / f"rank_{r}.log").read_text() for r in range(2))
    wait_state(slurm_runs["resumed"], ("completed",))  # the resumed job holds the GPUs this one asks for
    assert read_json(slurm_runs["resumed"] / "status.json")["epoch"] == 40
    run = run_folder(shell.ok(submit))
    wait_state(run, ("completed",))
    assert read_json(run / "metadata.json")["container"]["image"] == SIF
    assert all(" INFO python /usr/bin/python3 " in (run / "logs" / f"rank_{r}.log").read_text() for r in range(4))
    slurm_runs["container"] = run


def test_a_run_folder_holds_what_the_readme_lists(project, shell, slurm_runs):
    text = block("experiments/digits/0/").text
    names = re.findall(r"^  (\S+)", text, re.M)
    run = slurm_runs["resumed"]
    for name in names:
        if name == "failures/":
            continue  # below: only a rank that raised writes one
        path = run / name.replace("rank_N", "rank_1").rstrip("/")
        assert path.exists(), f"{name} is not in {run}"
    (project / "my_pkg" / "broken.py").write_text(
        "from stride.datasets.builtin import digits\n\n"
        "def splits(run_dir=None):\n"
        "    if run_dir is not None:\n"
        "        raise RuntimeError('broken on purpose')\n"
        "    return digits()\n")
    proc = shell.run("stride local work_dir=broken dataset_kwargs.dataset_name=my_pkg.broken:splits")
    assert proc.returncode != 0 and (project / "broken" / "0" / "failures" / "rank_0.json").is_file(), proc.stderr
    reproduce = re.search(r"`(stride local experiments/digits/0/config\.json run=null)`", text).group(1)
    again = run_folder(shell.ok(reproduce))
    original = read_json(project / "experiments" / "digits" / "0" / "config.json")
    assert {k: v for k, v in read_json(again / "config.json").items() if k != "run"} == {
        k: v for k, v in original.items() if k != "run"}


def test_a_local_slurm_cluster(project, shell):
    up, env, submit, down = commands(block("sudo bash slurm/cluster.sh up"))
    # A shell without the suite's SLURM_CONF: the block's own `eval` must set it.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    clean = Shell(project, {"PATH": path, "OMP_NUM_THREADS": "1"}, project.parent / "local-cluster.env")
    proc = clean.ok(up)
    assert "already up and healthy" in proc.stdout + proc.stderr  # tests/run.sh started it: `up` is idempotent
    clean.ok(env)
    assert "SLURM_CONF=" in clean.env_file.read_text()
    run = run_folder(clean.ok(submit))
    assert run == project / "local-cluster" / "exp" / "0"
    wait_state(run, ("completed",))
    assert read_json(run / "results.json")["world_size"] == 4
    try:
        clean.ok(down)
        assert clean.run("sinfo").returncode != 0  # the controller is gone
    finally:
        subprocess.run(["bash", str(REPO / "slurm" / "cluster.sh"), "up"], capture_output=True, timeout=600,
                       check=True)  # back up for whatever runs next
