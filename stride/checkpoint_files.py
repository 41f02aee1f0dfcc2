"""Checkpoint files on disk without torch: their names, the `latest` pointer, checksums, and which ones are whole.

`stride resume` and `stride status` ask these questions before anything imports torch. Every `step_N.pt` gets a
sidecar `step_N.json` with its size and the CRC32 of its bytes, computed while it was written: torch.load never
checks torch's own per-record CRC32, so without it a flipped byte would load silently.
"""
from __future__ import annotations

import os
import re
import zipfile
import zlib
from pathlib import Path
from typing import Optional

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
    never seeking back), so the checksum costs no second pass over the file."""

    def __init__(self, handle):
        self.handle = handle
        self.crc32 = 0
        self.num_bytes = 0

    def write(self, data) -> int:
        self.crc32 = zlib.crc32(data, self.crc32)  # releases the GIL on large buffers: training keeps running
        self.num_bytes += len(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


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
