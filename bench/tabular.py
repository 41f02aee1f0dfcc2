"""A classification table for the overhead-sensitive MLP workload: `dataset_name=bench.tabular:blobs`. Ten Gaussian
clusters in 64 dimensions, generated in memory from a seed (no download), split like stride's built-ins: a Subset of
one TensorDataset per split, so both stride and the careful loop can gather whole batches."""
from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from stride.datasets import DataSplits, split_dataset


def blobs(num_samples: int = 65536, num_features: int = 64, num_classes: int = 10, spread: float = 2.0,
          data_seed: int = 0, val_fraction: float = 0.05, test_fraction: float = 0.05,
          split_seed: int = 0) -> DataSplits:
    """Class k's samples are centre_k + N(0, spread^2): overlapping enough that the MLP keeps learning."""
    generator = torch.Generator().manual_seed(data_seed)
    centres = torch.randn(num_classes, num_features, generator=generator)
    y = torch.randint(0, num_classes, (num_samples,), generator=generator)
    x = centres[y] + spread * torch.randn(num_samples, num_features, generator=generator)
    train, val, test = split_dataset(TensorDataset(x, y), val_fraction, test_fraction, split_seed)
    return DataSplits(train, val, test, input_shape=(num_features,), num_outputs=num_classes, task="classification")
