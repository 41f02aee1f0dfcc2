"""Sweeps on the command line: `lr=1e-3,3e-4 seed=range(0,3)` expands to the cartesian product of its points.

A value with top-level commas (outside brackets and quotes) or a `range(start, stop[, step])` is swept; a YAML list
such as `[64,64]` is one value. Each point is an ordinary list of `key=value` overrides, so every point resolves and
validates exactly like a single run. Standard library only.
"""
from __future__ import annotations

import itertools
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Sequence

from stride.errors import ConfigError

_RANGE = re.compile(r"^range\((.*)\)$")
# Keys whose value decides where runs go, or what SLURM allocation they share: never swept.
UNSWEEPABLE = ("work_dir", "run")


@dataclass
class Sweep:
    fixed: list[str]
    """Overrides shared by every point."""
    axes: list[tuple[str, list[str]]] = field(default_factory=list)
    """(key, values) for each swept key, in command-line order."""

    @property
    def keys(self) -> list[str]:
        return [key for key, _ in self.axes]

    @property
    def size(self) -> int:
        size = 1
        for _, values in self.axes:
            size *= len(values)
        return size

    def points(self) -> list[dict[str, str]]:
        """Each point's swept values, {key: raw value}, in cartesian order (the last key varies fastest)."""
        return [dict(zip(self.keys, combo)) for combo in itertools.product(*(values for _, values in self.axes))]

    def overrides(self, point: dict[str, str]) -> list[str]:
        return [*self.fixed, *(f"{key}={value}" for key, value in point.items())]


def new_sweep_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets, braces, parentheses or quotes."""
    items, depth, quote, current = [], 0, "", []
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            items.append("".join(current))
            current = []
            continue
        current.append(char)
    items.append("".join(current))
    return items


def _range_values(key: str, inner: str) -> list[str]:
    parts = [part.strip() for part in inner.split(",")]
    try:
        numbers = [int(part) for part in parts]
    except ValueError:
        raise ConfigError(f"{key}=range({inner}): range takes integers, range(start, stop[, step]); list other "
                          f"values with commas, e.g. {key}=0.1,0.2") from None
    if not 1 <= len(numbers) <= 3 or (len(numbers) == 3 and numbers[2] == 0):
        raise ConfigError(f"{key}=range({inner}): give range(stop), range(start, stop) or range(start, stop, step)")
    values = [str(n) for n in range(*numbers)]
    if not values:
        raise ConfigError(f"{key}=range({inner}) is empty: stop must be beyond start")
    return values


def _sweep_values(key: str, value: str) -> list[str]:
    """The values of one override: [value] when it is not a sweep."""
    match = _RANGE.match(value.strip())
    if match:
        return _range_values(key, match.group(1))
    items = split_top_level(value)
    if len(items) == 1:
        return items
    if any(not item.strip() for item in items):
        raise ConfigError(f"sweep '{key}={value}' has an empty item: remove the stray comma (quote a value that "
                          f"contains commas: {key}='a,b')")
    repeated = sorted({item for item in items if items.count(item) > 1})
    if repeated:
        raise ConfigError(f"sweep '{key}={value}' repeats {', '.join(repeated)}: list each value once")
    return [item.strip() for item in items]


def parse(overrides: Sequence[str]) -> Sweep:
    """Split overrides into what every point shares and the swept axes; refuse ambiguous or unsweepable ones."""
    sweep = Sweep(fixed=[])
    seen: dict[str, str] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        values = _sweep_values(key, value) if sep else [value]
        if key in seen and (len(values) > 1 or seen[key] != "fixed"):
            raise ConfigError(f"{key} is given twice ('{key}={value}' and an earlier value) and one of them is a "
                              f"sweep: give the key once")
        if len(values) == 1:
            seen.setdefault(key, "fixed")
            sweep.fixed.append(item)
            continue
        if key in UNSWEEPABLE:
            raise ConfigError(f"{key} cannot be swept: every point of a sweep is its own run in the same work_dir")
        seen[key] = "swept"
        sweep.axes.append((key, values))
    for key, _ in sweep.axes:
        if any(fixed.partition("=")[0].strip() == key for fixed in sweep.fixed):
            raise ConfigError(f"{key} is given twice, once as a sweep: give the key once")
    return sweep
