"""Checkpoint files: the CRC32 sidecar catches what torch.load would not, bad files are moved aside, pruning keeps
the file `latest` names."""
from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch

from stride.checkpoint import Checkpointer, LATEST
from stride.checkpoint_files import first_good, sidecar_for
from stride.errors import RunError


def state(step: int) -> dict:
    return {"step": step, "model": {"w": torch.full((50_000,), float(step))}}


def names(folder: Path, pattern: str = "step_*") -> list[str]:
    return sorted(p.name for p in folder.glob(pattern))


def test_sidecar_holds_the_size_and_crc32_of_the_bytes_on_disk(tmp_path):
    ckpt = Checkpointer(tmp_path, keep_last=2)
    ckpt.save(state(7), 7)
    ckpt.close()
    path = ckpt.path_for(7)
    sidecar = __import__("json").loads(sidecar_for(path).read_text())
    assert sidecar == {"file": path.name, "bytes": path.stat().st_size,
                       "crc32": f"{zlib.crc32(path.read_bytes()):08x}"}
    assert (tmp_path / LATEST).read_text() == path.name + "\n"


def test_a_flipped_byte_is_caught_and_moved_aside_in_favour_of_the_previous_file(tmp_path):
    ckpt = Checkpointer(tmp_path, keep_last=3)
    for step in (1, 2):
        ckpt.save(state(step), step)
    ckpt.close()
    newest = ckpt.path_for(2)
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x01
    newest.write_bytes(bytes(data))
    assert torch.load(newest, weights_only=True)["step"] == 2  # torch itself loads it without a word
    with pytest.raises(RunError, match=r"step_000000002.pt is corrupt: CRC32 \w{8} on disk, \w{8} written"):
        ckpt.load(newest)
    found, path = Checkpointer(tmp_path).load_latest()
    assert found["step"] == 1 and names(tmp_path, "*.corrupt") == []  # a read-only look moves nothing
    found, path = Checkpointer(tmp_path).load_latest(move_aside=True)
    assert found["step"] == 1 and path == ckpt.path_for(1)
    assert names(tmp_path, "*.corrupt") == ["step_000000002.json.corrupt", "step_000000002.pt.corrupt"]
    assert first_good(tmp_path) == (ckpt.path_for(1), [])


def test_no_loadable_file_is_an_error_naming_each_one_not_a_fresh_start(tmp_path):
    ckpt = Checkpointer(tmp_path)
    assert ckpt.load_latest() is None  # nothing yet: a fresh start is right
    ckpt.save(state(1), 1)
    ckpt.close()
    path = ckpt.path_for(1)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(RunError, match=r"no checkpoint in .* can be loaded \(step_000000001.pt is truncated: \d+ "
                                       r"bytes on disk, \d+ written\)"):
        ckpt.load_latest(move_aside=True)
    assert path.is_file()
    assert first_good(tmp_path)[0] is None and "truncated" in first_good(tmp_path)[1][0]


def test_a_file_without_sidecar_loads_when_whole(tmp_path):
    """Checkpoints written before stride kept checksums (or killed between the file and its sidecar)."""
    ckpt = Checkpointer(tmp_path)
    ckpt.save(state(3), 3)
    ckpt.close()
    sidecar_for(ckpt.path_for(3)).unlink()
    assert ckpt.load_latest()[0]["step"] == 3


def test_pruning_keeps_the_new_file_and_drops_files_numbered_after_it(tmp_path):
    """Files numbered after the one just written are left from an attempt the run went back on."""
    ckpt = Checkpointer(tmp_path, keep_last=2, background=False)
    for step in (10, 20, 99):
        ckpt.save(state(step), step)
    (tmp_path / LATEST).write_text(ckpt.path_for(20).name + "\n")
    ckpt.save(state(30), 30)
    assert names(tmp_path) == ["step_000000020.json", "step_000000020.pt", "step_000000030.json",
                               "step_000000030.pt"]
    ckpt.keep_last = 1
    ckpt.save(state(40), 40)
    assert names(tmp_path) == ["step_000000040.json", "step_000000040.pt"]


def test_weights_ride_along_from_the_same_host_copy_before_the_checkpoint(tmp_path):
    ckpt = Checkpointer(tmp_path / "checkpoints")
    live = state(5)
    ckpt.save(live, 5, weights=(tmp_path / "weights" / "best.pt", {"best": {"epoch": 0}}))
    live["model"]["w"].zero_()  # training goes on while the write runs: the copy was taken at save()
    ckpt.close()
    best = torch.load(tmp_path / "weights" / "best.pt", weights_only=True)
    assert best["best"] == {"epoch": 0} and torch.equal(best["model"]["w"], torch.full((50_000,), 5.0))
    assert best["model"].keys() == {"w"}
