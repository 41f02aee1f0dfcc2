"""Where one rank runs: the CPUs it may use and the threads and data-loader workers it starts (what Slurm gave the
task, DistEnv.cpus_per_task, within its affinity mask), the GPU it picks among those it sees, and the record of all
that in the run folder. Without it every rank starts one thread per core of the node, and N ranks oversubscribe it.

Pure functions, except `affinity`, `rank_cpus`, `apply_threads`, `describe` and `record`, which read (and set) this
process's own state.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Mapping, Optional, Sequence

if TYPE_CHECKING:
    import torch

    from stride.distenv import DistEnv

MAX_AUTO_WORKERS = 8
"""num_workers: auto never starts more workers than this per rank: beyond it, in-memory datasets gain nothing."""


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


GPU_VARIABLES = ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "GPU_DEVICE_ORDINAL",
                 "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_TASK")


def record(env: DistEnv, device: torch.device, workers: int, backend: Optional[str], gpu_binding: str,
           environ: Optional[Mapping] = None) -> dict:
    """What this rank actually got, for placement/rank_N.json: read from the process, not from the request."""
    import torch

    environ = os.environ if environ is None else environ
    mask = affinity()
    entry = {
        "attempt": env.rendezvous_id, "rank": env.rank, "local_rank": env.local_rank, "world_size": env.world_size,
        "host": environ.get("SLURMD_NODENAME") or env.hostname,
        "cpu_mask": cpu_ranges(mask), "cpus": len(mask), "node_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(), "omp_num_threads": environ.get("OMP_NUM_THREADS"),
        "data_workers": workers, "backend": backend, "gpu_binding": gpu_binding, "device": str(device),
    }
    entry.update({name.lower(): environ.get(name) for name in GPU_VARIABLES})
    from stride import network

    entry["network_env"] = {name: environ[name] for name in network.NETWORK_VARIABLES if environ.get(name)}
    entry.update(network.node_network())
    visible = visible_gpus(environ.get("CUDA_VISIBLE_DEVICES"))
    if visible:  # the GPU this rank takes (or would take, on a CPU run) of those it sees
        entry["gpu_choice"] = visible[device_index(entry["local_rank"], environ.get("CUDA_VISIBLE_DEVICES"),
                                                   env.node_visible_gpus, len(visible))]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        entry["gpu"] = str(getattr(props, "uuid", "")) or f"{entry['host']}:{device}"
        entry["gpu_name"] = props.name
        bus = [getattr(props, name, None) for name in ("pci_domain_id", "pci_bus_id", "pci_device_id")]
        if None not in bus:
            entry["gpu_pci"] = "{:04x}:{:02x}:{:02x}.0".format(*bus)
    return entry


def summary(records: Sequence[Mapping]) -> str:
    """One line for `stride status`: `4 ranks on node1,node2: 2 CPUs, 2 threads, 1 data worker each; cpu`."""
    hosts = sorted({str(r.get("host")) for r in records})

    def spread(key: str) -> str:
        values = sorted({int(r.get(key) or 0) for r in records})
        return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"

    devices = sorted({str(r.get("device")) for r in records})
    counts = [(spread("cpus"), "CPU"), (spread("threads"), "thread"), (spread("data_workers"), "data worker")]
    each = ", ".join(f"{count} {noun}{'' if count == '1' else 's'}" for count, noun in counts)
    ranks = f"{len(records)} rank{'' if len(records) == 1 else 's'}"
    return f"{ranks} on {','.join(hosts)}: {each} each; {', '.join(devices)}"


def rank_cpus(per_task: Optional[int], local_world: int) -> int:
    """How many CPUs this rank may keep busy: what `apply_threads` gives its torch threads."""
    mask = affinity()
    return rank_threads(per_task, len(mask), os.cpu_count() or len(mask), local_world)


def data_workers(setting: int | str, cpus: int) -> int:
    """DataLoader workers per rank: a number as given; auto: one per CPU of the rank beyond the training process's
    own, at most MAX_AUTO_WORKERS (0 on a one-CPU rank, where workers would only take turns with training)."""
    if setting == "auto":
        return max(0, min(MAX_AUTO_WORKERS, cpus - 1))
    return int(setting)


def gpu_sbatch_parameters(binding: str, gpus_per_node: int) -> dict:
    """submitit parameters that ask for the GPUs (none without GPUs)."""
    if not gpus_per_node:
        return {}
    if binding == "task":
        return {"gpus_per_task": 1}
    return {"gpus_per_node": gpus_per_node}


def gpu_srun_args(binding: str, gpus_per_node: int) -> list[str]:
    """srun flags that bind the GPUs as asked, whatever the site's default binding is."""
    if not gpus_per_node:
        return []
    # node: the step asks for all the node's GPUs and binds none (--gpu-bind=none would leave the tasks with no GPU
    # variables at all); a site default that narrows them anyway (SLURM_GPU_BIND) still gets the device right.
    return {"node": [f"--gpus-per-node={gpus_per_node}"], "task": ["--gpus-per-task=1", "--gpu-bind=per_task:1"],
            "closest": [f"--gpus-per-node={gpus_per_node}", "--gpu-bind=closest"]}[binding]


