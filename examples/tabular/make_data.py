"""Writes data/train.csv, data/val.csv and data/test.csv (committed): `python -m examples.tabular.make_data`.

House prices in thousands from five features on very different scales, through a nonlinear function plus noise.
Standard library only (`random` with a fixed seed), so the files are the same wherever this runs.
"""
from __future__ import annotations

import csv
import math
import random
from pathlib import Path

FEATURES = ("age_years", "income", "rooms", "distance_km", "quality")
TARGET = "price"
SIZES = {"train": 400, "val": 100, "test": 100}
DATA_DIR = Path(__file__).resolve().parent / "data"


def price(row: dict) -> float:
    """The noiseless price (thousands) of one house."""
    return (80 + 12 * row["rooms"] ** 1.5 * (0.5 + row["quality"]) + 25 * math.sin(row["age_years"] / 12)
            + 0.0015 * row["income"] - 9 * math.sqrt(row["distance_km"]))


def sample(count: int, seed: int) -> list[dict]:
    """`count` houses with their features and a noisy price."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        row = {"age_years": round(rng.uniform(0, 80), 1), "income": round(rng.lognormvariate(10.8, 0.4), 0),
               "rooms": rng.randint(1, 6), "distance_km": round(rng.uniform(0, 30), 2),
               "quality": round(rng.random(), 3)}
        row[TARGET] = round(price(row) + rng.gauss(0, 4), 2)
        rows.append(row)
    return rows


def write(folder: Path = DATA_DIR) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for seed, (split, count) in enumerate(SIZES.items()):
        with open(folder / f"{split}.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=[*FEATURES, TARGET])
            writer.writeheader()
            writer.writerows(sample(count, seed))


if __name__ == "__main__":
    write()
    print(f"wrote {', '.join(f'{DATA_DIR / s}.csv ({n} rows)' for s, n in SIZES.items())}")
