"""Checkpoint files on disk without torch: their names, the `latest` pointer, and which ones are whole.

`stride resume` and `stride status` ask these questions before anything imports torch.
"""
from __future__ import annotations

import re
import zipfile
from pathlib import Path

LATEST = "latest"
STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def step_file_name(step: int) -> str:
    return f"step_{step:09d}.pt"


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


def looks_complete(path: Path) -> bool:
    """Cheap check that a file is a whole torch checkpoint: its zip central directory (written last) is readable."""
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def complete_checkpoints(directory: Path) -> list[Path]:
    """The candidates that are whole files, best first."""
    return [path for path in candidates(directory) if looks_complete(path)]