def visible_gpus(value: Optional[str]) -> Optional[list[str]]:
    """CUDA_VISIBLE_DEVICES as a list of ids (indices or UUIDs); None when unset (every GPU is visible)."""
    if value is None:
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


def device_index(local_rank: int, visible: Optional[str], node_visible: Optional[Sequence[Optional[str]]],
                 device_count: int) -> int:
    """The CUDA device (an index into what this rank sees) for `local_rank`, in every binding.

    `node_visible` holds CUDA_VISIBLE_DEVICES of each rank on this node, by local rank, where the ranks could tell
    each other. A rank takes the device at its position among the node's ranks that see the same set: all GPUs
    visible to all (node binding), rank i takes the i-th; one GPU each (task binding, or a site that narrows
    CUDA_VISIBLE_DEVICES per task), each takes its only one; sets per socket (closest), each rank takes the next
    free one of its socket's set. Without the peers' sets, local_rank modulo what it sees.
    """
    if device_count <= 0:
        raise ValueError("no CUDA device is visible")
    if node_visible is None or local_rank >= len(node_visible):
        return local_rank % device_count
    position = sum(1 for other in node_visible[:local_rank] if other == visible)
    return position % device_count


def contradictions(records: Sequence[Mapping]) -> list[str]:
    """Contradictions in the ranks' placement records (each a dict `record` wrote), one line each."""
    problems: list[str] = []
    by_host: dict[str, list[Mapping]] = {}
    for record in records:
        by_host.setdefault(str(record.get("host")), []).append(record)
    for host, ranks in sorted(by_host.items()):
        ranks = sorted(ranks, key=lambda r: r.get("rank", 0))
        lone = [r for r in ranks if r.get("cpus") == 1 and (r.get("node_cpus") or 1) > len(ranks)]
        if lone:
            problems.append(f"one CPU per rank on {host} (ranks {_ranks(lone)}) though the node has "
                            f"{lone[0].get('node_cpus')}: ask for more with --cpus-per-task N")
        for mask in sorted({r.get("cpu_mask") for r in ranks if r.get("cpu_mask")}):
            sharing = [r for r in ranks if r.get("cpu_mask") == mask]
            threads = sum(int(r.get("threads") or 0) for r in sharing)
            size = int(sharing[0].get("cpus") or 0)
            if size and threads > size:
                problems.append(f"{threads} torch threads on {size} CPUs ({mask}) on {host} (ranks "
                                f"{_ranks(sharing)}): unset OMP_NUM_THREADS, or lower it")
        used: dict[str, list[Mapping]] = {}
        for r in ranks:
            if r.get("gpu"):
                used.setdefault(str(r["gpu"]), []).append(r)
        for gpu, users in sorted(used.items()):
            if len(users) > 1:
                problems.append(f"ranks {_ranks(users)} on {host} share GPU {gpu}: check slurm.gpu_binding")
        on_sockets = [r for r in ranks if (r.get("nccl") or {}).get("network") == "Socket" and r.get("infiniband")]
        if on_sockets:
            problems.append(f"NCCL used its socket transport on {host} (ranks {_ranks(on_sockets)}) though the node "
                            f"has InfiniBand ({', '.join(on_sockets[0]['infiniband'])}): check NCCL_IB_HCA, "
                            f"NCCL_IB_DISABLE and NCCL_NET in distributed_kwargs.env")
        narrowed = [r for r in ranks if r.get("device", "").startswith("cuda")
                    and len(visible_gpus(r.get("cuda_visible_devices")) or [None, None]) == 1]
        if len(narrowed) > 1:
            problems.append(f"each rank on {host} sees only its own GPU (ranks {_ranks(narrowed)}): NCCL cannot use "
                            f"NVLink or P2P between them; slurm.gpu_binding=node keeps the node's GPUs visible")
    return problems


def _ranks(records: Sequence[Mapping]) -> str:
    return ",".join(str(r.get("rank")) for r in records)
