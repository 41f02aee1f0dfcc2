"""Compare runs by their resolved configs: the settings that differ, as dotted keys (`training_kwargs.lr`).

Pure and light (the standard library and stride.config, never torch), so `stride diff` answers at once and
`stride plot` can label each curve by what makes its run different from the others.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from stride.config import flatten

# Metric names that mean "lower is better"; any other metric (accuracy, f1, auc, r2, ...) is better higher.
LOWER_IS_BETTER = ("loss", "error", "err", "mse", "mae", "perplexity", "ppl")


def higher_is_better(metric: str) -> bool:
    """The one rule for which way a metric improves: the best checkpoint and `stride status --sort` both use it."""
    return not any(word in metric.lower() for word in LOWER_IS_BETTER)


# Where a run lives, not how it trains: any two runs differ there, so a diff that showed them would never be empty.
IDENTITY_KEYS = frozenset({"work_dir", "run"})
ABSENT = "(not set)"


@dataclass(frozen=True)
class Change:
    """One setting that differs; `before`/`after` is ABSENT where that run's config lacks the key."""

    key: str
    before: str
    after: str

    def __str__(self) -> str:
        return f"{self.key}: {self.before} -> {self.after}"


def settings(config: Mapping) -> dict[str, Any]:
    """A resolved config as {dotted key: value}, without the identity keys."""
    return {key: value for key, value in flatten(config).items() if key not in IDENTITY_KEYS}


def format_value(value: Any) -> str:
    """A value as it would be typed in a `key=value` override: 0.001, null, true, ResNet, [256, 128]."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def _same(a: Any, b: Any) -> bool:
    # Through JSON, so that 1 and True, or 1 and 1.0, count as different settings, as they are in config.json.
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def diff_configs(before: Mapping, after: Mapping) -> list[Change]:
    """Every setting that differs between two configs, in config order; keys on one side only included."""
    old, new = settings(before), settings(after)
    keys = list(old) + [key for key in new if key not in old]
    return [Change(key, format_value(old[key]) if key in old else ABSENT,
                   format_value(new[key]) if key in new else ABSENT)
            for key in keys if key not in old or key not in new or not _same(old[key], new[key])]


def differing_keys(configs: Sequence[Mapping]) -> list[str]:
    """The dotted keys whose value (or presence) is not the same in every one of `configs`, in config order."""
    flat = [settings(config) for config in configs]
    keys: dict[str, None] = {}
    for one in flat:
        keys.update(dict.fromkeys(one))
    missing = object()
    return [key for key in keys
            if any(not _same(one.get(key, missing), flat[0].get(key, missing)) for one in flat[1:])]


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """{dotted key: its last part} (`training_kwargs.lr` -> `lr`), keeping the full key where last parts clash."""
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return {key: name if last.count(name) == 1 else key for key, name in zip(keys, last)}


# Where and how a run was placed, logged and checkpointed, not what it trained: a curve is labelled by these only
# when nothing else differs (two runs on 1 and 4 nodes).
PLACEMENT_PREFIXES = (
    "slurm.", "distributed_kwargs.", "container.", "device", "provenance.", "load_data_kwargs.num_workers",
    "load_data_kwargs.pin_memory", "load_data_kwargs.persistent_workers", "load_data_kwargs.worker_start",
    "load_data_kwargs.eval_batch_size",
    "training_kwargs.log_every_steps", "training_kwargs.checkpoint_every_steps",
    "training_kwargs.checkpoint_every_minutes", "training_kwargs.keep_last_checkpoints",
    "training_kwargs.stop_check_seconds", "training_kwargs.async_checkpoint",
)
LABEL_CHARS = 40


def run_labels(configs: Sequence[Mapping], names: Sequence[str], first: Sequence[str] = (),
               max_chars: int = LABEL_CHARS) -> list[str]:
    """One short label per run from the settings that differ between them (`lr=0.001 seed=1`): training settings
    only, unless placement is all that differs; the keys in `first` (a sweep's) lead; at most `max_chars`.

    A run whose label would be empty or shared with another (identical settings) is named by its run name too.
    """
    differing = differing_keys(configs)
    keys = [key for key in differing if not key.startswith(PLACEMENT_PREFIXES)] or differing
    keys = [key for key in first if key in keys] + [key for key in keys if key not in first]
    short = short_names(keys)
    labels = []
    for config in configs:
        flat = settings(config)
        parts = [f"{short[key]}={format_value(flat[key]) if key in flat else ABSENT}" for key in keys]
        labels.append(_shortened(parts, max_chars))
    return [label if label and labels.count(label) == 1 else f"run {name}" + (f": {label}" if label else "")
            for label, name in zip(labels, names)]


def _shortened(parts: Sequence[str], max_chars: int) -> str:
    """As many whole `key=value` parts as fit in max_chars, then `…` (a long value is cut itself)."""
    out = ""
    for part in parts:
        joined = f"{out} {part}" if out else part
        if len(joined) > max_chars:
            return (out + " …") if out else part[:max_chars - 1] + "…"
        out = joined
    return out


def format_diff(changes: Sequence[Change], name_a: str, name_b: str) -> str:
    """`key: A -> B` per differing setting, or one line saying the configs are identical."""
    if not changes:
        return f"identical configs: {name_a} and {name_b}"
    return "\n".join(str(change) for change in changes)
