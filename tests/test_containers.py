"""Every rank inside a container: the command lines (golden files), the preflight's errors, `stride local --container`
with Docker and Charliecloud, and 2-node SLURM jobs with Charliecloud and Apptainer that train exactly like the same
job without a container.

Runtimes and images are real, installed and built by containers/setup.sh (tests/run.sh runs it and exports where the
images are). Only the pure command-line checks run without them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shlex
import signal
import subprocess
import tomllib
from pathlib import Path

import pytest

from conftest import REPO, read_json, run_stride, start_stride
from slurm_helpers import (job_state, needs_slurm, run_status, squeue_ids, submitted, train_step, wait_for,
                           wait_gone)

from stride import config as config_lib
from stride import container, container_check

pytestmark = pytest.mark.container
GOLDEN = Path(__file__).parent / "golden"
IMAGE_DIR = os.environ.get("STRIDE_TEST_IMAGE_DIR")
SIF = os.environ.get("STRIDE_TEST_SIF")
DOCKER_IMAGE = os.environ.get("STRIDE_TEST_DOCKER_IMAGE")
OTHER_PYTHON_IMAGE = os.environ.get("STRIDE_TEST_OTHER_PYTHON_IMAGE")
needs_images = pytest.mark.skipif(not IMAGE_DIR, reason="container images not built: run `eval \"$(bash "
                                                        "containers/setup.sh)\"` first (tests/run.sh always does)")
IMAGE_PYTHON = "python /usr/bin/python3 3.11.2, stride 0.1.0 from /usr/local/lib/python3.11/dist-packages/stride"
# Small batches: a few epochs reach ~95% test accuracy, so "the same results" compares a model that learnt something.
TRAINING = ["load_data_kwargs.batch_size=16", "training_kwargs.epochs=3"]
SLURM_JOB = ["--profile", "local", "--nodes", "2", "--tasks-per-node", "2", *TRAINING]
LOCAL_JOB = ["--nproc", "2", *TRAINING]
JOB_TIMEOUT_S = 420

# ------------------------------------------------------------------------------------------------ golden files
# Paths and values a shell would break on: spaces, quotes, `;`, `$`.
AWKWARD_WORK_DIR = "/scratch/my lab/exp 'v1'; rm -rf ~"
AWKWARD_SECTION = {
    "image": None, "runtime": None, "executable": None, "python": "/opt/conda/bin/python3",
    "binds": ["/data/set $HOME:/data:ro", "/scratch/a;b"],
    "env": {"MSG": "it's a \"test\"; echo $PATH", "NCCL_DEBUG": "WARN"},
    "gpus": "auto", "runtime_args": [],
}
GOLDEN_CASES = {
    "apptainer": ("/images/stride cuda.sif", ["--writable-tmpfs"]),
    "docker": ("registry.example/stride:cuda-12", ["--shm-size", "8g"]),
    "podman": ("registry.example/stride:cuda-12", []),
    "podman_folder": ("/images/stride folder", []),
    "charliecloud": ("/images/stride folder", ["--private-tmp"]),
}


def golden_command(case: str, gpus: bool) -> str:
    image, runtime_args = GOLDEN_CASES[case]
    runtime = case.split("_")[0]
    binds = [b for b in AWKWARD_SECTION["binds"] if not (runtime == "charliecloud" and b.endswith(":ro"))]
    section = dict(AWKWARD_SECTION, image=image, runtime=runtime, runtime_args=runtime_args, binds=binds)
    spec = container.make_spec(section, runtime, gpus)
    return container.build_shell_command(spec, AWKWARD_WORK_DIR, uid=1000, gid=100)


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
@pytest.mark.parametrize("gpus", [False, True], ids=["cpu", "gpus"])
def test_command_lines_match_golden_files(case, gpus):
    command = golden_command(case, gpus)
    path = GOLDEN / f"container_{case}_{'gpus' if gpus else 'cpu'}.txt"
    if os.environ.get("STRIDE_UPDATE_GOLDEN"):
        path.write_text(command + "\n")
    assert command == path.read_text().rstrip("\n")
    words = shlex.split(command)  # what the shell in submitit's sbatch script will hand the runtime
    assert AWKWARD_WORK_DIR + ":" + AWKWARD_WORK_DIR in words
    assert words[-1] == "/opt/conda/bin/python3"


def test_bad_container_settings_are_one_line_each(tmp_path):
    proc = run_stride("local", "work_dir=exp", "--container", "img.sif", "container.gpus=maybe",
                      "container.binds=[data]", "container.env.1X=3", "container.runtime=dockr", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stride: error: "), proc.stderr
    for part in ("'container.runtime' got 'dockr'", "(did you mean 'docker'?)", "'container.gpus' got 'maybe'",
                 "'data' must be an absolute path", "'1X', which is not an environment variable name"):
        assert part in lines[0]
    assert not (tmp_path / "exp").exists()


def test_charliecloud_refuses_read_only_binds():
    spec = container.make_spec(dict(AWKWARD_SECTION, image="/i", runtime="charliecloud"), "charliecloud", False)
    with pytest.raises(config_lib.ConfigError, match="Charliecloud mounts binds read-write only"):
        container.build_command(spec, "/w")


@pytest.mark.parametrize("work_dir, bind, message", [
    ("/w:x", [], "holds ':', which no container runtime's bind syntax"),
    ("/w", ["/a,b:/c"], "holds ',', which Apptainer reads as two binds"),
])
def test_paths_a_runtime_would_misread_are_refused(work_dir, bind, message):
    spec = container.make_spec(dict(AWKWARD_SECTION, image="/i.sif", binds=bind), "apptainer", False)
    with pytest.raises(config_lib.ConfigError, match=message):
        container.build_command(spec, work_dir)


@pytest.mark.parametrize("image, is_file, is_dir, installed, expected", [
    ("/i/stride.sif", True, False, {"apptainer", "docker"}, "apptainer"),
    ("/i/folder", False, True, {"apptainer", "charliecloud"}, "charliecloud"),
    ("/i/folder", False, True, {"apptainer", "docker"}, "apptainer"),
    ("stride:cuda", False, False, {"podman", "apptainer"}, "podman"),
    ("stride:cuda", False, False, {"docker", "podman"}, "docker"),
    ("stride:cuda", False, False, {"apptainer"}, None),
])
def test_auto_runtime_follows_the_image_form(image, is_file, is_dir, installed, expected):
    assert container.guess_runtime(image, is_file, is_dir, installed) == expected


def test_gpus_follow_the_request_unless_set():
    assert container.wants_gpus("auto", 4) and not container.wants_gpus("auto", 0)
    assert container.wants_gpus(True, 0) and not container.wants_gpus(False, 8)


# ----------------------------------------------------------------------------------------------- helpers
def rank_lines(run: Path, rank: int) -> list[str]:
    return (run / "logs" / f"rank_{rank}.log").read_text().splitlines()


def interpreter(run: Path, rank: int) -> str:
    """What the rank's log says about its Python: the first line setup_logging writes."""
    line = next(line for line in rank_lines(run, rank) if " INFO python " in line)
    return line.split(" INFO ", 1)[1]


