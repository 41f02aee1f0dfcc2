"""The requeue rules on their own: which stops go back in the queue, and the bounds that stop a loop."""
from __future__ import annotations

import pytest

from stride.requeue import classify_signal, decide, history_since_resume, parse_time_left
from stride.slurm import parse_preempted


@pytest.mark.parametrize("text, seconds", [("1-02:03:04", 93784.0), ("2:03:04", 7384.0), ("03:04", 184.0),
                                           ("0:00", 0.0), ("UNLIMITED", None), ("INVALID", None), ("", None)])
def test_time_left_parses_squeue_formats(text, seconds):
    assert parse_time_left(text) == seconds


def test_usr2_near_the_limit_is_a_timeout_and_earlier_a_preemption():
    assert classify_signal("SIGUSR2", 85.0, signal_delay_s=90) == "timeout"
    assert classify_signal("SIGUSR2", 140.0, signal_delay_s=90) == "timeout"
    assert classify_signal("SIGUSR2", 600.0, signal_delay_s=90) == "preempted"
    assert classify_signal("SIGUSR2", None, signal_delay_s=90) == "preempted"
    assert classify_signal("SIGTERM", 10.0, signal_delay_s=90) == "terminated"


def test_any_signal_during_a_preemption_is_the_preemption():
    # SIGTERM at the start of GraceTime, or the job's --signal with PreemptParameters=send_user_signal: the job's
    # end time is then only GraceTime away, which must not read as the time-limit warning.
    assert classify_signal("SIGTERM", None, signal_delay_s=90, preempted=True) == "preempted"
    assert classify_signal("SIGUSR2", 30.0, signal_delay_s=90, preempted=True) == "preempted"


@pytest.mark.parametrize("text, preempted", [
    ("JobId=7 JobName=x PreemptEligibleTime=2026-12-01T19:45:44 PreemptTime=2026-12-01T19:45:47 SuspendTime=None",
     True),
    ("JobId=7 JobName=x PreemptEligibleTime=2026-12-01T19:45:44 PreemptTime=None SuspendTime=None", False),
    ("slurm_load_jobs error: Invalid job id specified", False)])
def test_preempt_time_from_scontrol_show_job(text, preempted):
    assert parse_preempted(text) is preempted


def test_preemptions_always_requeue_and_do_not_count_against_timeouts():
    history = [{"reason": "preempted", "requeue": True}] * 5
    assert decide("preempted", history, 1, 1).requeue
    assert decide("timeout", history, max_timeout_requeues=1, max_crash_requeues=1).requeue


def test_timeouts_requeue_a_bounded_number_of_times():
    history: list[dict] = []
    for _ in range(3):
        decision = decide("timeout", history, max_timeout_requeues=3, max_crash_requeues=0)
        assert decision.requeue
        history.append(decision.record())
    final = decide("timeout", history, max_timeout_requeues=3, max_crash_requeues=0)
    assert not final.requeue and "max_timeout_requeues=3" in final.why


def test_a_crash_is_retried_but_never_twice_for_the_same_error():
    first = decide("crashed", [], 1, max_crash_requeues=5, error="RuntimeError: NCCL timeout")
    assert first.requeue
    history = [first.record(error="RuntimeError: NCCL timeout")]
    again = decide("crashed", history, 1, max_crash_requeues=5, error="RuntimeError: NCCL timeout")
    assert not again.requeue and "same error" in again.why
    other = decide("crashed", history, 1, max_crash_requeues=5, error="OSError: disk full")
    assert other.requeue
    assert not decide("crashed", [], 1, max_crash_requeues=0, error="x").requeue


def test_sigterm_is_checkpointed_but_left_to_slurm():
    decision = decide("terminated", [], 3, 1)
    assert not decision.requeue and "SIGTERM" in decision.why


def test_a_manual_resume_starts_the_bounds_afresh():
    used_up = [{"reason": "timeout", "requeue": True, "time": f"2026-01-01T0{h}:00:00+0000"} for h in range(3)]
    used_up += [{"reason": "timeout", "requeue": False, "time": "2026-01-01T03:00:00+0000"},
                {"reason": "crashed", "requeue": True, "error": "OSError: disk full",
                 "time": "2026-01-01T04:00:00+0000"}]
    metadata = {"requeues": used_up, "resumes": [{"time": "2026-01-01T05:00:00+0000", "launcher": "slurm"}]}
    assert not decide("timeout", used_up, 3, 1).requeue  # counted over the whole history: never again
    history = history_since_resume(metadata)
    assert history == []
    assert decide("timeout", history, 3, 1).requeue
    assert decide("crashed", history, 3, 1, error="OSError: disk full").requeue  # not "the same error" any more
    # Decisions after the resume count again; without any resume everything counts.
    later = {"reason": "timeout", "requeue": True, "time": "2026-01-01T06:00:00+0000"}
    assert history_since_resume({**metadata, "requeues": [*used_up, later]}) == [later]
    assert history_since_resume({"requeues": used_up}) == used_up
    # Only the latest resume matters (times in other offsets compare as instants).
    two = {"requeues": [*used_up, later], "resumes": [{"time": "2026-01-01T05:00:00+0000"},
                                                      {"time": "2026-01-01T08:30:00+0200"}]}
    assert history_since_resume(two) == []
