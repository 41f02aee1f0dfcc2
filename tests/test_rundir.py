"""Run folders: name validation, atomic allocation under real concurrency, atomic writes."""
from __future__ import annotations

import multiprocessing

import pytest

from stride import rundir
from stride.errors import ConfigError, RunError


@pytest.mark.parametrize("name", ["..", ".", "a/b", "../x", "/abs", "", "x" * 200, "a\\b", "-x", "a b"])
def test_bad_run_names_are_refused(name):
    with pytest.raises(ConfigError):
        rundir.validate_run_name(name)


@pytest.mark.parametrize("name", ["0", "12", "lr3e-4", "seed_1.v2", "a+b"])
def test_good_run_names(name):
    assert rundir.validate_run_name(name) == name


def _allocate_many(work_dir: str, count: int, queue) -> None:
    queue.put([rundir.allocate(work_dir).name for _ in range(count)])


def test_concurrent_allocation_never_shares_a_folder(tmp_path):
    """Several processes allocate at the same moment; every folder goes to exactly one of them."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_allocate_many, args=(str(tmp_path), 10, queue)) for _ in range(6)]
    for proc in procs:
        proc.start()
    names = [name for _ in procs for name in queue.get(timeout=60)]
    for proc in procs:
        proc.join(timeout=60)
    assert len(names) == 60
    assert len(set(names)) == 60
    assert sorted(int(n) for n in names) == list(range(60))


def test_named_run_cannot_be_allocated_twice(tmp_path):
    rundir.allocate(tmp_path, "baseline")
    with pytest.raises(RunError, match="already exists"):
        rundir.allocate(tmp_path, "baseline")


def test_atomic_write_leaves_old_content_when_writer_fails(tmp_path):
    target = tmp_path / "status.json"
    rundir.write_json(target, {"state": "running"})

    def explode(handle):
        handle.write('{"state": "half')
        raise RuntimeError("disk died")

    with pytest.raises(RuntimeError):
        rundir.atomic_write(target, explode)
    assert rundir.read_json(target) == {"state": "running"}
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]  # no temporary file left behind


def test_find_run_and_list_runs(tmp_path):
    for name in ["10", "2", "named"]:
        run = rundir.allocate(tmp_path, name)
        run.write_config({"run": name})
    assert [r.name for r in rundir.list_runs(tmp_path)] == ["2", "10", "named"]
    assert rundir.find_run("2", tmp_path).path == (tmp_path / "2").absolute()
    with pytest.raises(RunError, match="does not exist"):
        rundir.find_run("3", tmp_path)
    with pytest.raises(ConfigError):
        rundir.find_run("../2", tmp_path)