def host(run: Path, rank: int) -> str:
    return rank_lines(run, rank)[0].split()[2]


def assert_same_training(run: Path, reference: Path) -> None:
    ours, theirs = read_json(run / "results.json"), read_json(reference / "results.json")
    assert theirs["test_accuracy"] >= 0.9
    assert ours["world_size"] == theirs["world_size"]
    assert ours["test_accuracy"] == theirs["test_accuracy"]
    assert ours["test_loss"] == pytest.approx(theirs["test_loss"], rel=1e-4)


def assert_tensorboard_written(run: Path) -> None:
    """The images carry the tensorboard extra: the default sink writes event files from inside them."""
    assert not any("tensorboard is not installed" in line for line in rank_lines(run, 0))
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))


def assert_recorded(run: Path, image: str, runtime: str) -> dict:
    recorded = read_json(run / "metadata.json")["container"]
    assert recorded["image"] == image and recorded["runtime"] == runtime
    assert recorded["digest"].startswith("sha256:") and len(recorded["digest"]) == len("sha256:") + 64
    assert recorded["python_version"] == "3.11.2" and recorded["stride"] == "0.1.0"
    assert shlex.split(recorded["command"])[0] == recorded["executable"]
    return recorded


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


@needs_images
@pytest.mark.parametrize("runtime", ["charliecloud", "apptainer", "docker", "podman"])
def test_the_rank_sees_its_own_environment_not_the_host_pythons(tmp_path, runtime):
    """container.env means the same in every runtime (no runtime expands `$PATH`, runs `$(id)` or splits at `;`),
    the rank starts in work_dir, and the host's PYTHONPATH (a checkout, say) never reaches the image's Python."""
    image = {"apptainer": SIF, "docker": DOCKER_IMAGE}.get(runtime, IMAGE_DIR)
    value = AWKWARD_SECTION["env"]["MSG"] + " `id` $(id) \\$HOME \\"
    section = dict(config_lib.defaults()["container"], image=image, env={"MSG": value})
    spec = container.make_spec(section, runtime, gpus=False)
    work, host_code = tmp_path / "work", tmp_path / "host code"
    work.mkdir()
    host_code.mkdir()
    (host_code / "leaky.py").write_text("")
    argv = container.build_command(spec, str(work), os.getuid(), os.getgid())
    env = dict(os.environ, PYTHONPATH=str(host_code), **container_check.runtime_env(spec))
    probe = ("import importlib.util, json, os, sys; print(json.dumps({'msg': os.environ['MSG'], 'cwd': os.getcwd(), "
             "'leaky': importlib.util.find_spec('leaky') is not None, 'user_site': not sys.flags.no_user_site}))")
    proc = subprocess.run([*argv, "-c", probe], capture_output=True, text=True, timeout=180, cwd=host_code, env=env)
    assert proc.returncode == 0, proc.stderr
    seen = __import__("json").loads(proc.stdout.strip().splitlines()[-1])
    assert seen["msg"] == value
    assert seen["cwd"] == str(work)
    assert not seen["leaky"]
    assert not seen["user_site"] or runtime in ("docker", "podman")  # OCI runtimes pass no host variables at all


