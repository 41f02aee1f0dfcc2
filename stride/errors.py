"""The errors stride raises for problems a user can fix.

A `StrideError` carries one line that names what was given, what was expected and the fix; the CLI prints it as
`stride: error: ...` and exits 2, with no traceback. Internal invariants use `assert`, never this.
"""
from __future__ import annotations

import difflib
import errno
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union


class StrideError(Exception):
    """A user-facing problem: bad config, bad run name, impossible request."""


class ConfigError(StrideError):
    """The resolved configuration is invalid."""


class RunError(StrideError):
    """A run folder is missing, invalid, or in the wrong state for the request."""


class ClusterError(StrideError):
    """The cluster refused a request or a cluster tool is missing."""


class ContainerError(StrideError):
    """A container image or runtime cannot run the ranks: missing, unreadable, or incompatible with this side."""


class FileSystemError(StrideError):
    """The filesystem refused a read or a write: permissions, a full disk, a read-only mount, a name too long."""


# The usual fix for what the OS said, by errno: the OS's own reason is always quoted beside it.
OS_HINTS = {
    errno.ENOSPC: "free some space there, or use another work_dir",
    errno.EDQUOT: "you are over your disk quota there: free some space, or use another work_dir",
    errno.EACCES: "check its permissions (ls -ld), or use another work_dir",
    errno.EPERM: "check its permissions (ls -ld), or use another work_dir",
    errno.EROFS: "that filesystem is mounted read-only: use a writable work_dir",
    errno.ENAMETOOLONG: "a name in that path is longer than the filesystem allows (often 255 bytes): shorten it",
    errno.EISDIR: "it is a folder: name a file",
    errno.ENOTDIR: "a part of that path is a file, not a folder",
    errno.ELOOP: "that path has a symbolic link loop",
    errno.EIO: "the disk or network filesystem reported an I/O error: check it (dmesg), then retry",
    errno.ENOENT: "check the path",
}


def os_error(exc: OSError, action: str = "use", path: Optional[Union[str, Path]] = None) -> FileSystemError:
    """One line for an OSError from the world: what stride was doing with which path, the OS's reason, the fix."""
    target = path if path is not None else exc.filename
    reason = exc.strerror or str(exc) or type(exc).__name__
    hint = OS_HINTS.get(exc.errno, "")
    where = f" {target}" if target not in (None, "") else ""
    return FileSystemError(f"cannot {action}{where}: {reason}" + (f" ({hint})" if hint else ""))


def os_error_in(exc: BaseException) -> Optional[OSError]:
    """The OSError that caused `exc` (itself, or one it was raised from or while handling), if any.

    torch reports a failed write as "unexpected pos ..."; the OS's reason ("No space left on device") is only in
    the exception it was raised while handling.
    """
    seen: set[int] = set()
    current: Optional[BaseException] = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno is not None:
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def world_error(exc: BaseException, words: Sequence[str] = ()) -> Optional[StrideError]:
    """The StrideError for an error the world caused (a filesystem refusal, a `~user` that does not exist), or None
    for anything else (a bug, which keeps its traceback)."""
    if isinstance(exc, OSError) and not isinstance(exc, (BrokenPipeError, ConnectionError)):
        return os_error(exc)
    if isinstance(exc, RuntimeError) and str(exc).startswith("Could not determine home directory"):
        tilde = [word for word in words if "~" in word]
        named = f" in {tilde[0]!r}" if tilde else ""
        return FileSystemError(f"cannot expand '~'{named}: no such user, or HOME is not set: write the path out in "
                               f"full, e.g. /home/NAME/...")
    return None


def did_you_mean(word: str, choices: Iterable[str], limit: int = 3) -> str:
    """A ` (did you mean 'x' or 'y'?)` hint, or an empty string when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=limit, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(f"'{c}'" for c in close) + "?)"
