"""One measurement in a fresh process: train one workload with one side (stride's Trainer or the raw loop) and print
what was measured as one JSON line. `bench/run.py` starts these, alternating the sides.

Every side is timed the same way: its training batches pass through `StepStamps`, which records when each one
reaches the loop (one generator step per batch, on every side): the time of every step, whatever fetches the batches.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch

from bench import workloads

SIDES = ("stride", "careful", "usual")


def machine_busy_s() -> float:
    """CPU seconds every core of this machine spent busy since boot (all processes), from /proc/stat."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return float("nan")
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def foreign_load(busy_s: float, own_cpu_s: float, wall_s: float) -> float:
    """The share of the machine's cores that other processes kept busy: what the bench could not control."""
    return max(0.0, busy_s - own_cpu_s) / (wall_s * (os.cpu_count() or 1))


class StepStamps:
    """A timestamp as each training batch reaches the loop (the start of each training step). Both sides' batch
    iterables go through `__call__`, one generator step per batch, so it adds the same tiny cost to each and changes
    nothing about how either fetches its batches."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.cpu_stamps: list[float] = []
        self.busy_at_start = float("nan")

    def __call__(self, batches: Iterable) -> Iterator:
        stamps, cpu_stamps = self.stamps, self.cpu_stamps
        for batch in batches:
            if not stamps:
                self.busy_at_start = machine_busy_s()
            stamps.append(time.perf_counter())
            cpu_stamps.append(time.process_time())
            yield batch


def _step_stats(data: StepStamps, batch_size: int) -> dict:
    """Steady-state throughput: steps from the first batch fetch to the last one (per-epoch validation and, for
    stride, its epoch-end checkpoint and status writes fall inside this window; setup and the final test do not).
    CPU time over the same window (all threads of the process) counts the work done, whatever else the machine ran.
    """
    stamps = data.stamps
    end, end_cpu, end_busy = time.perf_counter(), time.process_time(), machine_busy_s()
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    window = stamps[-1] - stamps[0] if len(stamps) > 1 else float("nan")
    cpu = data.cpu_stamps[-1] - data.cpu_stamps[0] if len(stamps) > 1 else float("nan")
    return {"foreign_load": foreign_load(end_busy - data.busy_at_start, end_cpu - data.cpu_stamps[0], end - stamps[0]),
            "steps": len(stamps), "window_s": window, "steps_per_s": len(gaps) / window if gaps else float("nan"),
            "cpu_ms_per_step": cpu / len(gaps) * 1e3 if gaps else float("nan"),
            "samples_per_s": len(gaps) * batch_size / window if gaps else float("nan"),
            "median_step_ms": statistics.median(gaps) * 1e3 if gaps else float("nan"),
            "p10_step_ms": statistics.quantiles(gaps, n=10)[0] * 1e3 if len(gaps) > 1 else float("nan")}


def _checkpoint_stalls(stamps: list[float], steps: list[int], writes: list[tuple[float, float]]) -> dict:
    """Per checkpoint: how much longer the step that took it ran than a normal step (the stall), and how much the
    steps that ran while the write was in flight slowed down in total (the background write's cost to training)."""
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    near = {i for n in steps for i in range(n - 1, n + 4)}
    baseline = statistics.median([g for i, g in enumerate(gaps) if i not in near and i >= 2])
    stalls, slowdowns, overlapped = [], [], []
    saved = set(steps)
    for k, n in enumerate(steps):
        if n - 1 >= len(gaps):  # the last step of the run: no next fetch to time it by
            continue
        stalls.append(gaps[n - 1] - baseline)
        if writes:
            end = writes[k][1]
            # The next checkpoint's own stall is counted as a stall, not as this write's slowdown.
            after = [gaps[i] - baseline for i in range(n, len(gaps)) if stamps[i] < end and i + 1 not in saved]
            slowdowns.append(sum(after))
            overlapped.append(len(after))
    # How much slower the steps that overlapped a write ran than normal steps, as a share of their normal time.
    slower = [s / (count * baseline) for s, count in zip(slowdowns, overlapped) if count]
    return {"baseline_step_ms": baseline * 1e3, "stall_ms": [s * 1e3 for s in stalls],
            "slowdown_during_write_ms": [s * 1e3 for s in slowdowns], "steps_during_write": overlapped,
            "overlap_slowdown": slower}


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_write_s(path: Path, num_bytes: int, chunk_bytes: int = 16 << 20) -> float:
    """The disk's raw speed for this size: write `num_bytes` in large chunks with os.write, fsync, close."""
    block = os.urandom(1 << 20) * (chunk_bytes >> 20)
    view = memoryview(block)
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = num_bytes
        while left > 0:
            left -= os.write(fd, view[:min(left, chunk_bytes)])
        os.fsync(fd)
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed


def reference_saves(state: dict, folder: Path, repeats: int) -> dict:
    """The same state, in this process, to the same disk, interleaved: a plain synchronous torch.save, the same
    plus fsync, stride's own synchronous write (Checkpointer.save(wait=True)), and raw fsync'd writes of as many bytes.
    """
    from stride.checkpoint import Checkpointer

    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[float]] = {"torch_save_s": [], "torch_save_fsync_s": [], "stride_sync_s": [],
                                   "stride_write_s": [], "disk_s": []}
    num_bytes = 0
    for r in range(repeats):
        path = folder / "plain.pt"
        start = time.perf_counter()
        torch.save(state, path)
        out["torch_save_s"].append(time.perf_counter() - start)
        num_bytes = path.stat().st_size
        path.unlink()
        start = time.perf_counter()
        torch.save(state, path)
        _fsync_path(path)
        out["torch_save_fsync_s"].append(time.perf_counter() - start)
        path.unlink()
        checkpointer = Checkpointer(folder / "stride", keep_last=1, background=False)
        start = time.perf_counter()
        checkpointer.save(state, r + 1, wait=True)
        out["stride_sync_s"].append(time.perf_counter() - start)  # host copy + write
        out["stride_write_s"].append(checkpointer.history[-1].write_s)  # serialise, checksum, write, fsync, rename
        out["disk_s"].append(disk_write_s(folder / "raw.bin", num_bytes))
    return {"bytes": num_bytes, **out}