@needs_images
@pytest.mark.parametrize("runtime", ["charliecloud", "apptainer", "docker", "podman"])
def test_the_rank_sees_work_dir_and_nothing_beside_it(tmp_path, runtime):
    """Only work_dir is bound, at its own path: not its parent folder, not the host's /tmp (Charliecloud and
    Apptainer share it by default), where the sibling file and the test images live, nor the folder stride was
    started in (Apptainer's default)."""
    work = tmp_path / "exp"
    work.mkdir()
    (tmp_path / "beside.txt").write_text("not the run's\n")
    image = {"apptainer": SIF, "docker": DOCKER_IMAGE}.get(runtime, IMAGE_DIR)
    spec = container.make_spec(dict(config_lib.defaults()["container"], image=image), runtime, gpus=False)
    mount = container_check.charliecloud_mount(Path(IMAGE_DIR), work) if runtime == "charliecloud" else str(work)
    assert mount == str(work)
    argv = container.build_command(spec, mount, os.getuid(), os.getgid())
    paths = [str(work), str(tmp_path / "beside.txt"), IMAGE_DIR]
    probe = f"import json, os; print(json.dumps([os.path.exists(p) for p in {paths!r}]))"
    proc = subprocess.run([*argv, "-c", probe], capture_output=True, text=True, timeout=180, cwd=tmp_path,
                          env=dict(os.environ, **container_check.runtime_env(spec)))
    assert proc.returncode == 0, proc.stderr
    assert __import__("json").loads(proc.stdout.strip().splitlines()[-1]) == [True, False, False]


@needs_images
@pytest.mark.parametrize("runtime", ["charliecloud", "apptainer", "docker"])
def test_the_images_carry_the_extras_that_run_on_ranks(tmp_path, runtime):
    """Every extra whose code runs inside a rank (the tensorboard sink, Optuna pruning) is in the test images, as in
    containers/Dockerfile and stride.def; `plot` runs on the host."""
    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    modules = sorted(set(extras) - {"test", "plot"})
    assert modules == ["optuna", "tensorboard"]
    image = {"apptainer": SIF, "docker": DOCKER_IMAGE}.get(runtime, IMAGE_DIR)
    spec = container.make_spec(dict(config_lib.defaults()["container"], image=image), runtime, gpus=False)
    argv = container.build_command(spec, str(tmp_path), os.getuid(), os.getgid())
    probe = f"import importlib; print([importlib.import_module(m).__name__ for m in {modules!r}])"
    proc = subprocess.run([*argv, "-c", probe], capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, **container_check.runtime_env(spec)))
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == str(modules), proc.stderr


