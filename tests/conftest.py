"""Shared helpers: run the real `stride` CLI in a subprocess, bounded in time."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLI_TIMEOUT_S = 600


def run_stride(*args: str, cwd: Path, timeout: float = CLI_TIMEOUT_S, env: dict | None = None,
               check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "stride", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=cli_env(env))
    if check and proc.returncode != 0:
        raise AssertionError(f"stride {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """The CLI refused with exactly one `stride: error:` line (exit 2) holding every needle; returns the line."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stride: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def cli_env(env: dict | None = None) -> dict:
    full_env = dict(os.environ, **(env or {}))
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH")]))
    return full_env


def start_stride(*args: str, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """The CLI in the background (for tests that signal it); output goes to cwd/stride.out."""
    out = open(Path(cwd) / "stride.out", "ab")
    return subprocess.Popen([sys.executable, "-m", "stride", *args], cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                            env=cli_env(env))


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture
def stride(tmp_path):
    """`stride(...)` runs the CLI in tmp_path."""
    def call(*args: str, **kwargs):
        return run_stride(*args, cwd=tmp_path, **kwargs)
    return call


def pytest_sessionfinish(session, exitstatus):
    """Under the test command (tests/run.sh sets STRIDE_FORBID_SKIPS=1) a skipped test fails the run: a cluster or
    image that silently failed to start must not turn into a green run."""
    if os.environ.get("STRIDE_FORBID_SKIPS") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped:
        reporter.write_line(f"FAILED: {len(skipped)} test(s) skipped; the test command runs every test "
                            f"(first: {skipped[0].nodeid})", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
