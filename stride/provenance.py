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

from stride.rundir import RunDir, atomic_write, now_iso

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


UNTRACKED_FILE_LIMIT_BYTES = 1 << 20  # larger untracked files (data, weights) are listed by name, not copied


def _untracked(cwd: Path, work_dir: Path) -> list[str]:
    """Files git does not track yet, outside the experiment folder (runs are not code)."""
    names = (_git(["ls-files", "--others", "--exclude-standard", "-z"], cwd) or "").split("\0")
    work_dir = work_dir.resolve()
    return [name for name in names if name and not (Path(cwd) / name).resolve().is_relative_to(work_dir)]


def _untracked_diff(cwd: Path, root: Path, names: list[str]) -> tuple[str, list[str]]:
    """New files (a plug-in module written this morning) as a patch; big ones (data, weights) by name only."""
    patches, skipped = [], []
    for name in names:
        path = Path(cwd) / name
        try:
            too_big = path.stat().st_size > UNTRACKED_FILE_LIMIT_BYTES
        except OSError:
            continue
        if too_big:
            skipped.append(str(path.relative_to(root)) if path.is_relative_to(root) else name)
            continue
        # --no-index exits 1 when the files differ, which they always do here: read stdout whatever the code.
        try:
            out = subprocess.run(["git", "diff", "--no-index", "--binary", "--", "/dev/null", name], cwd=cwd,
                                 capture_output=True, text=True, timeout=GIT_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired):
            continue
        patches.append(out.stdout)
    return "".join(patches), skipped


def git_state(cwd: Path, run_dir: RunDir) -> Optional[dict]:
    """Commit of the code the run was launched from; a dirty tree's diff (new files too) is saved beside the config."""
    commit = _git(["rev-parse", "HEAD"], cwd)
    if commit is None:
        return None
    root = (_git(["rev-parse", "--show-toplevel"], cwd) or "").strip()
    new_files = _untracked(cwd, run_dir.path.parent)
    dirty = bool(new_files or (_git(["status", "--porcelain", "--untracked-files=no"], cwd) or "").strip())
    state = {"commit": commit.strip(), "root": root, "dirty": dirty}
    if dirty:
        untracked, skipped = _untracked_diff(cwd, Path(root or cwd), new_files)
        diff = (_git(["diff", "HEAD", "--binary"], cwd) or "") + untracked
        atomic_write(run_dir.git_diff_file, lambda handle: handle.write(diff))
        state["diff_file"] = run_dir.git_diff_file.name
        if skipped:
            state["untracked_not_saved"] = skipped
    return state


def launch_command() -> list[str]:
    """This process's command line as the user typed it (`python -m stride ...` shows as such, not __main__.py)."""
    if Path(sys.argv[0]).name == "__main__.py":
        return [Path(sys.executable).name, "-m", Path(sys.argv[0]).parent.name, *sys.argv[1:]]
    return [Path(sys.argv[0]).name, *sys.argv[1:]]


def collect_metadata(run_dir: RunDir, command: Optional[Sequence[str]] = None) -> dict:
    argv = list(command) if command is not None else launch_command()
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
