"""Prices for new houses from a trained run: `python -m examples.tabular.predict WORK_DIR RUN FILE.csv`.

The rows are raw (as in the CSV files); they are normalised with the statistics stored in the run folder and the
model's outputs are turned back into thousands with them.
"""
from __future__ import annotations

import csv
import sys
from typing import Mapping, Sequence

import torch

from examples.tabular.data import load_stats, normalise
from stride import Trainer


def predict_rows(trainer: Trainer, rows: Sequence[Mapping[str, float]]) -> list[float]:
    """Prices (raw units) for raw feature rows, with a run loaded by `Trainer(work_dir=...).load_run(run)`."""
    stats = load_stats(trainer.run_dir.path)
    x = torch.tensor([[float(row[name]) for name in stats["features"]] for row in rows], dtype=torch.float32)
    outputs = trainer.predict(normalise(x, stats)).reshape(-1).cpu()
    return (outputs * stats["target_std"] + stats["target_mean"]).tolist()


def main(argv: list[str]) -> None:
    work_dir, run, path = argv
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row, value in zip(rows, predict_rows(Trainer(work_dir=work_dir).load_run(run), rows)):
        print(f"{value:.2f}", *(f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
