"""The workloads in examples/, run as their READMEs say: a character-level transformer language model with its own
Task (charlm), CSV regression whose normalisation lives in the run folder (tabular), a two-input classifier picked
by macro-F1 (twoinput). Each trains with `stride local`, `--nproc 2` and as a 2-node x 2-task SLURM job, resumes
bitwise after a SIGTERM mid-epoch; tabular also trains inside a Charliecloud container. Then their bad inputs.

Needs the local Slurm cluster (SLURM_CONF) and the container images (STRIDE_TEST_IMAGE_DIR), as tests/run.sh sets
up: without them the tests that need them fail, they do not skip.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import (CLI_TIMEOUT_S, REPO, cli_env, one_line_error, read_json, read_jsonl, run_stride,
                      start_stride)
from slurm_helpers import job_state, submitted, wait_gone
from test_resume import assert_bitwise_equal  # the one definition of "bitwise equal"

if str(REPO) not in sys.path:  # the examples are a user's code on PYTHONPATH (cli_env gives the CLI the same)
    sys.path.insert(0, str(REPO))
EXAMPLES = ("charlm", "tabular", "twoinput")
CONFIG = {name: str(REPO / "examples" / name / f"{name}.yaml") for name in EXAMPLES}
# One thread per process: the machine has two cores shared by every rank (and often by other test runs), and torch's
# default of one thread per core makes each step many times slower there. tests/ holds the plug-ins named below.
ENV = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent)}
EXACT = ["training_kwargs.deterministic=true", "sinks=[]"]
SLURM_JOB = ["--profile", "local", "--nodes", "2", "--tasks-per-node", "2"]
# The twoinput job reads (top, bottom, label) tuples where its local runs read dicts: both batch forms, every launcher.
SLURM_EXTRA = {"charlm": [], "tabular": [], "twoinput": ["dataset_kwargs.as_tuple=true"]}
PAUSE_AT = {"charlm": 20, "tabular": 60, "twoinput": 50}  # log points inside an epoch (61, 25, 40 steps per epoch)
JOB_TIMEOUT_S = 420


def cli(*args: str, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return run_stride(*args, cwd=cwd, env=ENV, **kwargs)


def train(cwd: Path, name: str, *extra: str) -> Path:
    cli("local", "work_dir=exp", CONFIG[name], *EXACT, *extra, cwd=cwd, check=True)
    return cwd / "exp" / "0"


def loaded(run: Path, **kwargs):
    from stride import Trainer

    return Trainer(work_dir=run.parent).load_run(run.name, **kwargs)


def unigram_entropy_of_train_text() -> float:
    from examples.charlm.data import MODULES, corpus, split_text, unigram_entropy

    return unigram_entropy(split_text(corpus(MODULES), 0.1, 0.1)["train"])


# --------------------------------------------------------------------------------------------------- the runs
@pytest.fixture(scope="module", autouse=True)
def slurm_jobs(tmp_path_factory):
    """One 2-node x 2-task job per example, submitted first so that they train while the local tests run; a job that
    could not be submitted is its error message, which fails that example's SLURM test (and no other test)."""
    if not os.environ.get("SLURM_CONF"):
        yield dict.fromkeys(EXAMPLES, "SLURM_CONF is unset: start the test cluster (`bash slurm/cluster.sh up`, then "
                                      "eval \"$(bash slurm/cluster.sh env)\"; tests/run.sh does both)")
        return
    submitting = {}
    for name in EXAMPLES:  # at once: each submission checks one batch first, which takes seconds
        cwd = tmp_path_factory.mktemp(f"slurm-{name}")
        argv = [sys.executable, "-m", "stride", "submit", "work_dir=exp", CONFIG[name], *EXACT, *SLURM_EXTRA[name],
                *SLURM_JOB]
        submitting[name] = subprocess.Popen(argv, cwd=cwd, env=cli_env(ENV), stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True)
    jobs: dict = {}
    for name, proc in submitting.items():
        out, err = proc.communicate(timeout=CLI_TIMEOUT_S)
        jobs[name] = submitted(subprocess.CompletedProcess(proc.args, proc.returncode, out, err)) \
            if proc.returncode == 0 else f"stride submit exited {proc.returncode}: {err}{out}"
    yield jobs
    for job in jobs.values():
        if not isinstance(job, str) and job_state(job[1]) != "GONE":
            subprocess.run(["scancel", job[1]], timeout=30, check=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each example's uninterrupted deterministic one-process run, trained on first use."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = train(tmp_path_factory.mktemp(f"local-{name}"), name)
        return made[name]

    return get


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = train(tmp_path_factory.mktemp(f"nproc2-{name}"), name, "--nproc", "2")
        return made[name]

    return get


# ------------------------------------------------------------------------------------------------------ charlm
def test_charlm_beats_the_unigram_entropy_of_its_text(runs):
    run = runs("charlm")
    vocab = read_json(run / "vocab.json")
    entropy = unigram_entropy_of_train_text()
    assert vocab["unigram_entropy_nats"] == pytest.approx(entropy)
    results = read_json(run / "results.json")
    assert results["val_loss"] < entropy - 0.15, (results["val_loss"], entropy)
    assert results["test_loss"] < entropy
    assert results["val_perplexity"] == pytest.approx(math.exp(results["val_loss"]))
    assert results["val_bits_per_char"] == pytest.approx(results["val_loss"] / math.log(2))
    assert results["best"]["metric"] == "val_loss"


def test_charlm_load_run_decodes_with_the_vocabulary_in_the_run_folder(runs):
    from examples.charlm.data import Vocabulary
    from examples.charlm.generate import generate

    run = runs("charlm")
    trainer = loaded(run)
    text = generate(trainer, "Return the ", num_chars=40)
    assert trainer._data is None, "generation must not build the dataset"
    chars = set(Vocabulary.load(run / "vocab.json").chars)
    assert text.startswith("Return the ") and len(text) == len("Return the ") + 40 and set(text) <= chars
    # The stored vocabulary, not one rebuilt from the text, gives the run's own val loss back.
    again = loaded(run, splits=("val",)).evaluate("val")
    assert again["val_loss"] == pytest.approx(read_json(run / "results.json")["val_loss"], rel=1e-6)


def test_charlm_two_ranks_sum_the_log_likelihood(two_rank_runs):
    run = two_rank_runs("charlm")
    results = read_json(run / "results.json")
    assert results["world_size"] == 2 and results["val_loss"] < unigram_entropy_of_train_text()
    # Total NLL over total characters of both shards: what one process measures on the whole split.
    one = loaded(run).evaluate("val")
    assert one["val_loss"] == pytest.approx(results["val_loss"], rel=1e-6)
    assert one["val_perplexity"] == pytest.approx(results["val_perplexity"], rel=1e-5)


# ----------------------------------------------------------------------------------------------------- tabular
def test_tabular_statistics_are_the_train_splits_and_live_in_the_run_folder(runs):
    from examples.tabular.data import DATA_DIR, compute_stats, read_csv

    run = runs("tabular")
    assert read_json(run / "normalization.json") == compute_stats(*read_csv(DATA_DIR / "train.csv", "price"), "price")
    assert not list(run.glob(".normalization.json.*")), "a temporary file was left behind"
    results = read_json(run / "results.json")
    assert results["test_r2"] > 0.95 and results["val_r2"] > 0.95
    val = [r for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "val"]
    assert results["best"]["metric"] == "val_r2" and results["best"]["value"] == max(r["val_r2"] for r in val)
    # Early stopping ended it before its 40 epochs; the plateau schedule lowered the lr before that.
    assert results["ended_early"]["reason"].startswith("early stopping") and results["epochs"] < 40
    lrs = [r["lr"] for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "train"]
    assert lrs[-1] < lrs[0]
    config = read_json(run / "config.json")
    assert config["task_kwargs"] == {"task_name": "auto", "loss": "HuberLoss", "metrics": ["mae", "r2"]}


def test_tabular_predicts_new_raw_rows_with_the_runs_statistics(runs):
    import csv

    from examples.tabular.data import DATA_DIR
    from examples.tabular.make_data import price, sample
    from examples.tabular.predict import predict_rows

    run = runs("tabular")
    trainer = loaded(run)
    new = sample(50, seed=1234)
    predicted = predict_rows(trainer, new)
    std = read_json(run / "normalization.json")["target_std"]
    assert sum(abs(p - price(row)) for p, row in zip(predicted, new)) / len(new) < 0.15 * std
    # On the test file, the raw-unit error is the run's own test_mae (normalised units) times the target's std.
    with open(DATA_DIR / "test.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    mae = sum(abs(p - float(row["price"])) for p, row in zip(predict_rows(trainer, rows), rows)) / len(rows)
    assert mae == pytest.approx(read_json(run / "results.json")["test_mae"] * std, rel=1e-4)


def test_tabular_load_run_restores_statistics_and_refuses_without_them(runs, tmp_path):
    from stride.errors import ConfigError

    run = runs("tabular")
    results = read_json(run / "results.json")
    # Only the test split: the statistics can only come from the run folder.
    again = loaded(run, splits=("test",)).evaluate("test")
    assert again["test_r2"] == pytest.approx(results["test_r2"], rel=1e-9)
    copy = tmp_path / "exp" / "0"
    shutil.copytree(run, copy)
    (copy / "normalization.json").unlink()
    with pytest.raises(ConfigError, match="normalization.json is missing and the train split was not asked for"):
        loaded(copy, splits=("test",))


def test_tabular_targets_that_would_broadcast_are_refused_before_the_run_exists(tmp_path):
    """(N,) targets for a model that returns (N, 1): HuberLoss would broadcast them to (N, N) and train on wrong
    pairs without a word. The check before the run refuses it."""
    proc = cli("local", "work_dir=exp", CONFIG["tabular"], "dataset_kwargs.squeeze_target=true", cwd=tmp_path)
    one_line_error(proc, "output has shape (16, 1) but the targets (16,)", "HuberLoss would broadcast")
    assert not (tmp_path / "exp").exists()


# ---------------------------------------------------------------------------------------------------- twoinput
def test_twoinput_keeps_the_weights_with_the_best_macro_f1(runs):
    run = runs("twoinput")
    results = read_json(run / "results.json")
    val = [r for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "val"]
    best = max(val, key=lambda r: r["val_f1_macro"])
    assert results["best"] == {"metric": "val_f1_macro", "value": best["val_f1_macro"], "epoch": best["epoch"],
                               "step": best["step"]}
    assert torch.load(run / "weights" / "best.pt", weights_only=True)["best"] == results["best"]
    assert results["val_f1_macro"] == pytest.approx(best["val_f1_macro"])  # evaluated again with best.pt
    assert results["test_accuracy"] > 0.7 and 0.7 < results["test_f1_macro"] <= 1


def test_twoinput_takes_its_inputs_as_a_dict_or_as_a_tuple(runs):
    from torch.utils.data import DataLoader

    from examples.twoinput.data import build

    run = runs("twoinput")
    trainer = loaded(run)
    top, bottom = torch.rand(5, 1, 4, 8), torch.rand(5, 1, 4, 8)
    assert torch.equal(trainer.predict({"top": top, "bottom": bottom}), trainer.predict((top, bottom)))
    tuples = DataLoader(build(as_tuple=True).test, batch_size=64)
    measured = trainer.evaluate("test", tuples)
    results = read_json(run / "results.json")
    assert measured == pytest.approx({k: v for k, v in results.items() if k.startswith("test_")})


def _f1_per_shard(trainer, world_size: int) -> list[float]:
    from torch.utils.data import DataLoader, Subset

    val = trainer.data.val
    return [trainer.evaluate("val", DataLoader(Subset(val, range(rank, len(val), world_size)), batch_size=64))[
        "val_f1_macro"] for rank in range(world_size)]


def test_twoinput_macro_f1_of_two_ranks_comes_from_summed_confusion_counts(two_rank_runs):
    run = two_rank_runs("twoinput")
    results = read_json(run / "results.json")
    assert results["world_size"] == 2
    trainer = loaded(run)
    assert trainer.evaluate("val")["val_f1_macro"] == pytest.approx(results["val_f1_macro"], abs=1e-12)
    # The average of each rank's own F1 is another number: stride does not report that.
    shards = _f1_per_shard(trainer, 2)
    assert abs(sum(shards) / 2 - results["val_f1_macro"]) > 1e-6, shards


# ------------------------------------------------------------------------------------- stop, resume, bitwise
@pytest.mark.parametrize("name", EXAMPLES)
def test_sigterm_mid_epoch_then_resume_is_bitwise_identical_to_an_uninterrupted_run(name, runs, tmp_path):
    whole = runs(name)
    step = PAUSE_AT[name]
    proc = start_stride("local", "work_dir=exp", CONFIG[name], *EXACT,
                        f"callbacks=[{{name: example_plugins:PauseAt, step: {step}}}]", cwd=tmp_path, env=ENV)
    cut = tmp_path / "exp" / "0"
    try:
        deadline = time.monotonic() + 120
        while not any(r["split"] == "train" and r["step"] == step for r in _records(cut)):
            assert proc.poll() is None, (tmp_path / "stride.out").read_text()
            assert time.monotonic() < deadline, f"the run never reached step {step}"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
    status = read_json(cut / "status.json")
    assert status["state"] == "stopped" and status["step"] == step + 1
    latest = (cut / "checkpoints" / "latest").read_text().strip()
    assert torch.load(cut / "checkpoints" / latest, weights_only=True)["batches_done"] > 0, "not mid-epoch"
    cli("resume", str(cut), "--local", cwd=tmp_path, check=True)
    assert_bitwise_equal(whole, cut)
    assert [(r["split"], r["step"]) for r in read_jsonl(cut / "metrics.jsonl")] == \
        [(r["split"], r["step"]) for r in read_jsonl(whole / "metrics.jsonl")]
    assert read_json(cut / "status.json")["state"] == "completed"


def _records(run: Path) -> list[dict]:
    try:
        return read_jsonl(run / "metrics.jsonl")
    except (FileNotFoundError, json.JSONDecodeError):
        return []


# ---------------------------------------------------------------------------------------------------- container
def test_tabular_trains_in_a_charliecloud_container_as_on_the_host(two_rank_runs, tmp_path):
    """Every rank runs the image's Python; the example's code (and this checkout) is bound into it and put on its
    PYTHONPATH with container.binds / container.env."""
    image = os.environ.get("STRIDE_TEST_IMAGE_DIR")
    assert image, "STRIDE_TEST_IMAGE_DIR is unset: build the images with eval \"$(bash containers/setup.sh)\" " \
                  "(tests/run.sh does)"
    host = two_rank_runs("tabular")
    run = train(tmp_path, "tabular", "--nproc", "2", "--container", image, "container.runtime=charliecloud",
                f"container.binds=[{REPO}:/mnt]", "container.env.PYTHONPATH=/mnt")
    for rank in range(2):
        line = next(line for line in (run / "logs" / f"rank_{rank}.log").read_text().splitlines()
                    if " INFO python " in line)
        assert " INFO python /usr/bin/python3 " in line and "stride 0.1.0 from /mnt/stride" in line, line
    assert read_json(run / "metadata.json")["container"]["runtime"] == "charliecloud"
    assert read_json(run / "normalization.json") == read_json(host / "normalization.json")
    ours, theirs = read_json(run / "results.json"), read_json(host / "results.json")
    assert {k: v for k, v in ours.items() if k.startswith(("val_", "test_"))} == \
        {k: v for k, v in theirs.items() if k.startswith(("val_", "test_"))}
    assert_bitwise_equal(run, host)


# ------------------------------------------------------------------------------------------------------- SLURM
@pytest.mark.parametrize("name", EXAMPLES)
def test_two_node_two_task_job_trains_the_example(name, slurm_jobs):
    assert not isinstance(slurm_jobs[name], str), slurm_jobs[name]
    run, job_id = slurm_jobs[name]
    wait_gone(job_id, timeout_s=JOB_TIMEOUT_S)
    status = read_json(run / "status.json")
    assert status["state"] == "completed", status
    results = read_json(run / "results.json")
    assert results["world_size"] == 4
    hosts = {(run / "logs" / f"rank_{rank}.log").read_text().split()[2] for rank in range(4)}
    assert hosts == {"node1", "node2"}
    # Every metric is reduced from sums over the four ranks: one process on the same weights measures the same.
    one = loaded(run).evaluate("val")
    for key, value in one.items():
        assert value == pytest.approx(results[key], rel=1e-6, abs=1e-12), key
    if name == "charlm":
        assert results["val_loss"] < math.log(read_json(run / "metadata.json")["data"]["num_outputs"])
    elif name == "tabular":
        assert (run / "normalization.json").is_file() and results["test_r2"] > 0.8
    else:
        assert results["best"]["metric"] == "val_f1_macro"


# ------------------------------------------------------------------------------------------------- bad input
def test_a_task_whose_loss_is_not_a_scalar_is_refused_before_the_run_exists(tmp_path):
    proc = cli("local", "work_dir=exp", CONFIG["charlm"], "task_kwargs.task_name=example_plugins:PerPositionLoss",
                  cwd=tmp_path)
    one_line_error(proc, "PerPositionLoss.loss returned a tensor of shape (1024,), not a scalar")
    assert not (tmp_path / "exp").exists()


def test_an_unknown_best_metric_is_refused_with_the_metrics_there_are(tmp_path):
    proc = cli("local", "work_dir=exp", CONFIG["twoinput"], "training_kwargs.best_metric=val_f1", cwd=tmp_path)
    one_line_error(proc, "best_metric 'val_f1' is not a validation metric", "did you mean 'val_f1_macro'",
                   "val_loss, val_accuracy, val_f1_macro")
    assert not (tmp_path / "exp").exists()


def test_a_nan_loss_fails_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    from stride.checkpoint import Checkpointer

    proc = cli("local", "work_dir=exp", CONFIG["twoinput"], *EXACT, "task_kwargs.task_name=example_plugins:NanAfter",
                  "task_kwargs.batch=25", "training_kwargs.checkpoint_every_steps=10",
                  "training_kwargs.log_every_steps=5", cwd=tmp_path)
    run = tmp_path / "exp" / "0"
    assert proc.returncode != 0
    message = "the training loss is nan at epoch 1, batch 25 (optimizer step 25)"
    assert message in proc.stderr
    status = read_json(run / "status.json")
    assert status["state"] == "failed" and message in status["error"]
    state, path = Checkpointer(run / "checkpoints").load_latest(torch.device("cpu"))
    assert path.name == "step_000000020.pt" and state["step"] == 20
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert not (run / "weights" / "final.pt").exists()


def test_a_callback_that_raises_is_a_recorded_failure_naming_it(tmp_path):
    proc = cli("local", "work_dir=exp", CONFIG["twoinput"], *EXACT, "callbacks=[example_plugins:Exploding]",
                  cwd=tmp_path)
    assert proc.returncode != 0
    status = read_json(tmp_path / "exp" / "0" / "status.json")
    assert status["state"] == "failed"
    assert status["error"].startswith("RunError: callback Exploding.on_epoch_end raised at epoch 1 step 40: "
                                      "KeyError: 'val_f1'"), status["error"]
