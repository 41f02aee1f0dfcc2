"""A rank's torch threads follow the CPUs Slurm gave its task (pure rules here; the real job in test_submit)."""
from __future__ import annotations

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
