"""What a run records about where it came from: command line, versions, git state, host, times.

Standard library only (versions come from package metadata, not imports), so `stride submit` stays fast. It never
records a secret's value: untracked files are hashed, not copied, unless the config's `provenance` section allows it.
"""
from __future__ import annotations

import getpass
import hashlib
import os
import platform
import re
import shlex
import socket
import stat
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Mapping, Optional, Sequence

from stride.errors import ConfigError
from stride.rundir import PRIVATE_DIR_MODE, RunDir, atomic_write, make_private_dir, now_iso

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


# Untracked files are hashed up to this size (a dataset left in the checkout would cost seconds per launch) and
# listed up to this count (a forgotten virtualenv); past either, the record says how many it left out.
HASH_LIMIT_BYTES = 64 << 20
MAX_LISTED_UNTRACKED = 1000
# Names that hold secrets far more often than code: neither hashed nor copied, even with provenance.copy_untracked.
_SECRET_NAME = re.compile(r"^(\.env(\..*)?|.*\.env|.*\.(pem|key|p12|pfx|jks|keystore|kdbx)|id_(rsa|dsa|ecdsa|ed25519)"
                          r"|\.netrc|\.pgpass|\.htpasswd|\.git-credentials|.*credential.*|.*secret.*)$", re.I)


@dataclass
class GitRecord:
    """What a run records about its code: metadata.json's `git` and, for a dirty tree, the text of git.diff."""

    state: dict
    diff: str = ""

    def save(self, diff_file: Path, named: str) -> dict:
        """Write the diff (0600: code can hold keys) and return the state, naming the file `named` (relative to the
        run folder)."""
        state = dict(self.state)
        if self.diff:
            atomic_write(diff_file, lambda handle: handle.write(self.diff), private=True)
            state["diff_file"] = named
        return state


def _untracked(cwd: Path, work_dir: Path) -> list[str]:
    """Files git does not track yet, outside the experiment folder (runs are not code)."""
    names = (_git(["ls-files", "--others", "--exclude-standard", "-z"], cwd) or "").split("\0")
    work_dir = work_dir.resolve()
    return [name for name in names if name and not (Path(cwd) / name).resolve().is_relative_to(work_dir)]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _describe_untracked(cwd: Path, root: Path, name: str) -> Optional[dict]:
    """One untracked file by name, size and sha256 (never its content); symlinks are not followed."""
    path = Path(cwd) / name
    try:
        st = path.lstat()
    except OSError:
        return None
    entry: dict = {"path": str(path.relative_to(root)) if path.is_relative_to(root) else name, "bytes": st.st_size}
    if stat.S_ISLNK(st.st_mode):
        entry["symlink"] = True
    elif _SECRET_NAME.match(path.name):
        # A hash of a short password would let anyone who reads the record test guesses against it.
        entry["sha256"] = None
        entry["why"] = "a name that usually holds secrets: neither hashed nor copied"
    elif st.st_size > HASH_LIMIT_BYTES:
        entry["sha256"] = None
        entry["why"] = f"over {HASH_LIMIT_BYTES >> 20} MiB: not hashed"
    else:
        try:
            entry["sha256"] = _sha256(path)
        except OSError as exc:
            entry["sha256"] = None
            entry["why"] = f"unreadable: {exc.strerror}"
    return entry


