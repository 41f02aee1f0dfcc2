"""Two encoders, one per input, whose features are concatenated for a shared classification head."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


def encoder(features: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(features, hidden), nn.ReLU())


class TwoHalvesNet(nn.Module):
    """`input_shape` is one half's shape and `num_outputs` the classes: stride fills both in from the data."""

    def __init__(self, input_shape: Sequence[int], num_outputs: int, hidden: int = 32):
        super().__init__()
        features = math.prod(input_shape)
        self.top, self.bottom = encoder(features, hidden), encoder(features, hidden)
        self.head = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_outputs))

    def forward(self, top: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.top(top), self.bottom(bottom)], dim=1))
