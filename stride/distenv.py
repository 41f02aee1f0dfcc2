"""Who this process is in a job (rank, node, world) and the process group's set-up and teardown.

The only module that reads SLURM_*/submitit/RANK/MASTER_* variables; the Trainer is handed a `DistEnv`.
Rendezvous: rank 0 opens torch's TCPStore on a port the kernel picks (port 0) and publishes address and port in the
run folder (a private file in a private folder), which every rank sees. A random or hashed port can collide when two
jobs share a node; a port the kernel handed out cannot. Every wait is bounded by `init_timeout_s`, so a broken
rendezvous fails in seconds, naming the address and port, instead of hanging for torch's default 30 minutes.
The store has no authentication, so it listens on MASTER_ADDR's own address only: 127.0.0.1 for `stride local`, the
first node's address on SLURM, never every interface (torch's own choice whatever host_name says).
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Optional

from stride.errors import StrideError
from stride.rundir import make_private_dir, read_json, write_json

POLL_INTERVAL_S = 0.05
CONNECT_RETRY_S = 0.25
_STORE = None  # the rendezvous store this process joined (init_process_group), for `with_node_gpus`


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    num_nodes: int = 1
    master_addr: str = "127.0.0.1"
    rendezvous_id: str = "single"
    """Unique per launch and per requeue, so a rank never reads the rendezvous of an earlier attempt."""
    launcher: str = "single"
    """single, local (stride local --nproc), slurm (submitit), or torchrun."""
    job_id: Optional[str] = None
    restart_count: int = 0
    hostname: str = socket.gethostname()
    cpus_per_task: Optional[int] = None
    """Slurm's CPUs for this task (SLURM_CPUS_PER_TASK), when the job asked for a count."""
    node_visible_gpus: Optional[tuple] = None
    """CUDA_VISIBLE_DEVICES of every rank on this node, by local rank (None: unset there), once the ranks have met
    (`with_node_gpus`); what placement.device_index needs in every GPU binding."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def detect() -> DistEnv:
    """Read this process's place in the job from the launcher's environment."""
    env = os.environ
    if env.get("SUBMITIT_EXECUTOR") == "slurm":
        import submitit

        job = submitit.JobEnvironment()
        restart = int(env.get("SLURM_RESTART_COUNT", "0") or 0)
        cpus = env.get("SLURM_CPUS_PER_TASK", "")
        return DistEnv(rank=job.global_rank, local_rank=job.local_rank, world_size=job.num_tasks,
                       local_world_size=max(1, job.num_tasks // job.num_nodes), num_nodes=job.num_nodes,
                       master_addr=job.hostnames[0], rendezvous_id=f"slurm-{job.job_id}-{restart}",
                       launcher="slurm", job_id=str(job.job_id), restart_count=restart,
                       cpus_per_task=int(cpus) if cpus.isdigit() and int(cpus) > 0 else None)
    if "STRIDE_RENDEZVOUS_ID" in env or "RANK" in env:
        world = int(env.get("WORLD_SIZE", "1"))
        local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
        return DistEnv(rank=int(env.get("RANK", "0")), local_rank=int(env.get("LOCAL_RANK", "0")),
                       world_size=world, local_world_size=local_world,
                       num_nodes=max(1, world // max(1, local_world)),
                       master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                       rendezvous_id=env.get("STRIDE_RENDEZVOUS_ID", "torchrun"),
                       launcher="local" if "STRIDE_RENDEZVOUS_ID" in env else "torchrun")
    return DistEnv()


def _wait_for_rendezvous(path: Path, env: DistEnv, timeout_s: float) -> dict:
    """Rank 0's published address and port, polled until `timeout_s` (the port is the kernel's pick: only rank 0
    knows it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = read_json(path)
        if isinstance(info, dict) and "port" in info:
            return info
        time.sleep(POLL_INTERVAL_S)
    raise StrideError(f"rank {env.rank} on {env.hostname}: rendezvous timed out after {timeout_s:.0f}s: rank 0 "
                      f"(MASTER_ADDR={env.master_addr}) never published its MASTER_PORT in {path}; check rank 0's "
                      f"log (did it start? is the run folder on a filesystem all nodes share?)")


def _first_connect(addr: str, port: int, deadline: float) -> Optional[str]:
    """None once something accepts a TCP connection at addr:port, else the last error at the deadline.

    torch's TCPStore client retries with a back-off past its own timeout (about twice it); this probe keeps the
    rendezvous within init_timeout_s. Rank 0 publishes its port only once it listens, so a refusal means trouble.
    """
    error = "no connection attempt"
    for _ in range(int((deadline - time.monotonic()) / CONNECT_RETRY_S) + 2):
        left_s = deadline - time.monotonic()
        if left_s <= 0:
            break
        try:
            with socket.create_connection((addr, port), timeout=left_s):
                return None
        except OSError as exc:
            error = str(exc) or type(exc).__name__
        time.sleep(min(CONNECT_RETRY_S, max(0.0, deadline - time.monotonic())))
    return error


