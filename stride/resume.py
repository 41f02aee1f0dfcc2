"""`stride resume`: check that a run can continue, apply the few amendments allowed, and record them.

A resumed run is the same run: its config may change only where that cannot change what is being trained (more
epochs, checkpoint cadence, data-loading workers, timeouts, SLURM resources). Standard library only: the checks run
before any launcher imports torch.
"""
from __future__ import annotations

import json
import math
import socket
from typing import Any, Mapping, Optional, Sequence

from stride import claim as claim_lib
from stride import config as config_lib
from stride import slurm
from stride.checkpoint_files import first_good
from stride.errors import RunError
from stride.rundir import RunDir, now_iso

AMENDABLE_PREFIXES = (
    "training_kwargs.epochs", "training_kwargs.log_every_steps", "training_kwargs.checkpoint_every_steps",
    "training_kwargs.checkpoint_every_minutes", "training_kwargs.keep_last_checkpoints",
    "training_kwargs.stop_check_seconds",
    "training_kwargs.async_checkpoint", "load_data_kwargs.num_workers", "load_data_kwargs.pin_memory",
    "load_data_kwargs.persistent_workers", "load_data_kwargs.worker_start", "load_data_kwargs.eval_batch_size",
    "distributed_kwargs.", "slurm.",
    "device",
)
LIVE_STATES = {"pending", "running", "requeued", "configuring", "completing", "suspended", "resizing"}


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and key not in config_lib.FREE_FORM and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def changed_keys(before: Mapping, after: Mapping) -> dict[str, list]:
    """{dotted key: [old, new]} for every leaf that differs."""
    old, new = _flatten(before), _flatten(after)
    return {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def amend_config(run: RunDir, overrides: Sequence[str], flags: Optional[Mapping] = None) -> tuple[dict, dict]:
    """The run's config with `key=value` overrides and CLI flags applied; (config, changes). Refuses other keys."""
    original = run.read_config()
    amended = config_lib.resolve(overrides=overrides, base=original, final=flags or {}, experiment_config=False)
    # Against the original with today's defaults filled in: a key added to stride since the run was made is no change.
    changes = changed_keys(config_lib.validate(json.loads(json.dumps(original))), amended)
    refused = [k for k in changes if not k.startswith(AMENDABLE_PREFIXES)]
    if refused:
        raise RunError(f"cannot change {', '.join(refused)} when resuming {run.path}: it would no longer be the same "
                       f"run; start a new run with `stride local {run.config_file} run=null {refused[0]}=...`")
    return amended, changes


def epochs_trained(status: Mapping, epochs: int) -> Optional[float]:
    """How many epochs the run has trained (a fraction mid-epoch), from its steps; None before any step."""
    step, total = status.get("step"), status.get("total_steps")
    if not isinstance(step, int) or not isinstance(total, int) or total <= 0 or epochs <= 0:
        return None
    return round(step / (total / epochs), 2)


def suggest_resume(run: RunDir, epochs: int, argv: Optional[Sequence[str]] = None) -> str:
    """The user's own `stride resume` command line (flags kept) with training_kwargs.epochs set to `epochs`."""
    import shlex
    import sys

    words = list(sys.argv[1:] if argv is None else argv)
    if not words or words[0] != "resume":
        words = ["resume", str(run.path)]
    words = [w for w in words if not w.startswith(("training_kwargs.epochs=", "--dry-run", "--dry_run"))
             and w not in ("--config",)]
    return shlex.join(["stride", *words, f"training_kwargs.epochs={epochs}"])


def check_resumable(run: RunDir, live_state: str, config: Mapping, original: Mapping,
                    claim: bool = True) -> Optional[str]:
    """Raise when the run cannot be resumed; return a message when there is nothing to do (a completed run).

    After asking the queue, this process claims the run (stride.claim), before anything is written: a second `stride
    resume` started at the same moment, here or on another host, is refused at once, naming this one. The claim is
    held until this process exits, or hands over: its launcher trains under it, and `launch.submit_run` lets go once
    the job is recorded (the job's rank 0 then claims the run for its attempt).
    """
    status = run.read_status()
    if live_state in LIVE_STATES and status.get("launcher") == "slurm":
        raise RunError(f"run {run.path} still has SLURM job {status.get('job_id')} ({live_state}): wait for it, or "
                       f"`stride cancel {run.path}` first")
    if claim:  # a dry run checks the same things but holds nothing
        claim_lib.acquire(run, launcher="resume", purpose=claim_lib.RESUME, ended_jobs=_ended_holder_job(run))
    status = run.read_status()  # as it is now that no other process can start an attempt
    run.read_metadata()  # unreadable, or hand-edited into a list: stop here, before the resume writes anything
    if (live_state == "running" and status.get("host") == socket.gethostname()
            and claim_lib.process_alive(status.get("pid"))):  # a run started by a stride without claims
        raise RunError(f"run {run.path} is running right now (pid {status.get('pid')} on this machine): stop it first")
    epochs, was = config["training_kwargs"]["epochs"], original["training_kwargs"]["epochs"]
    trained = epochs_trained(status, was)
    if trained is not None and epochs < trained:
        raise RunError(f"run {run.path} has already trained {trained:g} epochs, so training_kwargs.epochs={epochs} "
                       f"would end before where it is: give at least {math.ceil(trained)}, e.g. "
                       f"{suggest_resume(run, math.ceil(trained) if status.get('state') != 'completed' else was * 2)}")
    if status.get("state") == "completed" and epochs <= was:
        return (f"run {run.path} is already completed ({trained if trained is not None else was:g} epochs): nothing "
                f"to do. To train longer: {suggest_resume(run, was * 2)}")
    checkpoint, problems = first_good(run.checkpoints_dir)
    if checkpoint is None:
        why = "; ".join(problems) if problems else "it stopped before its first checkpoint"
        raise RunError(f"run {run.path} has no complete checkpoint to resume from ({why}): train it again with "
                       f"`stride local {run.config_file} run=null`")
    return None


def _ended_holder_job(run: RunDir) -> list[str]:
    """The SLURM job named by the run's claim when the queue says it is over: a job killed before its rank 0 let go
    (scancel's SIGKILL after KillWait, a node failure) leaves a fresh claim that would refuse for minutes."""
    holder = claim_lib.live_holder(run)
    job_id = str(holder.info.get("job_id") or "") if holder else ""
    if not job_id:
        return []
    queue = slurm.query_squeue([job_id])
    if queue is None or (job_id in queue and queue[job_id]["state"].lower() in LIVE_STATES):
        return []  # squeue cannot be asked, or the job still runs (or its processes are still exiting)
    return [job_id]


def record_resume(run: RunDir, config: dict, changes: dict, launcher: str, command: Sequence[str]) -> None:
    """Write the amended config, note the amendment and the resume in metadata, and mark the run pending."""
    if changes:
        run.write_config(config)
    stamp = now_iso()
    checkpoint = first_good(run.checkpoints_dir)[0]  # checked by check_resumable: not read again

    def note(metadata: dict) -> None:
        if changes:
            metadata.setdefault("amendments", []).append({"time": stamp, "changes": changes})
        metadata.setdefault("resumes", []).append({"time": stamp, "launcher": launcher, "command": list(command),
                                                   "checkpoint": checkpoint.name if checkpoint else None})

    run.update_metadata(note)
    # Resumed here, a run that last ran on SLURM is no longer its old job's: `stride status` must not ask sacct.
    local = {"launcher": launcher, "job_id": None} if launcher == "local" else {}
    from stride import runstate

    runstate.move(run, "pending", resumed_at=stamp, results=None, stop_reason=None, **local)
