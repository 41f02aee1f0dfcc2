"""Checkpoint files: the CRC32 sidecar catches what torch.load would not, bad files are moved aside, pruning keeps
the file `latest` names."""
from __future__ import annotations

import os
import threading
import zlib
from pathlib import Path

import pytest
import torch

from stride.checkpoint import LATEST, QUIET_NICE, BackgroundWriter, Checkpointer
from stride.checkpoint_files import first_good, sidecar_for
from stride.errors import RunError


def state(step: int) -> dict:
    return {"step": step, "model": {"w": torch.full((50_000,), float(step))}}


def names(folder: Path, pattern: str = "step_*") -> list[str]:
    return sorted(p.name for p in folder.glob(pattern))


def test_checksum_taken_during_the_fsync_matches_the_file(tmp_path):
    """Large tensor data is checksummed from the tensors after the write; everything else torch.save hands over in
    temporary buffers (headers, a pickle bigger than the 1 MiB threshold) must have been copied first."""
    from stride.checkpoint import save_file

    big = torch.arange(3 << 20, dtype=torch.float32)
    view = big[1000:2_000_000]  # torch.save writes a view's whole storage
    payload = {"big": big, "view": view, "small": torch.ones(10), "notes": list(range(400_000)),
               "half": torch.randn(1 << 19).half(), "nested": [{"x": torch.zeros(300_000)}]}
    path = tmp_path / "state.pt"
    num_bytes, crc32 = save_file(payload, path)
    data = path.read_bytes()
    assert num_bytes == len(data) and crc32 == zlib.crc32(data)
    assert len(__import__("pickle").dumps(payload["notes"])) > 1 << 20
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["view"], view) and loaded["notes"] == payload["notes"]


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


def test_best_weights_are_written_from_their_own_host_copy_before_the_checkpoint(tmp_path):
    """best.pt comes from the copy taken when the weights were best, however training moved on since."""
    from stride.checkpoint import HostStaging

    ckpt = Checkpointer(tmp_path / "checkpoints")
    live = state(5)
    best_copy = HostStaging()
    best_copy.copy(live["model"])
    live["model"]["w"].fill_(7.0)  # two epochs later: the checkpoint holds these, best.pt the earlier ones
    ckpt.save(live, 7, weights=(tmp_path / "weights" / "best.pt", {"best": {"epoch": 0}}, best_copy))
    live["model"]["w"].zero_()  # training goes on while the write runs: the copies were taken before
    ckpt.close()
    best = torch.load(tmp_path / "weights" / "best.pt", weights_only=True)
    assert best["best"] == {"epoch": 0} and torch.equal(best["model"]["w"], torch.full((50_000,), 5.0))
    assert best["model"].keys() == {"w"}
    checkpoint = torch.load(ckpt.path_for(7), weights_only=True)
    assert torch.equal(checkpoint["model"]["w"], torch.full((50_000,), 7.0))
    assert (tmp_path / "weights" / "best.pt").stat().st_mtime_ns <= ckpt.path_for(7).stat().st_mtime_ns


def test_a_late_copy_holds_the_values_at_save_time_once_ready(tmp_path):
    """Weights named `late` are copied on a helper thread; after staging_ready() the next "optimizer step" may
    change them and the file still holds the values at save time."""
    ckpt = Checkpointer(tmp_path / "checkpoints")
    live = {"step": 3, "model": {"w": torch.full((4_000_000,), 3.0), "running_mean": torch.full((8,), 3.0)}}
    ckpt.save(live, 3, late=frozenset({live["model"]["w"].data_ptr()}))
    live["model"]["running_mean"].fill_(4.0)  # a buffer the next forward changes: copied before save returned
    ckpt.staging_ready()
    live["model"]["w"].fill_(4.0)  # the next optimizer step
    ckpt.close()
    saved = torch.load(ckpt.path_for(3), weights_only=True)["model"]
    assert torch.equal(saved["w"], torch.full((4_000_000,), 3.0))
    assert torch.equal(saved["running_mean"], torch.full((8,), 3.0))


def test_background_checkpoints_hold_exactly_what_synchronous_ones_do(tmp_path, monkeypatch):
    """The host copy of weights and optimizer state overlaps the next forward and backward: every checkpoint must
    still equal the one a synchronous save takes at the same step, tensor for tensor and bit for bit. The copy is
    slowed down so that it always outlasts the next forward and backward."""
    import time

    from stride import Trainer
    from stride.checkpoint import HostStaging

    copy_pairs = HostStaging._copy_pairs

    def slow_copy_pairs(self, pairs):
        time.sleep(0.05)
        copy_pairs(self, pairs)

    monkeypatch.setattr(HostStaging, "_copy_pairs", slow_copy_pairs)

    def train(name: str, background: bool) -> Path:
        Trainer(work_dir=tmp_path / name, model_kwargs={"model_name": "MLP", "hidden": [1024, 1024]}, device="cpu",
                training_kwargs={"epochs": 2, "deterministic": True, "checkpoint_every_steps": 3,
                                 "keep_last_checkpoints": 100, "async_checkpoint": background}).fit()
        return tmp_path / name / "0" / "checkpoints"

    background, synchronous = train("background", True), train("synchronous", False)
    files = names(background, "step_*.pt")
    assert len(files) > 5 and files == names(synchronous, "step_*.pt")
    for name in files:
        a = torch.load(background / name, weights_only=True)
        b = torch.load(synchronous / name, weights_only=True)
        for part in ("model", "optimizer"):
            flat_a, flat_b = _tensors(a[part]), _tensors(b[part])
            assert flat_a.keys() == flat_b.keys()
            for key in flat_a:
                assert torch.equal(flat_a[key], flat_b[key]), (name, part, key)


def _tensors(value, prefix: str = "") -> dict:
    if torch.is_tensor(value):
        return {prefix: value}
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    return {k: v for key, item in items for k, v in _tensors(item, f"{prefix}/{key}").items()}


def test_background_writes_run_at_the_lowest_cpu_priority_and_training_keeps_its_own():
    """Writes (and the checksum thread a write starts) yield the CPU to training; the training thread is untouched."""
    seen: list[int] = []

    def nice_here() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def write() -> None:
        seen.append(nice_here())
        helper = threading.Thread(target=lambda: seen.append(nice_here()))
        helper.start()
        helper.join()

    before = nice_here()
    writer = BackgroundWriter("test-writer")
    writer.submit(write)
    writer.close()
    assert seen == [QUIET_NICE, QUIET_NICE] and nice_here() == before
