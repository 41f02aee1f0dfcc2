"""The states a run goes through and the moves between them. Every write of status.json's `state` goes through
`move` (or `apply`, for a caller already holding the run's lock), so what each state means, which state may
follow which, and the fields a state implies (an end time for final states, none for live ones) live here.

Standard library only: the CLI, launchers, job and loop all use it.
"""
from __future__ import annotations

from typing import Any, Iterable, MutableMapping

STATES = {
    "pending": "created, or submitted and waiting in the queue",
    "running": "its ranks are training",
    "requeued": "stopped on a signal and back in the SLURM queue; continues from its checkpoint by itself",
    "stopped": "stopped on a signal or request with a checkpoint: `stride resume` continues it",
    "timeout": "hit its time limit more often than slurm.max_timeout_requeues allows",
    "completed": "trained (or was ended early by a hook or early stopping) and tested its best weights",
    "failed": "a rank raised or died; status.json names the rank, host and error",
    "cancelled": "cancelled with `stride cancel`",
}
FINAL = frozenset({"completed", "failed", "cancelled", "timeout", "stopped"})
LIVE = frozenset({"pending", "running", "requeued"})
# Where each state may go. A final state goes back to pending or running only through `stride resume` or a requeue
# (a new attempt); cancelled is sticky: a stop or failure reported while the job dies does not overwrite it.
MOVES: dict[str, frozenset] = {
    "pending": frozenset(STATES),
    "running": frozenset(STATES),
    "requeued": frozenset(STATES),
    "stopped": frozenset({"pending", "running", "requeued", "stopped", "failed", "timeout", "cancelled"}),
    "timeout": frozenset({"pending", "running", "requeued", "timeout", "cancelled"}),
    "completed": frozenset({"pending", "running", "completed"}),
    "failed": frozenset({"pending", "running", "requeued", "failed", "stopped", "cancelled"}),
    "cancelled": frozenset({"pending", "cancelled"}),
}


def allowed(current: Any, new: str) -> bool:
    """Whether a run in `current` (None or unknown: a new or hand-edited status) may move to `new`."""
    if new not in STATES:
        raise ValueError(f"unknown run state {new!r}")
    return current not in MOVES or new in MOVES[current]


def apply(status: MutableMapping[str, Any], new: str, keep: Iterable[str] = (), **fields: Any) -> bool:
    """Move a status dict (read under the run's lock) to `new` with `fields`; False (and nothing changed but the
    fields) when the current state is in `keep` or may not move there."""
    from stride.rundir import now_iso

    current = status.get("state")
    if current in tuple(keep) or not allowed(current, new):
        status.update({k: v for k, v in fields.items() if k != "ended_at"})
        return False
    if new in FINAL:
        fields.setdefault("ended_at", status.get("ended_at") if current == new else None)
        fields["ended_at"] = fields["ended_at"] or now_iso()
    elif "ended_at" not in fields:
        fields["ended_at"] = None
    status.update(fields, state=new)
    return True


def move(run: Any, new: str, keep: Iterable[str] = (), **fields: Any) -> dict:
    """Move `run` (a RunDir) to state `new`, merging `fields` into its status.json atomically."""
    from stride.rundir import now_iso, write_json

    with run.locked():
        status = run.read_status()
        apply(status, new, keep, **fields)
        status["updated_at"] = now_iso()
        write_json(run.status_file, status)
    return status
