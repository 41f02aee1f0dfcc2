"""slurm/cluster.sh's MariaDB steps are bounded: a tool that hangs fails `up` with its log, it never hangs it; and
it refuses a state folder that someone else made or could change (root's munge key and database password live there).

Runs the script's own functions against stand-in MariaDB programs and hostile folders in scratch state folders: the
live cluster is never touched.
"""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO

DB_TIMEOUT_S = 2
HANG_S = 90  # a stand-in that "hangs" gives up by itself after this, should the script not bound it


def fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(0o755)


def start_mariadb(tmp_path: Path) -> tuple[subprocess.CompletedProcess, float]:
    """cluster.sh's make_dirs + start_mariadb with the stand-ins first on PATH; (result, seconds taken)."""
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", STRIDE_SLURM_DIR=str(tmp_path / "state"),
               STRIDE_SLURM_DB_TIMEOUT_S=str(DB_TIMEOUT_S))
    script = 'source "$0" env >/dev/null; make_dirs; start_mariadb'
    started = time.monotonic()
    proc = subprocess.run(["bash", "-c", script, str(REPO / "slurm" / "cluster.sh")], env=env, capture_output=True,
                          text=True, timeout=60)
    return proc, time.monotonic() - started


def test_a_hanging_mariadb_install_db_fails_within_its_bound(tmp_path):
    (tmp_path / "bin").mkdir()
    fake(tmp_path / "bin", "mariadb-install-db", f"echo installing; exec sleep {HANG_S}")
    proc, took_s = start_mariadb(tmp_path)
    assert proc.returncode != 0 and took_s < DB_TIMEOUT_S + 10, (took_s, proc.stderr)
    assert f"mariadb-install-db (bounded by {DB_TIMEOUT_S}s) did not start" in proc.stderr
    assert "installing" in proc.stderr  # the end of its log is shown


def test_a_hanging_mariadb_client_fails_within_its_bound(tmp_path):
    state, bin_dir = tmp_path / "state", tmp_path / "bin"
    bin_dir.mkdir()
    (state / "mysql" / "data" / "mysql").mkdir(parents=True)  # an initialised datadir: no install step
    # A stand-in server that answers pings (its pid file names a live process called mariadbd) ...
    fake(bin_dir, "mariadbd", f'echo $$ >"{state}/run/mariadbd.pid"; for i in $(seq {HANG_S}); do sleep 1; done')
    fake(bin_dir, "mariadb-admin", "exit 0")
    # ... and a client that never returns.
    fake(bin_dir, "mariadb", f"exec sleep {HANG_S}")
    try:
        proc, took_s = start_mariadb(tmp_path)
        assert proc.returncode != 0 and took_s < DB_TIMEOUT_S + 15, (took_s, proc.stderr)
        assert f"mariadb (the accounting grants, bounded by {DB_TIMEOUT_S}s) did not start" in proc.stderr
    finally:
        pid_file = state / "run" / "mariadbd.pid"
        if pid_file.is_file():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGTERM)  # the stand-in this test started
            except ProcessLookupError:
                pass


# ------------------------------------------------------------------------------------------------ state folder
# The state folder holds root's munge key and database password. One someone else made (or could change) is refused
# with one line by every command that uses it, and nothing is written into it. Scratch folders only: the live
# cluster's state is never touched.
OTHER_UID = 65534  # nobody


def cluster(state: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, STRIDE_SLURM_DIR=str(state))
    return subprocess.run(["bash", str(REPO / "slurm" / "cluster.sh"), *args], env=env, capture_output=True, text=True,
                          timeout=60)


def refusal(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert proc.stdout == ""  # `eval "$(bash slurm/cluster.sh env)"` gets nothing to evaluate
    return lines[0]


def hostile_states(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """A folder of each kind the script must refuse, and the words its one line must hold."""
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "munge").mkdir()
    (foreign / "munge" / "munge.key").write_bytes(b"k" * 1024)  # the attacker's key
    for path in (foreign, foreign / "munge", foreign / "munge" / "munge.key"):
        os.chown(path, OTHER_UID, OTHER_UID)
    writable = tmp_path / "writable"
    writable.mkdir()
    writable.chmod(0o777)
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    leaky = tmp_path / "leaky"
    (leaky / "munge").mkdir(parents=True)
    (leaky / "munge" / "munge.key").write_bytes(b"k" * 1024)
    (leaky / "munge" / "munge.key").chmod(0o644)
    open_parent = tmp_path / "open"
    open_parent.mkdir()
    open_parent.chmod(0o777)
    return {
        "foreign": (foreign, f"it belongs to uid {OTHER_UID}, not to you (uid 0)"),
        "writable": (writable, "it is writable by group or others (mode 777)"),
        "symlink": (link, f"it is a symlink (to {target})"),
        "leaky key": (leaky, "its munge/munge.key is readable by group or others (mode 644)"),
        "open parent": (open_parent / "state", f"its parent {open_parent} is writable by others and not sticky"),
    }


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to hand a folder to another user")
@pytest.mark.parametrize("kind", ["foreign", "writable", "symlink", "leaky key", "open parent"])
@pytest.mark.parametrize("command", ["up", "env", "status", "down", "check"])
def test_a_state_folder_someone_else_controls_is_refused(tmp_path, kind, command):
    state, words = hostile_states(tmp_path)[kind]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    line = refusal(cluster(state, command))
    assert line.startswith("[cluster.sh +"), line
    assert line.split("s] ", 1)[1].startswith(f"ERROR: refusing state folder {state}: {words}"), line
    assert "STRIDE_SLURM_DIR" in line  # the fix
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # no lock file, no key, nothing written


def test_a_new_state_folder_is_created_private_and_passes_the_check(tmp_path):
    state = tmp_path / "state"
    proc = cluster(state, "down")  # creates the folder (and its lock) without starting anything
    assert proc.returncode == 0, proc.stderr
    st = state.stat()
    assert st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o711  # munged needs others to traverse it
    assert cluster(state, "check").returncode == 0
    exports = cluster(state, "env").stdout
    assert exports == f"export SLURM_CONF={state}/etc/slurm.conf\nexport STRIDE_SLURM_DIR={state}\n"


def test_the_live_default_state_folder_still_passes(tmp_path):
    """The path the tests and README use (`bash slurm/cluster.sh env`) keeps working: read-only check only."""
    default = Path("/tmp/stride-slurm")
    if not default.is_dir():
        pytest.skip("no cluster state in /tmp/stride-slurm")
    proc = subprocess.run(["bash", str(REPO / "slurm" / "cluster.sh"), "check"], capture_output=True, text=True,
                          timeout=60, env={k: v for k, v in os.environ.items() if k != "STRIDE_SLURM_DIR"})
    assert proc.returncode == 0, proc.stderr


def test_the_apt_log_is_not_a_fixed_name_in_the_shared_temp_folder():
    script = (REPO / "slurm" / "cluster.sh").read_text()
    assert "stride-slurm-apt.log" not in script and 'mktemp "${TMPDIR:-/tmp}/stride-slurm-apt.XXXXXX"' in script
