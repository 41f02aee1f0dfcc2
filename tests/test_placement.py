"""A rank's torch threads follow the CPUs Slurm gave its task (pure rules here; the real job in test_submit)."""
from __future__ import annotations

import json

import pytest

from stride import placement


@pytest.mark.parametrize("per_task, mask, node, local_world, expected", [
    (4, 64, 64, 8, 4),     # --cpus-per-task 4, unbound (task/none): the task's share, not the node
    (4, 2, 64, 8, 2),      # bound to fewer CPUs than asked: never more threads than CPUs
    (None, 8, 64, 8, 8),   # bound by Slurm, no per-task count: the mask is the rank's own
    (None, 64, 64, 8, 8),  # unbound and no count: the node's ranks share its CPUs
    (None, 2, 2, 4, 1),    # more ranks than CPUs: one thread each, never zero
])
def test_rank_threads(per_task, mask, node, local_world, expected):
    assert placement.rank_threads(per_task, mask, node, local_world) == expected


def test_cpu_ranges_read_as_slurm_writes_them():
    assert placement.cpu_ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert placement.cpu_ranges([3]) == "3"


def test_the_users_omp_num_threads_wins():
    environ = {"OMP_NUM_THREADS": "3"}
    placement.apply_threads(1, 4, environ)
    assert environ["OMP_NUM_THREADS"] == "3"


def test_threads_are_set_from_the_task_cpus():
    import torch

    before = torch.get_num_threads()
    environ: dict = {}
    try:
        placement.apply_threads(1, 2, environ)
        assert environ["OMP_NUM_THREADS"] == "1" and torch.get_num_threads() == 1
        assert placement.describe().endswith(", 1 torch threads")
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("visible, expected", [
    # node binding: every rank sees all four GPUs; rank i takes the i-th
    (["0,1,2,3"] * 4, [0, 1, 2, 3]),
    # CUDA_VISIBLE_DEVICES unset on every rank (a site that does not set it): the same set, so the same rule
    ([None] * 4, [0, 1, 2, 3]),
    # task binding, or a site that narrows per task: each rank sees one GPU, its own
    (["0", "1", "2", "3"], [0, 0, 0, 0]),
    # cgroup-constrained devices: every rank sees its own GPU as "0"
    (["0", "0", "0", "0"], [0, 0, 0, 0]),
    # closest, tasks placed in blocks: ranks 0-1 on socket 0 (GPUs 0,1), ranks 2-3 on socket 1 (GPUs 2,3)
    (["0,1", "0,1", "2,3", "2,3"], [0, 1, 0, 1]),
    # closest, tasks placed cyclically over sockets (srun's default block:cyclic): ranks 0,2 | 1,3
    (["0,1", "2,3", "0,1", "2,3"], [0, 0, 1, 1]),
])
def test_each_rank_picks_a_device_of_its_own_in_every_binding(visible, expected):
    count = len(placement.visible_gpus(visible[0]) or [0, 1, 2, 3])
    chosen = [placement.device_index(rank, visible[rank], visible, count) for rank in range(4)]
    assert chosen == expected
    # no two ranks end on the same physical GPU where the ids are global (not cgroup-renumbered)
    if visible[0] is not None and visible != ["0"] * 4:
        physical = [(placement.visible_gpus(visible[r]) or [])[chosen[r]] for r in range(4)]
        assert len(set(physical)) == 4, physical


def test_without_the_peers_sets_a_rank_takes_local_rank_modulo_what_it_sees():
    assert [placement.device_index(rank, "0,1", None, 2) for rank in range(4)] == [0, 1, 0, 1]
    assert placement.device_index(3, "5", None, 1) == 0
    with pytest.raises(ValueError):
        placement.device_index(0, "", None, 0)


@pytest.mark.parametrize("setting, cpus, expected", [
    ("auto", 1, 0), ("auto", 2, 1), ("auto", 6, 5), ("auto", 64, placement.MAX_AUTO_WORKERS), (3, 1, 3), (0, 64, 0),
])
def test_data_workers_auto_follow_the_ranks_cpus(setting, cpus, expected):
    assert placement.data_workers(setting, cpus) == expected


def test_gpu_requests_per_binding():
    assert placement.gpu_sbatch_parameters("node", 0) == {} and placement.gpu_srun_args("task", 0) == []
    assert placement.gpu_sbatch_parameters("node", 4) == {"gpus_per_node": 4}
    assert placement.gpu_sbatch_parameters("task", 4) == {"gpus_per_task": 1}
    assert placement.gpu_srun_args("node", 4) == ["--gpus-per-node=4"]
    assert placement.gpu_srun_args("task", 4) == ["--gpus-per-task=1", "--gpu-bind=per_task:1"]
    assert placement.gpu_srun_args("closest", 4) == ["--gpus-per-node=4", "--gpu-bind=closest"]