def _untracked_patch(cwd: Path, name: str) -> Optional[str]:
    # --no-index exits 1 when the files differ, which they always do here: read stdout whatever the code.
    try:
        out = subprocess.run(["git", "diff", "--no-index", "--binary", "--", "/dev/null", name], cwd=cwd,
                             capture_output=True, text=True, timeout=GIT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout


def _untracked_record(cwd: Path, root: Path, names: list[str], settings: Mapping) -> tuple[list[dict], str]:
    """Every untracked file by name, size and hash; with `copy_untracked`, the content of those that fit the total
    `max_untracked_bytes` and do not look like secrets, as a patch."""
    entries, patches = [], []
    budget = int(settings.get("max_untracked_bytes", 0) or 0)
    for name in names[:MAX_LISTED_UNTRACKED]:
        entry = _describe_untracked(cwd, root, name)
        if entry is None:
            continue
        entries.append(entry)
        if not settings.get("copy_untracked") or entry.get("symlink") or entry.get("sha256") is None:
            continue
        if entry["bytes"] > budget:
            entry["why"] = "over provenance.max_untracked_bytes: not copied"
        else:
            patch = _untracked_patch(cwd, name)
            if patch is not None:
                budget -= entry["bytes"]
                entry["copied"] = True
                patches.append(patch)
    return entries, "".join(patches)


def git_record(cwd: Path, work_dir: Path, settings: Optional[Mapping] = None) -> Optional[GitRecord]:
    """The commit of the code launched from `cwd` and, for a dirty tree, its diff; untracked files (a plug-in written
    this morning, or a .env) by name, size and sha256, their content only as `settings` (the config's `provenance`)
    allow. None outside a git checkout."""
    settings = settings or {}
    commit = _git(["rev-parse", "HEAD"], cwd)
    if commit is None:
        return None
    root = (_git(["rev-parse", "--show-toplevel"], cwd) or "").strip()
    new_files = _untracked(cwd, work_dir)
    dirty = bool(new_files or (_git(["status", "--porcelain", "--untracked-files=no"], cwd) or "").strip())
    state: dict = {"commit": commit.strip(), "root": root, "dirty": dirty}
    if not dirty:
        return GitRecord(state)
    untracked, patch = _untracked_record(cwd, Path(root or cwd), new_files, settings)
    if untracked:
        state["untracked"] = untracked
        if len(new_files) > MAX_LISTED_UNTRACKED:
            state["untracked_not_listed"] = len(new_files) - MAX_LISTED_UNTRACKED
        if not settings.get("copy_untracked"):
            state["untracked_content"] = "not copied (provenance.copy_untracked=false): names and sha256 only"
    return GitRecord(state, (_git(["diff", "HEAD", "--binary"], cwd) or "") + patch)


def share_git_record(config: Mapping, sweep_id: str) -> Optional[dict]:
    """A sweep's one git record: the diff once in work_dir/sweeps/<id>/git.diff (a 0700 folder, which also holds the
    job array's submitit folder), named by every point's metadata (`../sweeps/<id>/git.diff`), not one copy per
    point. None outside a git checkout."""
    from stride.config import require_work_dir

    work_dir = require_work_dir(config)
    folder = work_dir / "sweeps" / sweep_id
    try:
        make_private_dir(folder)  # also before submitit puts the array's sbatch script in it (slurm/)
    except OSError as exc:
        raise ConfigError(f"cannot create the sweep's folder {folder}: {exc.strerror}; choose another "
                          f"work_dir") from None
    record = git_record(Path.cwd(), work_dir, config.get("provenance"))
    return record.save(folder / "git.diff", f"../sweeps/{sweep_id}/git.diff") if record is not None else None


def launch_command() -> list[str]:
    """This process's command line as the user typed it (`python -m stride ...` shows as such, not __main__.py)."""
    if Path(sys.argv[0]).name == "__main__.py":
        return [Path(sys.executable).name, "-m", Path(sys.argv[0]).parent.name, *sys.argv[1:]]
    return [Path(sys.argv[0]).name, *sys.argv[1:]]


def collect_metadata(run_dir: RunDir, command: Optional[Sequence[str]] = None, git: Optional[dict] = None) -> dict:
    """metadata.json's story of the launch; `git` is the code's record (`GitRecord.save`), None outside a checkout."""
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
        "git": git,
        "env": {k: os.environ[k] for k in ("CUDA_VISIBLE_DEVICES", "SLURM_CLUSTER_NAME") if k in os.environ},
    }


def create_run(config: dict, command: Optional[Sequence[str]] = None, git: Optional[dict] = None) -> RunDir:
    """Allocate the run folder and write config.json, metadata.json and status.json; returns the run.

    Called only after the whole config was validated, so bad input never leaves a folder behind. The folder is the
    user's alone (0700): its config, command line, code diff, rendezvous and sbatch script can all hold secrets.
    `git`: a record shared with other runs (`share_git_record`), else the run gets its own.
    """
    from stride.config import require_work_dir
    from stride.rundir import allocate

    run = allocate(require_work_dir(config), config.get("run"))
    os.chmod(run.path, PRIVATE_DIR_MODE)  # still empty: nothing was readable before this
    config["run"] = run.name
    run.write_config(config)
    if git is None:
        record = git_record(Path.cwd(), run.work_dir, config.get("provenance"))
        git = record.save(run.git_diff_file, run.git_diff_file.name) if record is not None else None
    run.update_metadata(lambda m: m.update(collect_metadata(run, command, git)))
    from stride import runstate

    runstate.move(run, "pending", created_at=now_iso())
    run.make_subdirs()
    return run
