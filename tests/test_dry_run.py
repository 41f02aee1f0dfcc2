"""`--dry-run` runs every check a real submission makes (plug-ins, image, `sbatch --test-only`, MaxArraySize) against
the real local Slurm cluster, lists each outcome, exits 2 when one would fail, and writes and submits nothing;
`stride resume --dry-run` does the same for a resume."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from conftest import one_line_error, read_json
from slurm_helpers import needs_slurm, squeue_ids

pytestmark = [pytest.mark.slurm, needs_slurm]
CPU_JOB = ["--tasks-per-node", "1"]


def max_array_size() -> int:
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    return int(out.split("MaxArraySize")[1].split("=")[1].split()[0])


def test_a_passing_dry_run_lists_its_checks_and_exits_0(tmp_path, stride):
    proc = stride("submit", "work_dir=exp", *CPU_JOB, "--dry-run", check=True)
    assert "#   ok    plug-ins, data, model and one batch" in proc.stdout
    assert "#   ok    Slurm would accept the request (sbatch --test-only)" in proc.stdout
    assert "FAIL" not in proc.stdout and not (tmp_path / "exp").exists()


def test_the_dry_runs_config_says_what_its_script_asks_for(stride):
    """One task per GPU: the config shown (and recorded) has the tasks per node the sbatch script requests."""
    proc = stride("submit", "work_dir=exp", "--nodes", "2", "--gpus", "2", "--dry-run", check=True)
    script, config = proc.stdout.split("# resolved config for run ")
    assert "#SBATCH --ntasks-per-node=2\n" in script and "#SBATCH --gpus-per-node=2\n" in script
    slurm = yaml.safe_load(config.split("\n", 1)[1].split("\n# checks")[0])["slurm"]
    assert (slurm["gpus_per_node"], slurm["tasks_per_node"]) == (2, 2)


def test_gpus_without_cpus_per_task_take_the_partitions_cpus_per_gpu(stride):
    """The test cluster's nodes have 4 CPUs and 2 GPUs: 2 CPUs per task, read from Slurm and said in the dry run."""
    proc = stride("submit", "work_dir=exp", "--nodes", "1", "--gpus", "2", "--partition", "long", "--dry-run",
                  check=True)
    assert proc.stdout.startswith("# note: --cpus-per-task 2, the CPUs per GPU of partition long (4 CPUs / 2 GPUs "
                                  "per node); give --cpus-per-task to choose\n"), proc.stdout
    srun = next(line for line in proc.stdout.splitlines() if line.startswith("srun "))
    assert " --gpus-per-node=2 --cpus-per-task=2 " in srun, srun
    assert "#SBATCH --cpus-per-task=2\n" in proc.stdout and "  cpus_per_task: 2\n" in proc.stdout
    given = stride("submit", "work_dir=exp", "--nodes", "1", "--gpus", "2", "--cpus-per-task", "1", "--dry-run",
                   check=True)
    assert "# note: --cpus-per-task" not in given.stdout and "#SBATCH --cpus-per-task=1\n" in given.stdout


def test_cpus_per_gpu_that_slurm_cannot_tell_is_a_warning():
    from stride import slurm

    section = {"gpus_per_node": 2, "cpus_per_task": None, "partition": "no_such_partition"}
    said = slurm.default_cpus_per_task(section)
    assert said.startswith("warning: no --cpus-per-task, and the CPUs per GPU of partition no_such_partition could "
                           "not be read from Slurm"), said
    assert section["cpus_per_task"] is None


@pytest.mark.parametrize("args, check, message", [
    (["--nodes", "9"], "Slurm would accept the request", "More processors requested than permitted; check --nodes"),
    (["--partition", "nope"], "Slurm would accept the request", "Invalid partition name specified; check --partition"),
    (["--time", "999"], "Slurm would accept the request", "Requested time limit is invalid"),
    (["--container", "/no/such/image.sif"], "container image /no/such/image.sif", "/no/such/image.sif"),
    (["model_kwargs.model_name=no_such_pkg.nets:Net"], "plug-ins, data, model", "No module named 'no_such_pkg'"),
])
def test_a_dry_run_that_would_fail_says_what_and_exits_2(tmp_path, stride, args, check, message):
    before = squeue_ids(tmp_path)
    proc = stride("submit", "work_dir=exp", *CPU_JOB, *args, "--dry-run")
    line = one_line_error(proc, "dry run:", message)
    assert check in line
    failed = [row for row in proc.stdout.splitlines() if row.startswith("#   FAIL")]
    assert failed and check in failed[0] and message in failed[0], proc.stdout
    assert "# sbatch script (dry run: nothing written, nothing submitted)" in proc.stdout
    assert "#   ok " in proc.stdout  # the other checks still ran
    assert not (tmp_path / "exp").exists() and squeue_ids(tmp_path) == before


