"""What `stride status` and `stride logs` show: each run's state from its folder, corrected by Slurm's queue.

The job writes its own state into status.json; squeue says whether a job is still queued or running; sacct (when
the site has accounting) or the job's own log says how a job ended that never got to write its state (cancelled,
timed out, killed). Standard library only: no torch, so the command is instant.
"""
from __future__ import annotations

import socket
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Optional

from stride import claim as claim_lib
from stride import network, placement, runstate, slurm
from stride.compare import higher_is_better
from stride.errors import StrideError
from stride.rundir import RunDir, read_json

FINAL_STATES = set(runstate.FINAL)
# A state that names no running process: what `stride logs --follow` waits for.
ENDED_STATES = FINAL_STATES | {"lost", "preempted", "node_fail", "out_of_memory", "broken"}
# What a rank that died without a Python exception (it wrote nothing) most likely met, by srun's word for it.
DEATH_HINTS = (("Killed", "SIGKILL: the out-of-memory killer, kill -9, or a site limit"),
               ("Out Of Memory", "over its memory limit: ask for more with --mem"),
               ("Exited with exit code", "it exited without raising (sys.exit or os._exit in the code?)"))
LOG_TAIL_BYTES = 65536
FAILURE_KEYS = ("failed_rank", "failed_host", "error", "error_tail")


def job_id_of(run: RunDir) -> Optional[str]:
    """The run's current SLURM job, or None when it last ran outside SLURM."""
    status = run.read_status()
    if status.get("launcher") not in (None, "slurm"):
        return None
    if status.get("job_id"):
        return str(status["job_id"])
    jobs = run.read_metadata().get("jobs") or []
    return str(jobs[-1]["job_id"]) if jobs else None


def _log_tail(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            handle.seek(max(0, handle.tell() - LOG_TAIL_BYTES))
            return slurm.last_attempt(handle.read().decode(errors="replace"))
    except OSError:
        return ""


def _ending_from_logs(run: RunDir, job_id: str) -> Optional[str]:
    for log in sorted(run.slurm_dir.glob(f"{job_id}_*_log.err")):
        ending = slurm.job_ending(_log_tail(log))
        if ending:
            return ending
    return None


def _death_from_logs(run: RunDir, job_id: str) -> Optional[dict]:
    """The rank srun saw die, from the batch step's stderr: the only record of a rank killed without an exception."""
    task = slurm.dead_task(_log_tail(run.slurm_dir / f"{job_id}_0_log.err"))
    if task is None:
        return None
    hint = next((h for word, h in DEATH_HINTS if task["how"].startswith(word)), "a crash in native code")
    tasks = f"tasks {task['tasks']}" if not task["tasks"].isdigit() else f"task {task['tasks']}"
    return {"failed_rank": task["rank"], "failed_host": task["node"], "error_tail": None,
            "error": f"died without a Python exception: srun: {tasks}: {task['how']} ({hint})"}


def _elapsed_s(status: dict) -> Optional[float]:
    def parse(text: Optional[str]) -> Optional[float]:
        if not text:
            return None
        try:
            return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S%z").timestamp()
        except ValueError:
            return None

    start = parse(status.get("started_at"))
    if start is None:
        return None
    end = parse(status.get("ended_at")) if status.get("state") in FINAL_STATES else None
    return (end or time.time()) - start


def local_ending(run: RunDir, status: dict) -> Optional[str]:
    """Why a run trained on a machine (not through SLURM) that still says pending or running has no process left,
    or None while one may still hold it.

    Its claim names the processes that hold it (on any host sharing the folder); a run without one is judged by the
    pid it recorded, when that pid is on this host.
    """
    if status.get("state") not in ("pending", "running"):
        return None
    holder = claim_lib.current(run)
    if holder is not None:
        why = holder.why_dead()
        return f"{why}: it ended without recording how (killed?)" if why else None
    status = run.read_status()  # released just now? Then its final state is written: read it again
    if status.get("state") != "running":
        return None
    pid, host = status.get("pid"), status.get("host")
    if pid and host == socket.gethostname() and not claim_lib.process_alive(pid):
        return f"pid {pid} on host {host} is gone: it ended without recording how (killed?)"
    return None


def broken_row(run: RunDir, reason: str) -> dict:
    """A run folder stride cannot read (a hand-edited status.json, no permission): listed, with the reason."""
    return {"run": run.name, "path": str(run.path), "state": "broken", "job_id": "", "nodes": "", "epoch": "",
            "step": "", "metrics": {}, "elapsed_s": None, "sweep": None, "failure": {"error": reason},
            "broken": reason}


def describe(run: RunDir, queue: Optional[dict], accounting: dict) -> dict:
    """One run's row: state, job, nodes, progress, metrics, elapsed, and the failure when there is one.

    `queue` is None when squeue could not be asked: the run's own status.json is then all we know.
    """
    status = run.read_status()
    job_id = job_id_of(run)
    state = status.get("state", "unknown")
    nodes = status.get("nodes") or ""
    failure = {k: status.get(k) for k in FAILURE_KEYS}
    if queue is None:
        pass
    elif job_id and job_id in queue:
        q = queue[job_id]
        slurm_state = q["state"].lower()
        # A job that checkpointed and was requeued shows PENDING again: say so.
        if slurm_state == "pending" and state in ("stopped", "running", "requeued"):
            state = "requeued"
        elif not (state in ("completed", "failed") and slurm_state in ("running", "completing")):
            state = slurm_state  # (a run that has written its end is done, even while its processes exit)
        nodes = q["nodes"] or nodes
    elif job_id and state in ("pending", "running", "stopped", "requeued") and status.get("launcher") == "slurm":
        ended = accounting.get(job_id, {}).get("state", "").lower()
        # A run that stopped on a signal ends its job cleanly: Slurm's "completed" would hide that it is unfinished.
        if ended and ended not in ("pending", "running", "requeued") and (state, ended) != ("stopped", "completed"):
            state = ended
        else:
            state = _ending_from_logs(run, job_id) or ("lost" if state != "stopped" else state)
    if (job_id and queue is not None and job_id not in queue and failure["failed_rank"] is None
            and state in ("failed", "lost", "stopped", "out_of_memory")):
        # A rank killed by a signal (SIGKILL, OOM, segfault) recorded nothing; srun's report names it.
        death = _death_from_logs(run, job_id)
        if death:
            failure.update(death)
            state = state if state == "out_of_memory" else "failed"
    lost = local_ending(run, status) if not job_id else None
    if lost:
        state = "lost"
        failure.update(error=lost)
    epoch, step, total = status.get("epoch"), status.get("step"), status.get("total_steps")
    epochs = run.read_config().get("training_kwargs", {}).get("epochs") if run.exists() else None
    metrics = status.get("results") or status.get("metrics") or {}
    row = {"run": run.name, "path": str(run.path), "state": state, "job_id": job_id or "", "nodes": nodes,
           "epoch": f"{epoch}/{epochs}" if epoch is not None else "", "step": f"{step}/{total}" if step else "",
           "metrics": metrics, "elapsed_s": _elapsed_s(status), "sweep": run.read_metadata().get("sweep")}
    if state in ("failed", "lost") or failure["failed_rank"] is not None:
        row["failure"] = failure
    return row


def _job_id_or_none(run: RunDir) -> Optional[str]:
    try:
        return job_id_of(run)
    except StrideError:
        return None


def describe_runs(runs: Iterable[RunDir], keep_broken: bool = True) -> list[dict]:
    """One row per run. A run whose folder cannot be read is a `broken` row (`keep_broken`), so one bad folder
    does not hide the others; without `keep_broken` its error is raised."""
    runs = list(runs)
    job_ids = [j for j in (_job_id_or_none(r) for r in runs) if j]
    queue = slurm.query_squeue(job_ids)
    missing = [j for j in job_ids if queue is not None and j not in queue]
    accounting = slurm.query_sacct(missing) if missing else {}
    rows = []
    for run in runs:
        try:
            rows.append(describe(run, queue, accounting))
        except StrideError as exc:
            if not keep_broken:
                raise
            rows.append(broken_row(run, str(exc)))
    return rows


def _format_elapsed(seconds: Optional[float]) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _format_metrics(metrics: dict, limit: int = 3) -> str:
    shown = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float))][:limit]
    return " ".join(f"{k}={v:.4g}" for k, v in shown)


