"""The errors stride raises for problems a user can fix.

A `StrideError` carries one line that names what was given, what was expected and the fix; the CLI prints it as
`stride: error: ...` and exits 2, with no traceback. Internal invariants use `assert`, never this.
"""
from __future__ import annotations

import difflib
from typing import Iterable


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


def did_you_mean(word: str, choices: Iterable[str], limit: int = 3) -> str:
    """A ` (did you mean 'x' or 'y'?)` hint, or an empty string when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=limit, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(f"'{c}'" for c in close) + "?)"
