"""Built-in datasets: real data shipped inside an installed package (no downloads), and a synthetic set."""
from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from stride.datasets.base import DataSplits, split_dataset
from stride.errors import ConfigError
from stride.registry import register_dataset


def _sklearn_data_file(name: str) -> Path:
    """Locate a data file that scikit-learn ships, without importing scikit-learn (which takes ~1 s)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise ConfigError("the built-in dataset needs scikit-learn, which ships its data: pip install scikit-learn")
    return Path(spec.origin).parent / "datasets" / "data" / name


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0 <= val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(f"dataset_kwargs val_fraction={val_fraction} and test_fraction={test_fraction} must be "
                          f"in [0, 1) with a sum below 1")


@register_dataset("digits")
def digits(val_fraction: float = 0.1, test_fraction: float = 0.2, split_seed: int = 0) -> DataSplits:
    """The UCI 8x8 handwritten digits (1,797 images, 10 classes), as shipped by scikit-learn."""
    _check_fractions(val_fraction, test_fraction)
    with gzip.open(_sklearn_data_file("digits.csv.gz"), "rt") as handle:
        rows = [[float(v) for v in line.split(",")] for line in handle if line.strip()]
    table = torch.tensor(rows)
    images = (table[:, :-1] / 16.0).reshape(-1, 1, 8, 8).contiguous()
    labels = table[:, -1].long()
    train, val, test = split_dataset(TensorDataset(images, labels), val_fraction, test_fraction, split_seed)
    return DataSplits(train, val, test, input_shape=(1, 8, 8), num_outputs=10, task="classification")


@register_dataset("synthetic_regression")
def synthetic_regression(num_samples: int = 4096, num_features: int = 16, num_targets: int = 1,
                         noise: float = 0.05, data_seed: int = 0, val_fraction: float = 0.1,
                         test_fraction: float = 0.2, split_seed: int = 0) -> DataSplits:
    """y = sin(X W1) W2 + noise: a smooth nonlinear target, generated in memory from `data_seed`."""
    _check_fractions(val_fraction, test_fraction)
    generator = torch.Generator().manual_seed(data_seed)
    x = torch.randn(num_samples, num_features, generator=generator)
    w1 = torch.randn(num_features, 32, generator=generator) / num_features ** 0.5
    w2 = torch.randn(32, num_targets, generator=generator) / 32 ** 0.5
    y = torch.sin(x @ w1) @ w2 + noise * torch.randn(num_samples, num_targets, generator=generator)
    train, val, test = split_dataset(TensorDataset(x, y), val_fraction, test_fraction, split_seed)
    return DataSplits(train, val, test, input_shape=(num_features,), num_outputs=num_targets, task="regression")
