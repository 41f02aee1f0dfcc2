"""The CPUs one rank may use and the torch threads it starts: what Slurm gave the task (DistEnv.cpus_per_task) within
its affinity mask. Without it every rank starts one thread per core of the node, and N ranks oversubscribe it."""
from __future__ import annotations

import os
from typing import Optional


def affinity() -> list[int]:
    """The CPUs this process may run on (its affinity mask; every CPU where the OS cannot say)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def rank_threads(per_task: Optional[int], mask_size: int, node_cpus: int, local_world: int) -> int:
    """Threads for one rank: Slurm's CPUs per task (within the mask); else a mask narrower than the node is the
    rank's own (Slurm bound the task); else the node's ranks share the mask."""
    if per_task:
        return max(1, min(per_task, mask_size))
    if mask_size < node_cpus:
        return max(1, mask_size)
    return max(1, mask_size // max(1, local_world))


def cpu_ranges(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5', as taskset and Slurm write masks."""
    parts: list[str] = []
    for cpu in cpus:
        if parts and cpu == int(parts[-1].split("-")[-1]) + 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{cpu}"
        else:
            parts.append(str(cpu))
    return ",".join(parts)


def apply_threads(per_task: Optional[int], local_world: int, environ: Optional[dict] = None) -> None:
    """Set this rank's torch threads, and OMP_NUM_THREADS for what it starts, unless the user set OMP_NUM_THREADS."""
    import torch

    environ = os.environ if environ is None else environ
    if environ.get("OMP_NUM_THREADS"):
        return
    mask = affinity()
    threads = rank_threads(per_task, len(mask), os.cpu_count() or len(mask), local_world)
    environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def describe() -> str:
    """The rank's CPUs and threads, for its log: `cpus 0-3 (4 of 64), 4 torch threads`."""
    import torch

    mask = affinity()
    return f"cpus {cpu_ranges(mask)} ({len(mask)} of {os.cpu_count()}), {torch.get_num_threads()} torch threads"