def _listening_socket(addr: str) -> socket.socket:
    """A TCP socket listening on `addr`'s own address, on a port the kernel picks, for TCPStore's master_listen_fd.

    Given only host_name and port, torch's TCPStore server listens on every interface (`::`), unauthenticated; handed
    a bound socket it listens exactly there. Rank 0 resolves MASTER_ADDR on its own node (IPv4 first) and publishes
    the address it bound, which the other ranks connect to: 127.0.0.1 locally, the first node's address on SLURM.
    """
    infos = sorted(socket.getaddrinfo(addr, 0, type=socket.SOCK_STREAM), key=lambda info: info[0] != socket.AF_INET)
    if not infos:
        raise OSError(f"{addr} resolves to no address")
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.bind(sockaddr)
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    return sock


def init_process_group(env: DistEnv, backend: str, rendezvous_dir: Path, init_timeout_s: float,
                       timeout_s: float) -> None:
    """Join the job's process group; a no-op for a single process."""
    if not env.distributed:
        return
    import torch.distributed as dist

    if env.launcher == "torchrun":
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        return
    rendezvous_file = rendezvous_dir / f"{env.rendezvous_id}.json"
    store_timeout = timedelta(seconds=init_timeout_s)
    if env.is_main:
        make_private_dir(rendezvous_dir)
        sock = None
        try:
            sock = _listening_socket(env.master_addr)
            bound_addr, port = sock.getsockname()[:2]
            # From here the store owns the socket (its fd), listening where it was bound.
            store = dist.TCPStore(bound_addr, port, env.world_size, is_master=True, timeout=store_timeout,
                                  wait_for_workers=False, master_listen_fd=sock.detach())
        except Exception as exc:  # torch raises RuntimeError/DistNetworkError with a long message
            if sock is not None and sock.fileno() != -1:
                sock.close()
            raise StrideError(f"rank 0 could not open the rendezvous store on MASTER_ADDR={env.master_addr}: "
                              f"{(str(exc) or type(exc).__name__).splitlines()[0]}") from None
        write_json(rendezvous_file, {"addr": bound_addr, "port": port, "master_addr": env.master_addr,
                                     "host": env.hostname, "pid": os.getpid(), "world_size": env.world_size},
                   private=True)
    else:
        # The whole rendezvous (waiting for rank 0's address, then connecting) stays within init_timeout_s.
        deadline = time.monotonic() + init_timeout_s
        info = _wait_for_rendezvous(rendezvous_file, env, init_timeout_s)
        port = int(info["port"])
        refused = _first_connect(info["addr"], port, deadline)
        try:
            if refused is not None:
                raise RuntimeError(refused)
            store = dist.TCPStore(info["addr"], port, env.world_size, is_master=False, timeout=store_timeout)
        except Exception as exc:
            raise StrideError(f"rank {env.rank} could not reach the rendezvous at MASTER_ADDR={info['addr']} "
                              f"MASTER_PORT={port} within {init_timeout_s:.0f}s: {str(exc).splitlines()[0]}; "
                              f"check that the address resolves on {env.hostname} and that rank 0 still runs"
                              ) from None
    global _STORE
    try:
        dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size,
                                timeout=timedelta(seconds=timeout_s))
        _STORE = store
    except Exception as exc:
        raise StrideError(f"rank {env.rank} failed to join the process group (MASTER_ADDR={env.master_addr} "
                          f"MASTER_PORT={port}, backend {backend}): {str(exc).splitlines()[0]}") from None


def with_node_gpus(env: DistEnv, timeout_s: float) -> DistEnv:
    """`env` with the CUDA_VISIBLE_DEVICES of every rank on its node, told through the rendezvous store: one set and
    local_world_size gets per rank. Unchanged for one process or under torchrun (whose store stride does not hold)."""
    if _STORE is None or not env.distributed:
        return env
    node = os.environ.get("SLURM_NODEID") or env.hostname  # (a one-machine test cluster's nodes share a hostname)
    prefix = f"stride/{env.rendezvous_id}/cuda_visible_devices/{node}"
    keys = [f"{prefix}/{i}" for i in range(env.local_world_size)]
    try:
        _STORE.set(keys[env.local_rank], json.dumps(os.environ.get("CUDA_VISIBLE_DEVICES")))
        _STORE.wait(keys, timedelta(seconds=timeout_s))
        seen = tuple(json.loads(_STORE.get(key)) for key in keys)
    except Exception as exc:  # torch raises DistStoreError and RuntimeError with long messages
        raise StrideError(f"rank {env.rank} on {env.hostname}: the other ranks of its node did not say which GPUs "
                          f"they see within {timeout_s:.0f}s ({(str(exc) or type(exc).__name__).splitlines()[0]}); "
                          f"check their logs: did they start?") from None
    return dataclasses.replace(env, node_visible_gpus=seen)


def destroy_process_group() -> None:
    import torch.distributed as dist

    global _STORE
    _STORE = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def srun_task_count() -> int:
    """How many tasks the SLURM job step this process runs in has (0 outside a step started by srun)."""
    if "SLURM_STEP_ID" not in os.environ or os.environ.get("SUBMITIT_EXECUTOR"):
        return 0
    try:
        return int(os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS") or 0)
    except ValueError:
        return 0
