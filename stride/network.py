"""The network settings every rank runs with: `distributed_kwargs.env` applied in the rank itself (so it holds on the
host and inside every container runtime, over whatever the site's environment says), a check that the interfaces
they name exist on the rank's node, and what NCCL's own log says it used (version, transport, NICs).

Pure functions, except `apply_env`, `check_interfaces` and `node_network`, which read or set this process's state.
"""
from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Mapping, MutableMapping, Optional, Sequence

from stride.errors import StrideError

# What a rank records of its network settings (placement record), whether set by stride or by the site.
NETWORK_VARIABLES = ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "NCCL_IB_HCA", "NCCL_IB_DISABLE", "NCCL_NET",
                     "NCCL_DEBUG", "NCCL_P2P_DISABLE", "NCCL_SHM_DISABLE", "TP_SOCKET_IFNAME")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# Read by the interpreter or the loader before a rank's first line runs: setting them from inside it is too late.
TOO_LATE = ("PYTHONPATH", "PYTHONHOME", "LD_LIBRARY_PATH", "LD_PRELOAD", "PATH")
NCCL_DEBUG_FILE = "nccl_rank_{rank}.log"


def check_env_section(env: object) -> list[str]:
    """Problems in distributed_kwargs.env, one line each."""
    problems: list[str] = []
    for name, value in (env.items() if isinstance(env, Mapping) else ()):
        key = f"distributed_kwargs.env.{name}"
        if not ENV_NAME.match(str(name)):
            problems.append(f"config key 'distributed_kwargs.env' has '{name}', which is not an environment variable "
                            f"name")
        elif name in TOO_LATE:
            problems.append(f"config key '{key}' is read before a rank starts, so setting it there is too late: set "
                            f"it with --setup 'export {name}=...' (slurm.setup) or container.env")
        elif isinstance(value, bool) or not isinstance(value, (str, int, float)):
            problems.append(f"config key '{key}' got {value!r}; expected a string or number")
    return problems


def apply_env(env: Mapping, environ: Optional[MutableMapping] = None) -> None:
    """Set distributed_kwargs.env in this rank (before torch.distributed and CUDA start), over the site's values."""
    environ = os.environ if environ is None else environ
    for name, value in env.items():
        environ[str(name)] = str(value)


def nccl_debug_env(log_dir: Path, rank: int, environ: Optional[MutableMapping] = None) -> None:
    """distributed_kwargs.nccl_debug: NCCL's INFO log for this rank's init and network, in the run folder."""
    environ = os.environ if environ is None else environ
    environ.setdefault("NCCL_DEBUG", "INFO")
    environ.setdefault("NCCL_DEBUG_SUBSYS", "INIT,NET")
    environ["NCCL_DEBUG_FILE"] = str(log_dir / NCCL_DEBUG_FILE.format(rank=rank))


def matching_interfaces(spec: str, interfaces: Sequence[str], exact: bool = False) -> list[str]:
    """The interfaces an NCCL_SOCKET_IFNAME-style spec selects: comma-separated prefixes, `=` for exact names, `^`
    to exclude instead (`^docker,lo`); GLOO_SOCKET_IFNAME takes exact names only (`exact`)."""
    spec = spec.strip()
    exclude = spec.startswith("^")
    spec = spec[1:] if exclude else spec
    if spec.startswith("="):
        exact, spec = True, spec[1:]
    names = [name.strip() for name in spec.split(",") if name.strip()]

    def selected(interface: str) -> bool:
        return any(interface == name if exact else interface.startswith(name) for name in names)

    return [i for i in interfaces if selected(i) != exclude]


def interface_problems(environ: Mapping, interfaces: Sequence[str]) -> list[str]:
    """Each socket-interface setting that selects none of this node's interfaces, as `NAME=value`."""
    problems = []
    for name, exact in (("NCCL_SOCKET_IFNAME", False), ("GLOO_SOCKET_IFNAME", True), ("TP_SOCKET_IFNAME", True)):
        spec = environ.get(name)
        if not spec:
            continue
        if exact:  # gloo binds one device per name: every name must exist
            missing = [n.strip() for n in spec.split(",") if n.strip() and n.strip() not in interfaces]
            if missing:
                problems.append(f"{name}={spec} names {', '.join(missing)}")
        elif not matching_interfaces(spec, interfaces):
            problems.append(f"{name}={spec} matches none")
    return problems


def interfaces() -> list[str]:
    """This node's network interfaces, by name."""
    try:
        return [name for _, name in socket.if_nameindex()]
    except OSError:
        return []


def check_interfaces(rank: int, host: str, environ: Optional[Mapping] = None) -> None:
    """Fail fast, naming the node and the interface, when a socket-interface setting selects none of this node's
    (NCCL and gloo would otherwise fail later with a vaguer error, or wait out the rendezvous timeout)."""
    environ = os.environ if environ is None else environ
    here = interfaces()
    if not here:
        return
    problems = interface_problems(environ, here)
    if problems:
        raise StrideError(f"rank {rank} on {host}: {'; '.join(problems)} of this node's network interfaces "
                          f"({', '.join(here)}): fix distributed_kwargs.env (or the site's setting) to name one of "
                          f"them")


def node_network() -> dict:
    """The node's interfaces and InfiniBand devices, for the placement record."""
    ib = Path("/sys/class/infiniband")
    try:
        devices = sorted(p.name for p in ib.iterdir()) if ib.is_dir() else []
    except OSError:
        devices = []
    return {"interfaces": interfaces(), "infiniband": devices}


_VERSION = re.compile(r"NCCL version (\S+)")
_USING_NET = re.compile(r"NCCL INFO Using network (\S+)")
_NET_USING = re.compile(r"NCCL INFO NET/(\w+) ?: Using (.+?)(?: ; OOB (\S+))?\s*$")
_NIC = re.compile(r"\[\d+\](\S+)")
_CHANNEL_VIA = re.compile(r"NCCL INFO Channel \S+ : .* via (\w+)")


def parse_nccl_log(text: str) -> Optional[dict]:
    """What NCCL's INFO log says it used: version, network (IB, Socket or a plug-in's name), the NICs with their
    kind (mlx5_0:1/IB, mlx5_0:1/RoCE, eth0), the out-of-band interface, whether it found no InfiniBand device, and
    how channels connect (P2P, SHM within a node; NET between nodes). None when the text holds no NCCL line."""
    if "NCCL" not in text:
        return None
    found: dict = {"version": None, "network": None, "nics": [], "oob": None, "ib_missing": False, "via": []}
    via: set[str] = set()
    for line in text.splitlines():
        if (match := _VERSION.search(line)) and found["version"] is None:
            found["version"] = match.group(1)
        elif match := _USING_NET.search(line):
            found["network"] = match.group(1)
        elif match := _NET_USING.search(line):
            kind, used, oob = match.groups()
            nics = _NIC.findall(used)
            if kind in ("IB", "Socket") or nics:
                found["nics"] = [nic.split("<")[0] for nic in nics]
                found["oob"] = oob.split("<")[0] if oob else found["oob"]
                found["network"] = found["network"] or kind
        elif "NET/IB : No device found" in line:
            found["ib_missing"] = True
        elif match := _CHANNEL_VIA.search(line):
            via.add(match.group(1))
    found["via"] = sorted(via)
    return found