def _render(columns: list[str], table: list[list[str]]) -> list[str]:
    widths = [max(len(c), *(len(row[i]) for row in table)) if table else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in table]
    return lines


def sort_rows(rows: list[dict], metric: Optional[str]) -> list[dict]:
    """Best first by `metric` (smallest for losses and errors, largest for accuracy, f1, auc...); runs without it
    last."""
    if not metric:
        return rows
    maximize = higher_is_better(metric)
    have = [r for r in rows if isinstance(r["metrics"].get(metric), (int, float))]
    lacking = [r for r in rows if r not in have]
    return sorted(have, key=lambda r: r["metrics"][metric], reverse=maximize) + lacking


def _short_names(keys: list[str]) -> list[str]:
    """Swept keys as column names: the last part (lr, seed) unless two keys share it."""
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return [short if last.count(short) == 1 else key for short, key in zip(last, keys)]


def _format_sweep(sweep_id: str, rows: list[dict]) -> list[str]:
    keys = rows[0]["sweep"]["keys"]
    metric_names = sorted({k for r in rows for k, v in r["metrics"].items() if isinstance(v, (int, float))
                           and k.startswith(("test_", "val_"))}, key=lambda k: (not k.startswith("test_"), k))
    columns = ["run", "state", "job_id", *_short_names(keys), "epoch", "elapsed", *metric_names]
    table = [[str(r["run"]), r["state"], r["job_id"], *(str(r["sweep"]["values"].get(k, "")) for k in keys),
              r["epoch"], _format_elapsed(r["elapsed_s"]),
              *(f"{r['metrics'][m]:.4g}" if isinstance(r["metrics"].get(m), (int, float)) else "" for m in metric_names)]
             for r in rows]
    header = f"sweep {sweep_id}: {len(rows)} runs over {', '.join(keys)}"
    return [header, *_render(columns, table)]


