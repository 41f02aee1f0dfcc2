"""Pool the throughput pairs of several `bench/run.py --json` files per code version, and compare versions.

    python -m bench.compare new=/tmp/new-*.json previous=/tmp/old-*.json [--baseline previous] [--markdown]

Each NAME=GLOB names one code version (e.g. this tree, and `PYTHONPATH=../old python ../old/bench/run.py ...` for
another); its files' pairs are pooled per workload. Per workload and version it prints the pairwise stride/raw ratios
of training steps/s, of the fast step (10th percentile of step durations, as a speed) and of CPU time per step (as a
speed: the work done, which other processes on the machine move less than wall time), each as median [min–max] with
a 95% bootstrap interval of the median; against --baseline, the ratio of the two medians with its bootstrap interval.
"""
from __future__ import annotations

import argparse
import glob
import json
import random
import statistics
import sys
from typing import Optional, Sequence

MEASURES = {  # name: (label, stride/raw as a speed for one pair)
    "steps": ("steps/s", lambda p: p["stride"]["steps_per_s"] / p["raw"]["steps_per_s"]),
    "fast": ("fast step", lambda p: p["raw"]["p10_step_ms"] / p["stride"]["p10_step_ms"]),
    "cpu": ("CPU time/step", lambda p: p["raw"]["cpu_ms_per_step"] / p["stride"]["cpu_ms_per_step"]),
}
ORDER = ("mlp", "cnn", "lm")


def load(pattern: str) -> tuple[dict[str, list[dict]], list[str]]:
    files = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
    pooled: dict[str, list[dict]] = {}
    for path in files:
        with open(path) as handle:
            results = json.load(handle)
        for workload, pairs in results.get("throughput", {}).items():
            pooled.setdefault(workload, []).extend(pairs)
    return pooled, files


def bootstrap_median(values: Sequence[float], rounds: int = 4000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(rounds))
    return meds[int(0.025 * rounds)], meds[int(0.975 * rounds) - 1]


def bootstrap_ratio(a: Sequence[float], b: Sequence[float], rounds: int = 4000, seed: int = 1) -> tuple[float, float]:
    """95% interval of median(a) / median(b), the two samples resampled independently."""
    rng = random.Random(seed)
    ratios = sorted(statistics.median(rng.choices(a, k=len(a))) / statistics.median(rng.choices(b, k=len(b)))
                    for _ in range(rounds))
    return ratios[int(0.025 * rounds)], ratios[int(0.975 * rounds) - 1]


def cell(values: Sequence[float]) -> str:
    low, high = bootstrap_median(values)
    return (f"{statistics.median(values):.3f} [{min(values):.3f}–{max(values):.3f}] "
            f"(95% CI of median {low:.3f}–{high:.3f})")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.splitlines()[0])
    parser.add_argument("versions", nargs="+", help="NAME=GLOB of bench/run.py --json files")
    parser.add_argument("--baseline", default=None, help="the version the others are compared with")
    args = parser.parse_args(argv)
    data: dict[str, dict[str, list[dict]]] = {}
    for spec in args.versions:
        name, _, pattern = spec.partition("=")
        data[name], files = load(pattern)
        print(f"{name}: {len(files)} file(s)", file=sys.stderr)
    print("| workload | code | pairs | other processes' load | stride/raw steps/s | stride/raw fast step (speed) "
          "| stride/raw CPU time per step (speed) |")
    print("|---|---|---|---|---|---|---|")
    for workload in [w for w in ORDER if any(w in d for d in data.values())]:
        for name, pooled in data.items():
            pairs = pooled.get(workload)
            if not pairs:
                continue
            load_cell = f"{statistics.median(p['foreign_load'] for p in pairs):.0%}"
            cells = [cell([f(p) for p in pairs]) for _, f in MEASURES.values()]
            print(f"| {workload} | {name} | {len(pairs)} | {load_cell} | " + " | ".join(cells) + " |")
    if args.baseline:
        base = data[args.baseline]
        print()
        print(f"| workload | code vs {args.baseline} | steps/s ratio of medians | fast step | CPU time per step |")
        print("|---|---|---|---|---|")
        for workload in [w for w in ORDER if w in base]:
            for name, pooled in data.items():
                if name == args.baseline or workload not in pooled:
                    continue
                cells = []
                for _, f in MEASURES.values():
                    mine, theirs = [f(p) for p in pooled[workload]], [f(p) for p in base[workload]]
                    low, high = bootstrap_ratio(mine, theirs)
                    cells.append(f"{statistics.median(mine) / statistics.median(theirs):.3f} "
                                 f"(95% CI {low:.3f}–{high:.3f})")
                print(f"| {workload} | {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
