"""What a run records about where it came from: command line, versions, git state, host, times.

Standard library only (versions come from package metadata, not imports), so `stride submit` stays fast.
"""
from __future__ import annotations

import getpass
import os
import platform
import shlex
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Optional, Sequence

from stride.rundir import RunDir, now_iso

GIT_TIMEOUT_S = 10


def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git(args: Sequence[str], cwd: Path) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=GIT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def git_state(cwd: Path, run_dir: RunDir) -> Optional[dict]:
    """Commit of the code the run was launched from; a dirty tree's diff is saved beside the config."""
    commit = _git(["rev-parse", "HEAD"], cwd)
    if commit is None:
        return None
    root = (_git(["rev-parse", "--show-toplevel"], cwd) or "").strip()
    dirty = bool((_git(["status", "--porcelain", "--untracked-files=no"], cwd) or "").strip())
    state = {"commit": commit.strip(), "root": root, "dirty": dirty}
    if dirty:
        diff = _git(["diff", "HEAD"], cwd) or ""
        run_dir.git_diff_file.write_text(diff)
        state["diff_file"] = run_dir.git_diff_file.name
    return state


def collect_metadata(run_dir: RunDir, command: Optional[Sequence[str]] = None) -> dict:
    argv = list(command) if command is not None else [Path(sys.argv[0]).name, *sys.argv[1:]]
    cwd = Path.cwd()
    return {
        "command": shlex.join(argv),
        "argv": argv,
        "cwd": str(cwd),
        "created_at": now_iso(),
        "hostname": socket.gethostname(),
        "user": getpass.getuser(),
        "versions": {"stride": _version("stride"), "torch": _version("torch"), "submitit": _version("submitit"),
                     "python": platform.python_version()},
        "python_executable": sys.executable,
        "git": git_state(cwd, run_dir),
        "env": {k: os.environ[k] for k in ("CUDA_VISIBLE_DEVICES", "SLURM_CLUSTER_NAME") if k in os.environ},
    }


def create_run(config: dict, command: Optional[Sequence[str]] = None) -> RunDir:
    """Allocate the run folder and write config.json, metadata.json and status.json; returns the run.

    Called only after the whole config was validated, so bad input never leaves a folder behind.
    """
    from stride.config import require_work_dir
    from stride.rundir import allocate

    run = allocate(require_work_dir(config), config.get("run"))
    config["run"] = run.name
    run.write_config(config)
    run.update_metadata(lambda m: m.update(collect_metadata(run, command)))
    run.update_status(state="pending", created_at=now_iso())
    run.make_subdirs()
    return run