def _record(rank, **fields):
    base = {"attempt": "a", "rank": rank, "local_rank": rank, "host": "node1", "cpu_mask": f"{rank}", "cpus": 1,
            "node_cpus": 64, "threads": 1, "data_workers": 0, "device": "cpu"}
    return {**base, **fields}


def test_contradictions_are_named_with_ranks_and_host():
    lone = [_record(0), _record(1)]
    assert placement.contradictions(lone) == [
        "one CPU per rank on node1 (ranks 0,1) though the node has 64: ask for more with --cpus-per-task N"]
    crowded = [_record(r, cpu_mask="0-3", cpus=4, threads=4) for r in range(2)]
    assert placement.contradictions(crowded) == [
        "8 torch threads on 4 CPUs (0-3) on node1 (ranks 0,1): unset OMP_NUM_THREADS, or lower it"]
    shared = [_record(r, cpu_mask="0-7", cpus=8, threads=4, device="cuda:0", gpu="GPU-aa",
                      cuda_visible_devices="0,1") for r in range(2)]
    assert placement.contradictions(shared) == ["ranks 0,1 on node1 share GPU GPU-aa: check slurm.gpu_binding"]
    hidden = [_record(r, cpu_mask="0-7", cpus=8, threads=4, device="cuda:0", gpu=f"GPU-{r}",
                      cuda_visible_devices=str(r)) for r in range(2)]
    assert "NCCL cannot use NVLink or P2P" in placement.contradictions(hidden)[0]
    fine = [_record(r, cpu_mask=f"{2 * r}-{2 * r + 1}", cpus=2, threads=2) for r in range(2)]
    assert placement.contradictions(fine) == []
    assert placement.summary(fine) == "2 ranks on node1: 2 CPUs, 2 threads, 0 data workers each; cpu"


def test_a_run_records_what_each_rank_got_and_status_shows_it(tmp_path, stride):
    """num_workers: auto is sized from the rank's CPUs, and the placement record says what the rank really got."""
    import os

    stride("local", "work_dir=exp", "training_kwargs.epochs=1", "load_data_kwargs.num_workers=auto", check=True)
    record = json.loads((tmp_path / "exp" / "0" / "placement" / "rank_0.json").read_text())
    cpus = len(os.sched_getaffinity(0))
    assert record["cpus"] == cpus and record["cpu_mask"] == placement.cpu_ranges(sorted(os.sched_getaffinity(0)))
    assert record["data_workers"] == placement.data_workers("auto", cpus) and record["device"] == "cpu"
    status = stride("status", str(tmp_path / "exp" / "0"), check=True).stdout
    assert f"placement: 1 rank on {record['host']}: {cpus} CPU" in status, status


@pytest.mark.parametrize("partition, sinfo, expected", [
    ("JobDefaults=DefCpuPerGPU=8,DefMemPerGPU=4000", "64|gpu:8|p", (8, "its DefCpuPerGPU")),
    ("JobDefaults=(null)", "64|gpu:a100:8(S:0-1)|gpu*", (8, "64 CPUs / 8 GPUs per node")),
    ("", "64|gpu:a100:8(S:0-1)|p\n32|gpu:v100:2,gpu:t4:2|p\n16|(null)|p", (8, "32 CPUs / 4 GPUs per node")),
    ("", "16|(null)|cpu", None),   # no GPU nodes: nothing to derive
    ("", "2|gpu:4|p", None),       # fewer CPUs than GPUs: no whole CPU per GPU
])
def test_cpus_per_gpu_from_what_slurm_shows(partition, sinfo, expected):
    from stride import slurm

    assert slurm.parse_cpus_per_gpu(partition, sinfo) == expected


def test_ranks_stride_launches_start_data_workers_from_a_forkserver():
    """A fork of a rank whose communication threads enter Python at that moment can deadlock the child (CPython
    3.11); a lone process keeps fork (shared memory, no re-import)."""
    from stride.training.data import resolve_worker_start, worker_context

    assert resolve_worker_start("auto", launched_rank=True) == "forkserver"
    assert resolve_worker_start("auto", launched_rank=False) == "fork"
    assert resolve_worker_start("spawn", launched_rank=True) == "spawn"
    assert worker_context("forkserver").get_start_method() == "forkserver"


def test_two_ranks_with_workers_record_how_their_workers_started(tmp_path, stride):
    stride("local", "work_dir=exp", "training_kwargs.epochs=1", "load_data_kwargs.num_workers=1", "--nproc", "2",
           check=True)
    for rank in range(2):
        record = json.loads((tmp_path / "exp" / "0" / "placement" / f"rank_{rank}.json").read_text())
        assert (record["data_workers"], record["worker_start"], record["backend"]) == (1, "forkserver", "gloo")
