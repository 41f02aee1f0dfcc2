"""Run states: one module owns them and their moves."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from stride import runstate
from stride.rundir import RunDir

STRIDE = Path(__file__).resolve().parents[1] / "stride"


def test_final_states_carry_an_end_time_and_live_ones_none(tmp_path):
    run = RunDir(tmp_path / "0")
    run.path.mkdir()
    assert runstate.move(run, "pending")["ended_at"] is None
    assert runstate.move(run, "running")["state"] == "running"
    stopped = runstate.move(run, "stopped", stop_reason="SIGTERM")
    assert stopped["ended_at"] and stopped["stop_reason"] == "SIGTERM"
    assert runstate.move(run, "pending")["ended_at"] is None  # stride resume


def test_cancelled_is_sticky_until_resumed(tmp_path):
    run = RunDir(tmp_path / "0")
    run.path.mkdir()
    runstate.move(run, "running")
    runstate.move(run, "cancelled")
    after = runstate.move(run, "stopped", stop_reason="SIGTERM: cancelled by the user")
    assert after["state"] == "cancelled" and after["stop_reason"].startswith("SIGTERM")
    assert runstate.move(run, "pending")["state"] == "pending"
    with pytest.raises(ValueError):
        runstate.move(run, "finished")


def test_a_completed_run_is_not_marked_failed_by_a_late_report():
    status = {"state": "completed", "ended_at": "t"}
    assert not runstate.apply(status, "failed", error="rank 1 lost its peer")
    assert status["state"] == "completed" and status["error"] == "rank 1 lost its peer"


def test_no_module_but_runstate_writes_a_state():
    """Every `state` write goes through runstate.move/apply: the rules cannot be bypassed by a new call site."""
    writes = re.compile(r"update_status\([^)]*\bstate=|status\.update\([^)]*\bstate=|\[\"state\"\]\s*=")
    offenders = [f"{path.relative_to(STRIDE)}:{number}" for path in STRIDE.rglob("*.py") if path.name != "runstate.py"
                 for number, line in enumerate(path.read_text().splitlines(), 1) if writes.search(line)]
    assert not offenders, offenders
