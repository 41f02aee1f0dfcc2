"""slurm/cluster.sh's MariaDB steps are bounded: a tool that hangs fails `up` with its log, it never hangs it.

Runs the script's own functions against stand-in MariaDB programs in a scratch state folder: no cluster, no root.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

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
