"""Whose files stride is about to act on: a work_dir's config.yaml and a run's config.json may name any import path
(models, datasets, tasks, callbacks), so training or resuming from another user's folder runs their code as you.

Standard library only; warns (once per path, on stderr), never refuses: reading a colleague's results is normal.
"""
from __future__ import annotations

import os
import pwd
import sys
from pathlib import Path
from typing import Optional

_WARNED: set[str] = set()


def _owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def foreign_owner(*paths: Path) -> Optional[tuple[Path, int]]:
    """The first existing path owned by another user, and that user's uid; None when all are ours (or root's: root can
    already run anything as anyone, so its folders mark no boundary)."""
    me = os.getuid()
    for path in paths:
        try:
            uid = os.stat(path).st_uid
        except OSError:
            continue
        if uid not in (me, 0):
            return Path(path), uid
    return None


def warn_if_foreign(what: str, *paths: Path) -> None:
    """One `stride: warning:` line when `what` (a work_dir, a run folder) belongs to another user."""
    found = foreign_owner(*paths)
    if found is None:
        return
    path, uid = found
    key = str(Path(path).absolute())
    if key in _WARNED:
        return
    _WARNED.add(key)
    print(f"stride: warning: {what} {key} belongs to {_owner_name(uid)}, not to you: its config can name any import "
          f"path, which runs as you; train or resume from it only if you trust {_owner_name(uid)} (or copy what you "
          f"need into a folder of your own)", file=sys.stderr)
