"""SLURM specifics with no side effects beyond asking Slurm: sbatch parameters from a config, the sbatch text (a pure
function, shown by --dry-run), pre-submission checks with `sbatch --test-only`, and job state queries.

Standard library and PyYAML only. submitit's own `_make_sbatch_string` builds the text, so what --dry-run prints is
exactly what submitit submits; every value in it is shell-quoted there.
"""
from __future__ import annotations

import math
import os
import re
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from stride.errors import ClusterError, ConfigError
from stride.proc import run_command

SBATCH_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
# Slurm job states that mean the job is still alive (queued, starting, running or being requeued).
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"}
# Filesystems compute nodes share with the login node on real clusters.
SHARED_FILESYSTEMS = {"nfs", "nfs4", "lustre", "gpfs", "beegfs", "cephfs", "ceph", "fuse.sshfs", "glusterfs",
                      "pvfs2", "orangefs", "wekafs", "fuse.gcsfuse", "panfs", "cifs", "smb3", "vast", "fuse.ceph"}
WARN_FILESYSTEMS = {"tmpfs", "ramfs", "overlay"}


def parse_time_min(value: Any) -> int:
    """Minutes from 90, '90', '1:30:00', '2-00:00:00' or '45:00' (MM:SS, as sbatch reads it)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        minutes = value
    else:
        text = str(value).strip()
        days, _, clock = text.rpartition("-") if "-" in text else ("0", "", text)
        try:
            parts = [float(p) for p in clock.split(":")]
            day_min = int(days) * 24 * 60 if days else 0
        except ValueError:
            raise ConfigError(f"--time '{value}' is not a time: give minutes (90) or HH:MM:SS (1:30:00)") from None
        if len(parts) == 1:
            minutes = parts[0]
        elif len(parts) == 2:
            minutes = parts[0] + parts[1] / 60
        elif len(parts) == 3:
            minutes = parts[0] * 60 + parts[1] + parts[2] / 60
        else:
            raise ConfigError(f"--time '{value}' is not a time: give minutes (90) or HH:MM:SS (1:30:00)")
        minutes += day_min
    if minutes <= 0:
        raise ConfigError(f"--time must be positive, got {value!r}")
    return int(math.ceil(minutes))


def parse_mem_gb(value: Any) -> float:
    """GB from 16, '16', '16G', '16GB', '500M', '1T'."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)B?\s*", str(value), flags=re.I)
    if not match:
        raise ConfigError(f"--mem '{value}' is not a memory size: give GB (16) or a unit (16G, 500M)")
    scale = {"": 1, "K": 1 / 1024**2, "M": 1 / 1024, "G": 1, "T": 1024}[match.group(2).upper()]
    return float(match.group(1)) * scale


def tasks_per_node(slurm: Mapping) -> int:
    return slurm["gpus_per_node"] or slurm["tasks_per_node"] or 1


def submitit_parameters(slurm: Mapping, job_name: str) -> dict:
    """Config `slurm` section -> SlurmExecutor.update_parameters keywords (and _make_sbatch_string's)."""
    problems = [key for key in slurm["sbatch_args"] if not SBATCH_KEY.match(str(key))]
    if problems:
        raise ConfigError(f"slurm.sbatch_args key '{problems[0]}' is not an sbatch option name: use names like "
                          f"mail-type or gres, without leading dashes")
    params: dict[str, Any] = {
        "job_name": slurm["job_name"] or job_name,
        "nodes": slurm["nodes"],
        "ntasks_per_node": tasks_per_node(slurm),
        "time": slurm["time_min"],
        "signal_delay_s": slurm["signal_delay_s"],
        # If one rank dies, srun ends the others at once instead of leaving them blocked in a collective.
        "srun_args": ["--kill-on-bad-exit=1"],
        "setup": [str(line) for line in slurm["setup"]],
        "additional_parameters": {str(k): v for k, v in slurm["sbatch_args"].items()},
    }
    if slurm["gpus_per_node"]:
        params["gpus_per_node"] = slurm["gpus_per_node"]
    if slurm["cpus_per_task"]:
        params["cpus_per_task"] = slurm["cpus_per_task"]
    if slurm["mem_gb"]:
        mem = slurm["mem_gb"]
        params["mem"] = f"{int(mem)}GB" if mem == int(mem) else f"{int(mem * 1024)}MB"
    for key in ("partition", "account", "qos", "constraint"):
        if slurm[key]:
            params[key] = slurm[key]
    if slurm["exclusive"]:
        params["exclusive"] = True
    return params


def submitit_command(python: str, folder: Path) -> str:
    """The per-task command submitit's sbatch runs (what SlurmExecutor builds from its `python` string)."""
    return " ".join([python, "-u -m submitit.core._submit", shlex.quote(str(folder))])


def make_sbatch_text(params: Mapping, folder: Path, python: Optional[str] = None, array: Optional[int] = None) -> str:
    """The exact sbatch script submitit writes for these parameters (pure); `array`: a job array of that many tasks."""
    from submitit.slurm.slurm import _make_sbatch_string

    python = python or shlex.quote(sys.executable)
    extra = {"map_count": array} if array else {}
    return _make_sbatch_string(command=submitit_command(python, folder), folder=folder, **params, **extra)