def run_stride(workload: workloads.Workload, device: str, precision: str, compile: bool, work_dir: Path) -> dict:
    import stride.training.loop
    from stride import Trainer
    from stride.checkpoint import Checkpointer

    made: list[Checkpointer] = []

    class RecordedCheckpointer(Checkpointer):  # only to find the instance the loop creates; behaviour unchanged
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            made.append(self)

    # The loop builds its Checkpointer by the name it imported into stride.training.loop: patch it there.
    stride.training.loop.Checkpointer = RecordedCheckpointer
    stamped = StepStamps()
    on_device = stride.training.loop.device_batches  # the loop's one source of training batches, stamped
    stride.training.loop.device_batches = lambda loader, device: stamped(on_device(loader, device))
    trainer = Trainer(**workload.stride_kwargs(str(work_dir), device, precision, compile))
    start = time.perf_counter()
    results = trainer.fit()
    fit_s = time.perf_counter() - start
    out = {"fit_s": fit_s, **_step_stats(stamped, workload.batch_size),
           "final": {k: results[k] for k in results if k.startswith(("test_", "val_"))}}
    if workload.checkpoint_every_steps:
        history = [s for c in made for s in getattr(c, "history", [])]
        every = workload.checkpoint_every_steps
        mid = [s for s in history if s.step % every == 0 and s.step < len(stamped.stamps)]
        out["checkpoint"] = _checkpoint_stalls(stamped.stamps, [s.step for s in mid],
                                               [(s.started, s.written) for s in mid])
        out["checkpoint"].update(
            save_stall_ms=[s.stall_s * 1e3 for s in mid], write_s=[s.write_s for s in mid],
            write_bytes=[s.num_bytes for s in mid])
        run_dir = trainer.run_dir
        state, _ = Checkpointer(run_dir.checkpoints_dir).load_latest(trainer.device)
        out["reference"] = reference_saves(state, work_dir / "reference", repeats=3)
    return out


def run_raw(workload: workloads.Workload, device_name: str, precision: str, compile: bool, work_dir: Path,
            fetch: str = "careful") -> dict:
    from bench import raw

    device = torch.device(device_name)
    splits, model = raw.build(workload, device)
    stamped = StepStamps()
    work_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = raw.train(workload, splits, model, device, work_dir, precision, compile,
                        log=lambda line: print(line, file=sys.stderr), fetch=fetch, batches=stamped)
    fit_s = time.perf_counter() - start
    out = {"fit_s": fit_s, **_step_stats(stamped, workload.batch_size),
           "final": {k: results[k] for k in results if k.startswith(("test_", "val_"))}}
    if workload.checkpoint_every_steps:
        every = workload.checkpoint_every_steps
        steps = [n for n in range(every, len(stamped.stamps), every)]
        out["checkpoint"] = _checkpoint_stalls(stamped.stamps, steps, [])
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.worker")
    parser.add_argument("side", choices=SIDES, help="stride, or the plain loop with careful (batched) or usual "
                                                    "(per-sample DataLoader) fetching")
    parser.add_argument("workload")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="the ckpt workload's steps per checkpoint")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    workload = workloads.get(args.workload, args.quick)
    if args.checkpoint_every and workload.checkpoint_every_steps:
        workload = workloads.with_checkpoint_every(workload, args.checkpoint_every)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="stride-bench-"))
    if args.side == "stride":
        out = run_stride(workload, args.device, args.precision, args.compile, work_dir / args.side)
    else:
        out = run_raw(workload, args.device, args.precision, args.compile, work_dir / args.side, fetch=args.side)
    if args.device.startswith("cuda"):
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.update(side=args.side, workload=workload.name)
    print("BENCH " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
