"""A broken rendezvous fails within distributed_kwargs.init_timeout_s, naming MASTER_ADDR and MASTER_PORT."""
from __future__ import annotations

import json
import socket
import time

import pytest

from stride.distenv import DistEnv, init_process_group
from stride.errors import StrideError

# Imported here, so the timings below measure the rendezvous alone.
pytest.importorskip("torch.distributed")

INIT_TIMEOUT_S = 3.0
# torch's TCPStore client retries once after a back-off before it gives up (about 1.5 x its timeout), plus a busy
# 2-core machine.
BOUND_S = 2 * INIT_TIMEOUT_S + 3.0


def unused_port() -> int:
    """A loopback port nobody listens on (bound once by the kernel, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank1(rendezvous_id: str) -> DistEnv:
    return DistEnv(rank=1, local_rank=1, world_size=2, local_world_size=2, master_addr="127.0.0.1",
                   rendezvous_id=rendezvous_id, launcher="local")


def test_rank_pointed_at_a_dead_port_fails_in_time_naming_address_and_port(tmp_path):
    port = unused_port()
    (tmp_path / "r.json").write_text(json.dumps({"addr": "127.0.0.1", "port": port}))
    started = time.monotonic()
    with pytest.raises(StrideError) as caught:
        init_process_group(rank1("r"), "gloo", tmp_path, init_timeout_s=INIT_TIMEOUT_S, timeout_s=30)
    assert time.monotonic() - started < BOUND_S
    assert f"MASTER_ADDR=127.0.0.1 MASTER_PORT={port}" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_rank_0_that_never_publishes_fails_in_time_naming_the_address(tmp_path):
    started = time.monotonic()
    with pytest.raises(StrideError) as caught:
        init_process_group(rank1("never"), "gloo", tmp_path, init_timeout_s=INIT_TIMEOUT_S, timeout_s=30)
    elapsed = time.monotonic() - started
    assert INIT_TIMEOUT_S <= elapsed < BOUND_S
    message = str(caught.value)
    assert "MASTER_ADDR=127.0.0.1" in message and "MASTER_PORT" in message and str(tmp_path / "never.json") in message
