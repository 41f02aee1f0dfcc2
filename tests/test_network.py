"""distributed_kwargs.env and the interface check (pure rules here, a real job below), and NCCL's log read back."""
from __future__ import annotations

import time

import pytest

from conftest import read_json
from slurm_helpers import needs_slurm, submitted, wait_gone
from stride import network


@pytest.mark.parametrize("spec, exact, expected", [
    ("eth", False, ["eth0", "eth1"]),          # NCCL: a prefix
    ("=eth0", False, ["eth0"]),                # `=`: exact
    ("^docker,lo", False, ["eth0", "eth1", "ib0"]),  # `^`: all but these prefixes
    ("ib,eth1", False, ["eth1", "ib0"]),
    ("eth0", True, ["eth0"]),                  # gloo: exact names
    ("et", True, []),
])
def test_interface_specs_select_as_nccl_and_gloo_read_them(spec, exact, expected):
    here = ["lo", "eth0", "eth1", "docker0", "ib0"]
    assert sorted(network.matching_interfaces(spec, here, exact)) == expected


def test_a_setting_that_selects_no_interface_is_named():
    here = ["lo", "eth0"]
    assert network.interface_problems({"NCCL_SOCKET_IFNAME": "ib", "GLOO_SOCKET_IFNAME": "lo,bogus0"}, here) == [
        "NCCL_SOCKET_IFNAME=ib matches none", "GLOO_SOCKET_IFNAME=lo,bogus0 names bogus0"]
    assert network.interface_problems({"NCCL_SOCKET_IFNAME": "^docker", "GLOO_SOCKET_IFNAME": "lo"}, here) == []


def test_env_names_and_values_are_checked():
    assert network.check_env_section({"NCCL_IB_HCA": "mlx5_0", "NCCL_DEBUG": "WARN", "X": 3}) == []
    problems = network.check_env_section({"1BAD": "x", "LD_PRELOAD": "a.so", "NCCL_NET": ["IB"]})
    assert "'1BAD', which is not an environment variable name" in problems[0]
    assert "'distributed_kwargs.env.LD_PRELOAD' is read before a rank starts" in problems[1]
    assert "'distributed_kwargs.env.NCCL_NET' got ['IB']; expected a string or number" in problems[2]


# NCCL 2.x INFO lines as ranks print them (host:pid:tid [device] NCCL INFO ...).
IB_LOG = """\
gpu01:1234:1234 [0] NCCL INFO Bootstrap : Using ib0:10.1.0.11<0>
gpu01:1234:1234 [0] NCCL INFO NCCL version 2.21.5+cuda12.4
gpu01:1234:1301 [0] NCCL INFO NET/IB : Using [0]mlx5_0:1/IB [1]mlx5_1:1/IB ; OOB ib0:10.1.0.11<0>
gpu01:1234:1301 [0] NCCL INFO Using network IB
gpu01:1234:1301 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[1] via P2P/CUMEM/read
gpu01:1234:1301 [0] NCCL INFO Channel 00/0 : 7[7] -> 8[0] [receive] via NET/IB/0/GDRDMA
"""
ROCE_LOG = """\
node3:88:88 [1] NCCL INFO NCCL version 2.18.3+cuda12.1
node3:88:140 [1] NCCL INFO NET/IB : Using [0]mlx5_2:1/RoCE ; OOB eth0:192.168.5.3<0>
node3:88:140 [1] NCCL INFO Using network IB
node3:88:140 [1] NCCL INFO Channel 01/0 : 1[1] -> 2[2] via SHM/direct/direct
"""
SOCKET_LOG = """\
n7:51:51 [0] NCCL INFO NCCL version 2.19.3+cuda12.2
n7:51:70 [0] NCCL INFO NET/IB : No device found.
n7:51:70 [0] NCCL INFO NET/Socket : Using [0]eth0:10.0.0.7<0>
n7:51:70 [0] NCCL INFO Using network Socket
"""


@pytest.mark.parametrize("text, expected", [
    (IB_LOG, {"version": "2.21.5+cuda12.4", "network": "IB", "nics": ["mlx5_0:1/IB", "mlx5_1:1/IB"],
              "oob": "ib0:10.1.0.11", "ib_missing": False, "via": ["NET", "P2P"]}),
    (ROCE_LOG, {"version": "2.18.3+cuda12.1", "network": "IB", "nics": ["mlx5_2:1/RoCE"], "oob": "eth0:192.168.5.3",
                "ib_missing": False, "via": ["SHM"]}),
    (SOCKET_LOG, {"version": "2.19.3+cuda12.2", "network": "Socket", "nics": ["eth0:10.0.0.7"], "oob": None,
                  "ib_missing": True, "via": []}),
    ("no nccl here\n", None),
])
def test_nccl_logs_say_which_version_transport_and_nics(text, expected):
    assert network.parse_nccl_log(text) == expected


def test_a_socket_transport_on_an_infiniband_node_is_flagged():
    from stride import placement

    records = [{"rank": r, "host": "gpu01", "cpus": 8, "cpu_mask": "0-7", "threads": 8 if r == 0 else 0,
                "device": "cuda:0", "infiniband": ["mlx5_0"], "nccl": network.parse_nccl_log(SOCKET_LOG)}
               for r in range(2)]
    assert any("NCCL used its socket transport on gpu01 (ranks 0,1) though the node has InfiniBand (mlx5_0)" in p
               for p in placement.contradictions(records))


@pytest.mark.slurm
@needs_slurm
def test_a_bogus_interface_fails_fast_naming_node_and_interface_and_lo_reaches_every_rank(tmp_path, stride):
    job = ["--profile", "local", "--nodes", "2", "--tasks-per-node", "1", "training_kwargs.epochs=1"]
    started = time.monotonic()
    bad, bad_job = submitted(stride("submit", "work_dir=bad", *job, "distributed_kwargs.env.GLOO_SOCKET_IFNAME=bogus0"))
    good, good_job = submitted(stride("submit", "work_dir=good", *job, "distributed_kwargs.env.GLOO_SOCKET_IFNAME=lo"))
    wait_gone(bad_job)
    status = read_json(bad / "status.json")
    assert status["state"] == "failed", status
    assert "GLOO_SOCKET_IFNAME=bogus0 names bogus0 of this node's network interfaces (lo" in status["error"]
    assert f"on {status['failed_host']}:" in status["error"] and status["failed_host"] in ("node1", "node2")
    assert time.monotonic() - started < 120
    wait_gone(good_job)
    assert read_json(good / "status.json")["state"] == "completed"
    for rank in range(2):
        record = read_json(good / "placement" / f"rank_{rank}.json")
        assert record["network_env"]["GLOO_SOCKET_IFNAME"] == "lo" and "lo" in record["interfaces"]


def test_nccl_debug_writes_one_log_per_rank_into_the_run_folder(tmp_path):
    environ = {"NCCL_DEBUG": "WARN"}
    network.nccl_debug_env(tmp_path / "logs", 3, environ)
    assert environ == {"NCCL_DEBUG": "WARN", "NCCL_DEBUG_SUBSYS": "INIT,NET",
                       "NCCL_DEBUG_FILE": str(tmp_path / "logs" / "nccl_rank_3.log")}
