"""The 8x8 handwritten digits that ship with stride, each image cut into two inputs: its top four rows and its
bottom four. A sample is a dict {"top": (1, 4, 8), "bottom": (1, 4, 8), "targets": label}: stride's classification
task hands the model every key but "targets" as keyword arguments, model(top=..., bottom=...). With `as_tuple` it is
(top, bottom, label) instead, and the model gets every element but the last, in order: model(top, bottom)."""
from __future__ import annotations

from typing import Union

import torch
from torch.utils.data import Dataset

from stride import DataSplits
from stride.datasets.builtin import digits


class Halves(Dataset):
    def __init__(self, images: Dataset, as_tuple: bool = False):
        self.images, self.as_tuple = images, as_tuple

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Union[dict, tuple]:
        image, label = self.images[index]
        if self.as_tuple:
            return image[:, :4], image[:, 4:], label
        return {"top": image[:, :4], "bottom": image[:, 4:], "targets": label}


def build(val_fraction: float = 0.1, test_fraction: float = 0.2, split_seed: int = 0,
          as_tuple: bool = False) -> DataSplits:
    """stride's dataset builder (`dataset_kwargs.dataset_name=examples.twoinput.data:build`); `input_shape` is the
    shape of one half."""
    whole = digits(val_fraction=val_fraction, test_fraction=test_fraction, split_seed=split_seed)
    train, val, test = (Halves(split, as_tuple) for split in (whole.train, whole.val, whole.test))
    return DataSplits(train, val, test, input_shape=(1, 4, 8),
                      num_outputs=whole.num_outputs, task="classification")