def test_only(sbatch_text: str, timeout_s: float = 30.0) -> None:
    """Ask Slurm whether it would accept this script (`sbatch --test-only`); refuse with its own words if not."""
    with tempfile.NamedTemporaryFile("w", suffix=".sbatch", delete=False) as handle:
        handle.write(sbatch_text)
        path = handle.name
    try:
        result = run_command(["sbatch", "--test-only", path], timeout_s)
    finally:
        os.unlink(path)
    if result.returncode != 0:
        said = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        reason = said[-1] if said else f"exit code {result.returncode}"
        reason = re.sub(r"^sbatch: error: (Batch job submission failed: )?", "", reason)
        raise ClusterError(f"SLURM refused the request: {reason}; check --partition/--account/--qos/--time/--nodes "
                           f"against `sinfo` and `sacctmgr show assoc user=$USER`")


def filesystem_type(path: Path) -> Optional[str]:
    """The filesystem type holding `path`, from /proc/mounts (Linux); None when unknown."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    path = path.resolve()
    best, best_type = -1, None
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = fields[1].replace("\\040", " ")
        if (str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")) and len(mount) > best:
            best, best_type = len(mount), fields[2]
    return best_type


def visibility_warning(work_dir: Path) -> Optional[str]:
    """A warning when compute nodes are unlikely to see work_dir (node-local or memory filesystems)."""
    probe = work_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    fstype = filesystem_type(probe)
    if str(work_dir.resolve()).startswith(("/tmp/", "/var/tmp/", "/dev/shm/")) or fstype in WARN_FILESYSTEMS:
        return (f"work_dir {work_dir} is on a node-local filesystem ({fstype or 'local'}); compute nodes of a real "
                f"cluster may not see it: put work_dir on a shared filesystem (home, project or scratch)")
    return None


def query_squeue(job_ids: Iterable[str], timeout_s: float = 15.0) -> Optional[dict[str, dict]]:
    """{job_id: {state, nodes, elapsed, reason}} for jobs squeue still knows; None when squeue cannot be asked."""
    ids = sorted({str(j) for j in job_ids if j})
    if not ids:
        return {}
    try:
        result = run_command(["squeue", "-h", "-j", ",".join(ids), "-o", "%i|%T|%N|%M|%r"], timeout_s)
    except ClusterError:
        return None
    if result.returncode != 0:
        # Jobs the controller has already forgotten are an answer ("not queued"), anything else is not.
        return {} if "Invalid job id" in result.stderr else None
    out = {}
    for line in result.stdout.splitlines():
        parts = line.split("|")
        if len(parts) == 5:
            out[parts[0]] = {"state": parts[1], "nodes": parts[2], "elapsed": parts[3], "reason": parts[4]}
    return out


def query_sacct(job_ids: Iterable[str], timeout_s: float = 15.0) -> dict[str, dict]:
    """{job_id: {state, nodes, elapsed, exit_code}} from accounting; {} when sacct is unavailable or refuses."""
    ids = sorted({str(j) for j in job_ids if j})
    if not ids:
        return {}
    try:
        result = run_command(["sacct", "-n", "-P", "-X", "-j", ",".join(ids), "-o", "JobID,State,NodeList,Elapsed,"
                              "ExitCode"], timeout_s)
    except ClusterError:
        return {}
    if result.returncode != 0:
        return {}
    out = {}
    for line in result.stdout.splitlines():
        parts = line.split("|")
        if len(parts) == 5:
            out[parts[0]] = {"state": parts[1].split()[0], "nodes": parts[2], "elapsed": parts[3],
                             "exit_code": parts[4]}
    return out


def time_left_s(job_id: str, timeout_s: float = 15.0) -> Optional[float]:
    """Seconds until the job's time limit, from squeue; None when unknown or unlimited."""
    from stride.requeue import parse_time_left

    try:
        result = run_command(["squeue", "-h", "-j", str(job_id), "-o", "%L"], timeout_s)
    except ClusterError:
        return None
    return parse_time_left(result.stdout) if result.returncode == 0 else None


def requeue(job_id: str, timeout_s: float = 30.0) -> Optional[str]:
    """`scontrol requeue JOB`: the job goes back to pending with the same id; returns an error message or None."""
    try:
        result = run_command(["scontrol", "requeue", str(job_id)], timeout_s)
    except ClusterError as exc:
        return str(exc)
    return None if result.returncode == 0 else (result.stderr or result.stdout).strip()


def max_array_size(timeout_s: float = 15.0) -> Optional[int]:
    """The cluster's MaxArraySize (array indices must stay below it); None when scontrol cannot say."""
    try:
        result = run_command(["scontrol", "show", "config"], timeout_s)
    except ClusterError:
        return None
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", result.stdout, re.MULTILINE)
    return int(match.group(1)) if match else None
