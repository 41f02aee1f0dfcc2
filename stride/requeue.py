"""Whether a stopped or crashed SLURM job goes back in the queue, and why: pure decisions, recorded in the run.

Preemptions always requeue (they are not the run's fault), whether Slurm announced them with SIGTERM or with the
job's --signal. Time limits requeue a bounded number of times, so a run
that can never finish does not cycle forever. A crash is retried only while each attempt fails differently: the same
error twice in a row is a bug, not bad luck.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Mapping, Optional, Sequence

# A USR2 that arrives this close to the time limit (beyond SLURM's own warning delay) means the limit, not a preemption.
TIMEOUT_MARGIN_S = 60
_TIME_LEFT = re.compile(r"^(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)$")


@dataclass(frozen=True)
class Decision:
    reason: str
    """preempted, timeout, crashed or terminated."""
    requeue: bool
    why: str

    def record(self, **context: object) -> dict:
        return {**asdict(self), **context}


def parse_time_left(text: str) -> Optional[float]:
    """squeue's %L ("1-02:03:04", "2:03:04", "03:04") in seconds; None for UNLIMITED, NOT_SET or anything else."""
    match = _TIME_LEFT.match(text.strip())
    if not match:
        return None
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)


def _when(record: Mapping) -> Optional[datetime]:
    try:
        return datetime.strptime(str(record.get("time")), "%Y-%m-%dT%H:%M:%S%z")
    except ValueError:
        return None


def history_since_resume(metadata: Mapping) -> list[dict]:
    """The requeue decisions made since the latest `stride resume`: a manual resume starts the bounds afresh, or a
    run that once used up its timeout or crash retries could never be requeued again."""
    history = list(metadata.get("requeues") or [])
    resumed = [t for t in map(_when, metadata.get("resumes") or []) if t is not None]
    if not resumed:
        return history
    latest = max(resumed)
    # A decision without a readable time is kept: counting it can only make the bound stricter.
    return [d for d in history if _when(d) is None or _when(d) > latest]


def classify_signal(signal_name: str, seconds_left: Optional[float], signal_delay_s: float,
                    preempted: bool = False) -> str:
    """Any signal while Slurm preempts the job (its PreemptTime is set) is the preemption's: SIGTERM at the start of
    GraceTime, or the job's --signal with PreemptParameters=send_user_signal. Otherwise USR2 near the end of the
    allocation is the time-limit warning, any other USR2 a preemption notice, and SIGTERM a cancel."""
    if preempted:
        return "preempted"
    if signal_name == "SIGTERM":
        return "terminated"
    if seconds_left is not None and seconds_left <= signal_delay_s + TIMEOUT_MARGIN_S:
        return "timeout"
    return "preempted"


def decide(reason: str, history: Sequence[dict], max_timeout_requeues: int, max_crash_requeues: int,
           error: Optional[str] = None) -> Decision:
    """The requeue decision for this attempt, given the decisions recorded for earlier attempts."""
    if reason == "preempted":
        return Decision(reason, True, "preempted: requeued (preemptions do not count against any limit)")
    if reason == "terminated":
        return Decision(reason, False, "SIGTERM without a preemption (scancel or the end of the job): checkpointed, "
                                       "not requeued")
    if reason == "timeout":
        done = sum(1 for d in history if d.get("reason") == "timeout" and d.get("requeue"))
        if done >= max_timeout_requeues:
            return Decision(reason, False, f"time limit reached again after {done} requeue(s) "
                                           f"(slurm.max_timeout_requeues={max_timeout_requeues}): resume with a "
                                           f"longer --time")
        return Decision(reason, True, f"time limit: requeue {done + 1} of {max_timeout_requeues}")
    if reason == "crashed":
        crashes = [d for d in history if d.get("reason") == "crashed"]
        retried = sum(1 for d in crashes if d.get("requeue"))
        if crashes and crashes[-1].get("error") == error:
            return Decision(reason, False, "the same error as the previous attempt: not retried again")
        if retried >= max_crash_requeues:
            return Decision(reason, False, f"crashed after {retried} crash requeue(s) "
                                           f"(slurm.max_crash_requeues={max_crash_requeues})")
        return Decision(reason, True, f"crash retry {retried + 1} of {max_crash_requeues} in a fresh allocation")
    raise ValueError(f"unknown stop reason {reason!r}")
