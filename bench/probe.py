"""The default dataset with a stopwatch: `dataset_name=bench.probe:digits` is stride's digits, unchanged, whose
training split writes the wall-clock time of its first batch fetch (the start of the first training step) to the file
named by $STRIDE_BENCH_FIRST_STEP. Both sides load it the same way: stride by import path, the raw loop directly.
"""
from __future__ import annotations

import os
import time
from typing import Any

from torch.utils.data import Dataset

from stride.datasets import DataSplits
from stride.datasets.builtin import digits as _digits

ENV = "STRIDE_BENCH_FIRST_STEP"


class FirstBatchProbe(Dataset):
    def __init__(self, inner: Dataset, path: str):
        self.inner, self.path = inner, path

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> Any:
        self._stamp()  # a loader that fetches sample by sample
        return self.inner[index]

    def __getitems__(self, indices: list[int]) -> list:
        self._stamp()  # a loader that fetches whole batches
        return self.inner.__getitems__(indices)

    def _stamp(self) -> None:
        if self.path:
            with open(self.path, "w") as handle:
                handle.write(f"{time.time():.6f}\n")
            self.path = ""


def digits(**kwargs: Any) -> DataSplits:
    splits = _digits(**kwargs)
    path = os.environ.get(ENV, "")
    if path:
        splits.train = FirstBatchProbe(splits.train, path)
    return splits
