"""What a dataset builder returns: train/val/test splits plus what the model needs to know about the data."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.data import Dataset, Subset


@dataclass
class DataSplits:
    """A split is None when its builder was asked for other splits only (a builder that takes `splits`)."""

    train: Optional[Dataset]
    val: Optional[Dataset]
    test: Optional[Dataset]
    input_shape: tuple
    """Shape of one input sample; passed to models that take `input_shape`."""
    num_outputs: Optional[int]
    """Classes (classification) or targets (regression); passed to models that take `num_outputs`."""
    task: str = "classification"
    """The task used when task_kwargs.task_name is auto: classification (cross-entropy, accuracy) or regression
    (mean squared error)."""


def split_dataset(dataset: Dataset, val_fraction: float, test_fraction: float, split_seed: int
                  ) -> tuple[Subset, Subset, Subset]:
    """A seeded random split, independent of the training seed so seed sweeps share the same splits."""
    n = len(dataset)
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed)).tolist()
    test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    return Subset(dataset, train), Subset(dataset, val), Subset(dataset, test)
