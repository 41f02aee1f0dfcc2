"""CSV files listing the train / val / test samples (one row each), normalised with statistics of the train split.

The statistics (mean and standard deviation of every feature and of the target) are written into the run folder
(`normalization.json`) the first time the run builds its data, and read back from there ever after: a resumed run, a
`Trainer.load_run` and `predict.py` all use the numbers the model was trained with, even if the CSV files change.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.utils.data import TensorDataset

from stride import DataSplits

DATA_DIR = Path(__file__).resolve().parent / "data"
STATS_FILE = "normalization.json"


def read_csv(path: Path, target: str) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(feature names, features (N, F), targets (N,)) in raw units."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{path} has no rows")
    if target not in rows[0]:
        raise ValueError(f"{path} has no column '{target}'; its columns: {', '.join(rows[0])}")
    features = [name for name in rows[0] if name != target]
    x = torch.tensor([[float(row[name]) for name in features] for row in rows], dtype=torch.float32)
    y = torch.tensor([float(row[target]) for row in rows], dtype=torch.float32)
    return features, x, y


def compute_stats(features: list[str], x: torch.Tensor, y: torch.Tensor, target: str) -> dict:
    return {"features": features, "mean": x.mean(0).tolist(), "std": x.std(0).clamp(min=1e-8).tolist(),
            "target": target, "target_mean": float(y.mean()), "target_std": max(float(y.std()), 1e-8)}


def save_stats(run_dir: Path, stats: dict) -> None:
    """Atomically: a temporary name beside the file, fsync, then rename; readers see all of it or nothing."""
    path = Path(run_dir) / STATS_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as handle:
        json.dump(stats, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load_stats(run_dir: Path) -> dict:
    path = Path(run_dir) / STATS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the run's normalisation statistics are gone, so its inputs and "
                                f"predictions cannot be scaled as in training")
    return json.loads(path.read_text())


def normalise(x: torch.Tensor, stats: dict) -> torch.Tensor:
    return (x - torch.tensor(stats["mean"])) / torch.tensor(stats["std"])


def build(data_dir: Optional[str] = None, target: str = "price", squeeze_target: bool = False,
          run_dir: Optional[Path] = None, splits: Sequence[str] = ("train", "val", "test")) -> DataSplits:
    """stride's dataset builder (`dataset_kwargs.dataset_name=examples.tabular.data:build`).

    Targets are (N, 1), the shape of a regression model's output; `squeeze_target` gives (N,) instead. `run_dir` is
    the run folder (None in the check before a run exists: compute, save nothing); `splits` the splits wanted.
    """
    folder = Path(data_dir) if data_dir else DATA_DIR
    stored = Path(run_dir) / STATS_FILE if run_dir is not None else None
    tables = {split: read_csv(folder / f"{split}.csv", target) for split in splits}
    if stored is not None and stored.is_file():
        stats = load_stats(run_dir)
    elif "train" in tables:
        stats = compute_stats(*tables["train"], target)
        if run_dir is not None:
            save_stats(run_dir, stats)
    else:
        raise FileNotFoundError(f"{stored or STATS_FILE} is missing and the train split was not asked for: the "
                                f"statistics come from the train split, so build it too (load_run without splits)")
    datasets = {}
    for split, (features, x, y) in tables.items():
        if features != stats["features"] or target != stats["target"]:
            raise ValueError(f"{folder / split}.csv has features {features} and target '{target}', but the run's "
                             f"statistics were computed for {stats['features']} and '{stats['target']}'")
        y = (y - stats["target_mean"]) / stats["target_std"]
        datasets[split] = TensorDataset(normalise(x, stats), y if squeeze_target else y[:, None])
    return DataSplits(datasets.get("train"), datasets.get("val"), datasets.get("test"),
                      input_shape=(len(stats["features"]),), num_outputs=1, task="regression")