def test_every_failure_is_listed_not_only_the_first(tmp_path, stride):
    proc = stride("submit", "work_dir=exp", *CPU_JOB, "--nodes", "9", "model_kwargs.model_name=no_such_pkg.nets:Net",
                  "--dry-run")
    one_line_error(proc, "dry run:", "No module named 'no_such_pkg'", "(and 1 more, listed above)")
    assert sum(row.startswith("#   FAIL") for row in proc.stdout.splitlines()) == 2, proc.stdout


def test_a_sweep_above_max_array_size_fails_its_dry_run(tmp_path, stride):
    limit = max_array_size()
    proc = stride("submit", "work_dir=exp", *CPU_JOB, f"training_kwargs.seed=range(0,{limit + 1})", "--dry-run")
    one_line_error(proc, "dry run:", f"this sweep has {limit + 1} points but the cluster's MaxArraySize is {limit}")
    assert not (tmp_path / "exp").exists()
    small = stride("submit", "work_dir=exp", *CPU_JOB, "training_kwargs.seed=range(0,3)", "--dry-run", check=True)
    assert "#   ok    a job array of 3 tasks within the cluster's MaxArraySize" in small.stdout


def test_without_slurm_the_dry_run_says_so_unless_told_to_skip_its_checks(tmp_path, stride):
    env = {"PATH": os.pathsep.join([os.path.dirname(sys.executable), "/usr/local/sbin"])}
    proc = stride("submit", "work_dir=exp", "--dry-run", env=env)
    one_line_error(proc, "dry run: sbatch on PATH would fail", "--skip-slurm-checks")
    proc = stride("submit", "work_dir=exp", "--dry-run", "--skip-slurm-checks", env=env, check=True)
    assert "#   ok    plug-ins, data, model and one batch" in proc.stdout and "sbatch --test-only" not in proc.stdout
    assert not (tmp_path / "exp").exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from conftest import run_stride

    folder = tmp_path_factory.mktemp("resume-dry")
    run_stride("local", "work_dir=exp", "training_kwargs.epochs=1", cwd=folder, check=True)
    return folder / "exp" / "0"


def test_resume_dry_run_takes_submit_flags_checks_and_changes_nothing(tmp_path, stride, finished_run):
    files = {path: path.read_bytes() for path in finished_run.rglob("*") if path.is_file()}
    proc = stride("resume", str(finished_run), "training_kwargs.epochs=2", "--profile", "local", "--time", "7",
                  "--dry-run", check=True)
    assert "#SBATCH --partition=debug" in proc.stdout and "#SBATCH --time=7" in proc.stdout
    assert "epochs: 2" in proc.stdout and "# amended: " in proc.stdout
    assert "#   ok    run " in proc.stdout and "#   ok    Slurm would accept the request" in proc.stdout
    refused = stride("resume", str(finished_run), "training_kwargs.epochs=2", "--nodes", "9", "--dry-run")
    one_line_error(refused, "dry run:", "check --nodes")
    local = stride("resume", str(finished_run), "training_kwargs.epochs=2", "--local", "--dry-run", check=True)
    assert "# dry run: nothing written, nothing started" in local.stdout and "#SBATCH" not in local.stdout
    after = {path: path.read_bytes() for path in finished_run.rglob("*") if path.is_file()}
    assert after == files  # no claim, no record, no amendment written
    assert read_json(finished_run / "status.json")["state"] == "completed"


def test_node_local_work_dir_warns_except_where_the_profile_says_the_nodes_share_it(tmp_path, stride):
    assert str(tmp_path).startswith("/tmp/")
    plain = stride("submit", "work_dir=exp", *CPU_JOB, "--dry-run", check=True)
    assert "# warning: work_dir " in plain.stdout and "node-local filesystem" in plain.stdout
    shared = stride("submit", "work_dir=exp", "--profile", "local", "--dry-run", check=True)
    assert "warning" not in shared.stdout + shared.stderr