def test_a_slurm_jobs_apptainer_ranks_get_the_slurm_client_files_read_only(tmp_path):
    """Rank 0 requeues its job with `scontrol` from inside the image: Slurm's config folder and munge's socket folder
    (the one slurm.conf names) are bound read-only for a SLURM job, and for nothing else."""
    etc, sockets = tmp_path / "etc", tmp_path / "munge-run"
    etc.mkdir()
    sockets.mkdir()
    (etc / "slurm.conf").write_text(f"AuthType=auth/munge\nAuthInfo=socket={sockets}/munge.socket.2,cred_expire=5\n")
    paths = container_check.slurm_client_paths({"SLURM_CONF": str(etc / "slurm.conf")})
    assert paths[:2] == [str(etc), str(sockets)] and set(paths[2:]) <= {"/run/munge"}
    assert container_check.slurm_client_paths({"SLURM_CONF": str(tmp_path / "none.conf")}) in ([], ["/run/munge"])
    config = config_lib.validate({"work_dir": str(tmp_path / "exp"), "container": {"image": "/images/x.sif"}})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", str(etc / "slurm.conf"))
        submitted_words = shlex.split(container_check.describe(config, 0, for_submit=True).shell)
        local_words = shlex.split(container_check.describe(config, 0).shell)
    assert f"{etc}:{etc}:ro" in submitted_words and f"{sockets}:{sockets}:ro" in submitted_words
    assert f"{etc}:{etc}:ro" not in local_words and "--contain" in local_words


def test_charliecloud_outside_tmp_says_what_to_add_to_the_image_instead_of_binding_a_parent(tmp_path):
    image = tmp_path / "image"
    (image / "scratch").mkdir(parents=True)  # the parent is there; binding it would expose all of /scratch
    with pytest.raises(container_check.ContainerError, match=f"mkdir -p {image}/scratch/lab/exp"):
        container_check.charliecloud_mount(image, Path("/scratch/lab/exp"))
    (image / "scratch" / "lab" / "exp").mkdir(parents=True)
    assert container_check.charliecloud_mount(image, Path("/scratch/lab/exp")) == "/scratch/lab/exp"


