"""Next-character prediction as a stride.Task: cross-entropy over every position of every window.

Validation and test metrics come from sums (total negative log-likelihood and the number of predicted characters),
which stride adds over batches and ranks before `compute`: perplexity is exp(total NLL / total characters), never an
average of per-rank perplexities.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from stride import Task


class NextCharTask(Task):
    """Batches are {"tokens": (B, T), "targets": (B, T)}; the model maps tokens to (B, T, vocabulary) logits."""

    best_metric = "val_loss"

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def _logits(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(batch["tokens"])
        return logits.float().flatten(0, 1), batch["targets"].flatten()

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        logits, targets = self._logits(model, batch)
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)

    def eval_sums(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        logits, targets = self._logits(model, batch)
        nll = F.cross_entropy(logits, targets, reduction="sum")
        return {"nll": nll.double(), "chars": torch.tensor(float(targets.numel()), dtype=torch.float64,
                                                            device=targets.device)}

    def compute(self, totals: Mapping[str, torch.Tensor]) -> dict[str, float]:
        loss = float(totals["nll"] / totals["chars"].clamp(min=1))
        return {"loss": loss, "perplexity": math.exp(loss), "bits_per_char": loss / math.log(2)}

    def predict(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return model(batch["tokens"] if isinstance(batch, Mapping) else batch)

    def higher_is_better(self, metric: str) -> Optional[bool]:
        return False  # loss, perplexity and bits per character all go down

    def check(self, model: nn.Module, batch: Any) -> None:
        logits = model(batch["tokens"])
        if logits.dim() != 3 or logits.shape[:2] != batch["targets"].shape:
            raise ValueError(f"NextCharTask: the model returned {tuple(logits.shape)} for tokens "
                              f"{tuple(batch['tokens'].shape)}; it must return (batch, length, vocabulary) logits")
        super().check(model, batch)
