"""Checkpoint files on disk without torch: their names, the `latest` pointer, checksums, and which ones are whole.

`stride resume` and `stride status` ask these questions before anything imports torch. Every `step_N.pt` gets a
sidecar `step_N.json` with its size and the CRC32 of its bytes, computed while it was written: torch.load never
checks torch's own per-record CRC32, so without it a flipped byte would load silently.
"""
from __future__ import annotations

import bisect
import os
import re
import threading
import zipfile
import zlib
from pathlib import Path
from typing import Optional, Sequence

from stride.rundir import read_json, write_json

LATEST = "latest"
STEP_FILE = re.compile(r"^step_(\d+)\.pt$")
CORRUPT_SUFFIX = ".corrupt"
READ_CHUNK_BYTES = 8 << 20
# Verdicts already reached in this process, by (path, size, mtime): `stride resume` checks a file, then records it.
_VERDICTS: dict[tuple[str, int, int], Optional[str]] = {}


def step_file_name(step: int) -> str:
    return f"step_{step:09d}.pt"


def step_of(path: Path) -> int:
    match = STEP_FILE.match(Path(path).name)
    assert match, f"{path} is not a step file"
    return int(match.group(1))


def sidecar_for(path: Path) -> Path:
    """step_N.pt -> step_N.json: the size and CRC32 the writer saw."""
    return Path(path).with_suffix(".json")


def step_files(directory: Path) -> list[Path]:
    """Checkpoint files, newest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def candidates(directory: Path) -> list[Path]:
    """Files to try, best first: the one `latest` names, then every other step file, newest first."""
    files = step_files(directory)
    pointer = Path(directory) / LATEST
    if pointer.is_file():
        named = Path(directory) / pointer.read_text().strip()
        if named in files:
            files.remove(named)
            files.insert(0, named)
    return files


class Crc32Writer:
    """A binary file handle that counts and checksums every byte written through it (torch.save writes in order,
    never seeking back), so the checksum costs no second pass over the file.

    The checksum runs on its own thread once the bytes are written (`start_checksum`), while the caller fsyncs: the
    disk's time, not the CPU's. So the writer keeps every chunk until then: tensor data by reference, when it lies
    in one of the `stable` buffers (address, size) that outlive the write, anything else (headers, the pickle) as a
    copy, since torch hands those over in temporary buffers.
    """

    DEFER_MIN_BYTES = 1 << 20

    def __init__(self, handle, stable: Sequence[tuple[int, int]] = ()):
        self.handle = handle
        self.num_bytes = 0
        self._chunks: list = []
        self._stable = sorted(stable)
        self._crc32: Optional[int] = None
        self._thread: Optional[threading.Thread] = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._chunks.append(view if self._is_stable(view) else bytes(view))
        self.num_bytes += view.nbytes
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()

    def _is_stable(self, view: memoryview) -> bool:
        if view.nbytes < self.DEFER_MIN_BYTES or not self._stable:
            return False
        address = _address_of(view)
        if address is None:
            return False
        index = bisect.bisect_right(self._stable, (address, float("inf"))) - 1
        return index >= 0 and address + view.nbytes <= sum(self._stable[index])

    def start_checksum(self) -> None:
        def run() -> None:
            crc = 0
            for chunk in self._chunks:
                crc = zlib.crc32(chunk, crc)  # releases the GIL on large buffers
            self._crc32, self._chunks = crc, []

        self._thread = threading.Thread(target=run, name="stride-crc32", daemon=True)
        self._thread.start()

    @property
    def crc32(self) -> int:
        if self._thread is None:
            self.start_checksum()
        assert self._thread is not None
        self._thread.join()
        assert self._crc32 is not None
        return self._crc32


def _address_of(view: memoryview) -> Optional[int]:
    try:
        import numpy as np
    except ImportError:  # without numpy every chunk is copied: slower, still right
        return None
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


def write_sidecar(path: Path, num_bytes: int, crc32: int) -> None:
    write_json(sidecar_for(path), {"file": Path(path).name, "bytes": num_bytes, "crc32": f"{crc32:08x}"})


def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(READ_CHUNK_BYTES):
            crc = zlib.crc32(chunk, crc)
    return crc


def looks_complete(path: Path) -> bool:
    """Cheap check that a file is a whole torch checkpoint: its zip central directory (written last) is readable."""
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def problem(path: Path) -> Optional[str]:
    """Why `path` cannot be trusted ("truncated: ...", "corrupt: ..."), or None when it is whole.

    A file without a sidecar (written by an older stride, or killed between the file's rename and the sidecar's)
    gets only the zip check.
    """
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as exc:
        return f"unreadable: {exc.strerror}"
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _VERDICTS:
        _VERDICTS[key] = _check(path, stat.st_size)
    return _VERDICTS[key]


def _check(path: Path, size: int) -> Optional[str]:
    expected = read_json(sidecar_for(path))
    if not isinstance(expected, dict) or "crc32" not in expected:
        return None if looks_complete(path) else "truncated: no zip central directory"
    if size != expected.get("bytes"):
        return f"truncated: {size} bytes on disk, {expected.get('bytes')} written"
    try:
        crc = f"{file_crc32(path):08x}"
    except OSError as exc:
        return f"unreadable: {exc.strerror}"
    if crc != expected["crc32"]:
        return f"corrupt: CRC32 {crc} on disk, {expected['crc32']} written"
    return None


def first_good(directory: Path) -> tuple[Optional[Path], list[str]]:
    """The first candidate that is whole, and 'name: problem' for each one before it that is not."""
    problems = []
    for path in candidates(directory):
        found = problem(path)
        if found is None:
            return path, problems
        problems.append(f"{path.name} is {found}")
    return None, problems


def move_aside(path: Path) -> Path:
    """step_N.pt -> step_N.pt.corrupt (and its sidecar), so pruning by step number never counts it again."""
    path = Path(path)
    target = path.with_name(path.name + CORRUPT_SUFFIX)
    os.replace(path, target)
    sidecar = sidecar_for(path)
    if sidecar.exists():
        os.replace(sidecar, sidecar.with_name(sidecar.name + CORRUPT_SUFFIX))
    return target