def format_table(rows: list[dict], sort: Optional[str] = None) -> str:
    """Plain runs in one table; each sweep in its own table with the swept values and final metrics as columns."""
    plain = [r for r in rows if not r.get("sweep")]
    sweeps: dict[str, list[dict]] = {}
    for row in rows:
        if row.get("sweep"):
            sweeps.setdefault(row["sweep"]["id"], []).append(row)
    blocks = []
    if plain or not sweeps:
        columns = ["run", "state", "job_id", "nodes", "epoch", "step", "elapsed", "metrics"]
        table = [[str(cell) for cell in (r["run"], r["state"], r["job_id"], r["nodes"], r["epoch"], r["step"],
                                         _format_elapsed(r["elapsed_s"]), _format_metrics(r["metrics"]))]
                 for r in sort_rows(plain, sort)]
        blocks.append("\n".join(_render(columns, table)))
    for sweep_id, members in sweeps.items():
        blocks.append("\n".join(_format_sweep(sweep_id, sort_rows(members, sort))))
    broken = [f"run {r['run']} is broken: {r['broken']}" for r in rows if r.get("broken")]
    if broken:
        blocks.append("\n".join(broken))
    return "\n\n".join(blocks)


def read_placement(run: RunDir) -> list[dict]:
    """The placement records of the run's latest attempt (rank 0's), by rank; [] before any rank wrote one."""
    records = []
    for path in sorted(run.placement_dir.glob("rank_*.json")) if run.placement_dir.is_dir() else ():
        record = read_json(path)
        if isinstance(record, dict) and isinstance(record.get("rank"), int):
            records.append(record)
    first = next((r for r in records if r["rank"] == 0), None)
    if first is None:
        return []
    latest = sorted((r for r in records if r.get("attempt") == first.get("attempt")), key=lambda r: r["rank"])
    for record in latest:  # what NCCL says it used, where distributed_kwargs.nccl_debug asked it to say
        log = run.logs_dir / network.NCCL_DEBUG_FILE.format(rank=record["rank"])
        if log.is_file():
            record["nccl"] = network.parse_nccl_log(log.read_text(errors="replace"))
    return latest


def placement_lines(records: list[dict]) -> list[str]:
    """`placement:` and one `warning:` line per contradiction, for the detail view."""
    if not records:
        return []
    nccl = sorted({f"NCCL {n['version']} over {n['network']}" + (f" ({', '.join(n['nics'])})" if n["nics"] else "")
                   for n in (r.get("nccl") for r in records) if n and n.get("network")})
    return ([f"placement: {placement.summary(records)}"] + [f"network:  {line}" for line in nccl]
            + [f"warning:  {problem}" for problem in placement.contradictions(records)])


def format_detail(row: dict) -> str:
    lines = [f"run:      {row['path']}", f"state:    {row['state']}"]
    for label, key in (("job:", "job_id"), ("nodes:", "nodes"), ("epoch:", "epoch"), ("step:", "step")):
        if row[key]:
            lines.append(f"{label:<9} {row[key]}")
    if row["elapsed_s"] is not None:
        lines.append(f"elapsed:  {_format_elapsed(row['elapsed_s'])}")
    if row["metrics"]:
        lines.append(f"metrics:  {_format_metrics(row['metrics'], limit=10)}")
    failure = row.get("failure")
    if failure and failure.get("failed_rank") is not None:
        lines.append(f"failed:   rank {failure['failed_rank']} on {failure['failed_host']}: {failure['error']}")
        for line in failure.get("error_tail") or []:
            lines.append(f"          {line}")
    elif failure and failure.get("error"):
        label = {"lost": "ended:", "broken": "broken:"}.get(row["state"], "failed:")
        lines.append(f"{label:<9} {failure['error']}")
    lines += placement_lines(row.get("placement") or [])
    return "\n".join(lines)


def log_path(run: RunDir, rank: int, slurm_stream: Optional[str] = None) -> Path:
    """The rank's own log, or (slurm_stream='out'/'err') submitit's stdout/stderr of that task in the last job."""
    if slurm_stream is None:
        return run.rank_log(rank)
    job_id = job_id_of(run)
    return run.slurm_dir / f"{job_id}_{rank}_log.{slurm_stream}"


def read_new(path: Path, offset: int) -> tuple[str, int]:
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:
        return "", offset
    return data.decode(errors="replace"), offset + len(data)


def is_finished(run: RunDir) -> bool:
    """The run has ended: a final state, or no process left that could still write (see `local_ending`)."""
    return describe_runs([run])[0]["state"] in ENDED_STATES


def follow(run: RunDir, path: Path, write: Any, poll_s: float = 0.5, idle_after_end_s: float = 2.0,
           max_s: float = 7 * 24 * 3600) -> None:
    """Print `path` as it grows until the run has ended and the log has been quiet for a moment."""
    offset = 0
    quiet_since = None
    deadline = time.monotonic() + max_s
    while time.monotonic() < deadline:
        text, offset = read_new(path, offset)
        if text:
            write(text)
            quiet_since = None
        elif is_finished(run):
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= idle_after_end_s:
                return
        time.sleep(poll_s)