# ----------------------------------------------------------------------------------------------- preflight
@needs_images
@pytest.mark.parametrize("command", ["local", "submit"])
def test_missing_image_is_one_clear_error_and_nothing_is_written(tmp_path, command):
    proc = run_stride(command, "work_dir=exp", "--container", str(tmp_path / "no such.sif"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == (f"stride: error: container image '{tmp_path / 'no such.sif'}' does not exist: "
                                   f"build it (see containers/README.md) or fix container.image / --container")
    assert not (tmp_path / "exp").exists()


@needs_images
def test_missing_docker_image_is_one_clear_error(tmp_path):
    proc = run_stride("local", "work_dir=exp", "--container", "stride-nosuch:image", "container.runtime=docker",
                      cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = proc.stderr.strip()
    assert line.startswith("stride: error: docker has no image 'stride-nosuch:image' (") and "\n" not in line
    assert "stride never pulls" in line and not (tmp_path / "exp").exists()
    assert "([])" not in line and "no such image" in line.lower()  # docker's own words, not its empty stdout


@needs_images
@needs_slurm
def test_python_minor_version_mismatch_stops_the_submission(tmp_path):
    before = squeue_ids(tmp_path)
    proc = run_stride("submit", "work_dir=exp", "--container", OTHER_PYTHON_IMAGE, *SLURM_JOB, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"stride: error: container image '{OTHER_PYTHON_IMAGE}' (charliecloud) cannot run "
                               f"this run's ranks: its Python is 3.13.")
    assert "but stride here runs on Python 3.11." in lines[0]
    assert "submitit's pickles cannot cross Python minor versions: build the image on Python 3.11" in lines[0]
    assert "; " not in lines[0]  # the only difference: stride, submitit and cloudpickle match
    assert not (tmp_path / "exp").exists() and squeue_ids(tmp_path) == before


@needs_images
def test_plugins_are_checked_inside_the_image(tmp_path):
    """The submitting side need not have the model's code (or torch): the image's Python checks it."""
    proc = run_stride("local", "work_dir=exp", "--container", IMAGE_DIR, "model_kwargs.model_name=Nope", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == (f"stride: error: in container image '{IMAGE_DIR}': unknown model 'Nope'; registered "
                                   f"models: CNN, MLP, ResNet (or give an import path like 'my_pkg.module:Class')")
    assert not (tmp_path / "exp").exists()


@needs_images
@needs_slurm
def test_dry_run_shows_the_exact_container_command(tmp_path):
    proc = run_stride("submit", "work_dir=exp", "--container", SIF, *SLURM_JOB, "--dry-run", cwd=tmp_path,
                      check=True)
    section = dict(config_lib.defaults()["container"], image=SIF)
    spec = container.make_spec(section, "apptainer", gpus=False)
    spec = dataclasses.replace(spec, slurm_client=tuple(container_check.slurm_client_paths()))
    expected = container.build_shell_command(spec, str(tmp_path / "exp"), os.getuid(), os.getgid())
    folder = shlex.quote(str(tmp_path / "exp" / "0" / "slurm"))
    # The local profile asks 1 CPU per task, which srun restates.
    assert f" --kill-on-bad-exit=1 --cpus-per-task=1 {expected} -u -m submitit.core._submit {folder}\n" in proc.stdout
    slurm_etc = os.path.dirname(os.environ["SLURM_CONF"])
    assert expected.startswith(f"apptainer exec --contain --bind {tmp_path / 'exp'}:{tmp_path / 'exp'} --bind "
                               f"/etc/hosts:/etc/hosts:ro --bind {slurm_etc}:{slurm_etc}:ro ")
    assert not (tmp_path / "exp").exists()


# distributed_kwargs.env: set by each rank itself, so it holds inside every runtime (checked against the node's
# interfaces first: `lo` exists on every node here).
NETWORK_ENV = "distributed_kwargs.env.GLOO_SOCKET_IFNAME=lo"


def assert_network_env_reached_every_rank(run: Path, ranks: int) -> None:
    for rank in range(ranks):
        record = read_json(run / "placement" / f"rank_{rank}.json")
        assert record["network_env"].get("GLOO_SOCKET_IFNAME") == "lo", (rank, record["network_env"])


# ---------------------------------------------------------------------------------------- stride local
@pytest.fixture(scope="module")
def host_local_run(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("host-local")
    run_stride("local", "work_dir=exp", *LOCAL_JOB, cwd=cwd, check=True)
    return cwd / "exp" / "0"


@needs_images
@pytest.mark.parametrize("runtime", ["docker", "charliecloud", "podman"])
def test_stride_local_runs_every_rank_in_the_container(tmp_path, host_local_run, runtime):
    image = DOCKER_IMAGE if runtime == "docker" else IMAGE_DIR
    proc = run_stride("local", "work_dir=exp", "--container", image, f"container.runtime={runtime}", *LOCAL_JOB,
                      NETWORK_ENV, cwd=tmp_path, check=True)
    run = tmp_path / "exp" / "0"
    assert_network_env_reached_every_rank(run, 2)
    assert f"run folder: {run}" in proc.stdout
    assert read_json(run / "status.json")["state"] == "completed"
    for rank in range(2):
        assert interpreter(run, rank) == IMAGE_PYTHON
    assert interpreter(host_local_run, 0) != IMAGE_PYTHON
    assert_same_training(run, host_local_run)
    assert_tensorboard_written(run)
    recorded = assert_recorded(run, image, runtime)
    if runtime == "docker":
        inspected = subprocess.run(["docker", "image", "inspect", "--format", "{{.Id}}", image], capture_output=True,
                                   text=True, timeout=60, check=True).stdout.strip()
        assert recorded["digest"] == inspected
    else:
        assert recorded["digest_kind"].startswith("sha256 of the image folder")


@needs_images
def test_a_stopped_container_run_resumes_in_its_container(tmp_path):
    """`stride resume --local` runs the ranks in the image the run recorded, not on the host."""
    proc = start_stride("local", "work_dir=exp", "--container", IMAGE_DIR, "--nproc", "2", "training_kwargs.epochs=30",
                        "load_data_kwargs.batch_size=16", "training_kwargs.log_every_steps=10", cwd=tmp_path)
    run = tmp_path / "exp" / "0"
    try:
        wait_for(lambda: train_step(run) >= 20 or proc.poll() is not None, 240, 0.2, what="the run to train 20 steps")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
    assert read_json(run / "status.json")["state"] == "stopped"
    resumed = run_stride("resume", str(run), "--local", cwd=tmp_path, check=True)
    assert "test_accuracy=" in resumed.stdout
    for rank in range(2):
        starts = [line.split(" INFO ", 1)[1] for line in rank_lines(run, rank) if " INFO python " in line]
        assert starts == [IMAGE_PYTHON, IMAGE_PYTHON]  # the first start and the resumed one
        assert "resumed from" in (run / "logs" / f"rank_{rank}.log").read_text()
    assert read_json(run / "status.json")["state"] == "completed"


# ---------------------------------------------------------------------------------------------- SLURM
@pytest.fixture(scope="module")
def slurm_runs(tmp_path_factory) -> dict[str, Path]:
    """The same 2-node x 2-task job three times at once: on the host, in Charliecloud, in Apptainer."""
    if not (IMAGE_DIR and os.environ.get("SLURM_CONF")):
        pytest.skip("needs the container images and the local Slurm cluster (tests/run.sh sets up both)")
    jobs = {}
    for name, image in (("host", None), ("charliecloud", IMAGE_DIR), ("apptainer", SIF)):
        cwd = tmp_path_factory.mktemp(f"slurm-{name}")
        extra = ["--container", image] if image else []
        jobs[name] = submitted(run_stride("submit", "work_dir=exp", *SLURM_JOB, *extra, NETWORK_ENV, cwd=cwd))
    for name, (run, job_id) in jobs.items():
        wait_gone(job_id, timeout_s=JOB_TIMEOUT_S)
        assert run_status(run).get("state") == "completed", (name, run_status(run))
    return {name: run for name, (run, _) in jobs.items()}


@needs_images
@needs_slurm
@pytest.mark.parametrize("runtime", ["charliecloud", "apptainer"])
def test_two_node_job_runs_every_rank_in_the_container_and_trains_the_same(slurm_runs, runtime):
    run, reference = slurm_runs[runtime], slurm_runs["host"]
    assert {host(run, rank) for rank in range(4)} == {"node1", "node2"}
    assert_network_env_reached_every_rank(run, 4)
    for rank in range(4):
        assert interpreter(run, rank) == IMAGE_PYTHON
        assert interpreter(reference, rank) != IMAGE_PYTHON
    assert_same_training(run, reference)
    assert_tensorboard_written(run)
    image = IMAGE_DIR if runtime == "charliecloud" else SIF
    recorded = assert_recorded(run, image, runtime)
    if runtime == "apptainer":
        assert recorded["digest"] == sha256_file(SIF)
    script = next((run / "slurm").glob("*_submission.sh")).read_text()
    assert f" {recorded['command']} -u -m submitit.core._submit " in script


@needs_images
@needs_slurm
def test_a_preempted_container_job_requeues_itself_and_completes(tmp_path):
    """Rank 0 calls `scontrol requeue` from inside the image (it has Slurm's client; stride binds Slurm's config and
    munge's socket read-only): requeues work unchanged."""
    run, job_id = submitted(run_stride("submit", "work_dir=exp", "--container", SIF, "--profile", "local",
                                       "--nodes", "1", "--tasks-per-node", "2", "load_data_kwargs.batch_size=16",
                                       "training_kwargs.epochs=6", "training_kwargs.log_every_steps=10", cwd=tmp_path))
    wait_for(lambda: train_step(run) >= 50, 240, 0.2, what="the job to train 50 steps")
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
    wait_for(lambda: job_state(job_id) == "PENDING", 90, 0.2, what="the job to requeue itself")
    requeues = read_json(run / "metadata.json")["requeues"]
    assert [(r["reason"], r["requeue"], r["signal"]) for r in requeues] == [("preempted", True, "SIGUSR2")]
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True, timeout=30,
                   capture_output=True)  # skip Slurm's requeue delay
    wait_gone(job_id, timeout_s=JOB_TIMEOUT_S)
    assert run_status(run)["state"] == "completed", run_status(run)
    attempts = read_json(run / "metadata.json")["attempts"]
    assert [(a["job_id"], a["restart"]) for a in attempts] == [(job_id, 0), (job_id, 1)]
    assert "resumed from" in (run / "logs" / "rank_1.log").read_text()
    assert interpreter(run, 1) == IMAGE_PYTHON


@needs_images
def test_the_apptainer_image_was_built_from_the_repository_definition_file():
    """setup.sh built the SIF from containers/stride-cpu.def (Bootstrap: debootstrap); the SIF carries its recipe."""
    deffile = subprocess.run(["apptainer", "inspect", "--deffile", SIF], capture_output=True, text=True, timeout=120,
                             check=True).stdout
    recipe = (REPO / "containers" / "stride-cpu.def").read_text()
    wheels = os.environ.get("STRIDE_WHEEL_DIR") or str(Path(IMAGE_DIR).parent / "wheels")
    # Apptainer stores the recipe from its first keyword on, with the build arguments filled in (REPO: whichever
    # checkout of this repository built the image; setup.sh rebuilds it whenever the recipe or stride changes).
    parts = [re.escape(part.replace("{{ WHEELS }}", wheels)) for part in
             recipe[recipe.index("Bootstrap:"):].strip().split("{{ REPO }}")]
    assert re.fullmatch(r"/\S+".join(parts), deffile.strip()), deffile
    assert deffile.startswith("Bootstrap: debootstrap\n")
