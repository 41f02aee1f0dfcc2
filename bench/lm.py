"""The language-model workload's model, data and loss: one copy that both sides use, so the raw loop and stride train
the same small character-level transformer on the same text with the same next-token loss.

- Text: the docstrings (`inspect.getdoc`) of a fixed list of standard-library modules and of the public functions
  and classes they define, in a fixed order: it ships with Python, so the bench needs no download (it is the same
  text for the same Python version; `python -m bench.lm` prints its size and a checksum).
- Data: `char_text` splits it into contiguous train / val / test stretches (no window crosses a split) and serves
  non-overlapping windows as dict samples `{"tokens": (T,), "targets": (T,)}` (targets are the tokens shifted by
  one); the default collate makes batches `{"tokens": (B, T), "targets": (B, T)}` of int64.
- Model: `CharTransformer`, a pre-norm causal transformer (token + learned position embeddings, `scaled_dot_product
  _attention`), returning logits (B, T, vocab).
- Loss and metrics: `next_token_loss`, `next_token_sums`, `next_token_metrics` (mean cross-entropy per token, bits
  per character, next-character accuracy). stride reaches them through `CharLMTask`, a `stride.Task` subclass (the
  plug-in path: `task_kwargs.task_name=bench.lm:CharLMTask`); the raw loop calls the same functions directly.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import math
from functools import lru_cache
from typing import Any, Mapping, Optional

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from stride.datasets import DataSplits
from stride.training.task import Task

MODULES = ("abc", "argparse", "ast", "base64", "bisect", "calendar", "collections", "contextlib", "copy", "csv",
           "dataclasses", "datetime", "decimal", "difflib", "enum", "fractions", "functools", "heapq", "hashlib",
           "inspect", "itertools", "json", "logging", "math", "operator", "os", "pathlib", "pickle", "random", "re",
           "shlex", "shutil", "statistics", "string", "struct", "subprocess", "tempfile", "textwrap", "threading",
           "typing", "unittest", "uuid", "zipfile")


@lru_cache(maxsize=None)
def corpus(modules: tuple = MODULES) -> str:
    """The docstrings of `modules` and of the public functions and classes each defines, sorted by name."""
    parts = []
    for name in modules:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for attr in sorted(vars(module)):
            if attr.startswith("_"):
                continue
            obj = getattr(module, attr)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", None) == name:
                doc = inspect.getdoc(obj)
                if doc:
                    parts.append(doc)
    return "\n\n".join(part for part in parts if part)


class CharWindows(Dataset):
    """Non-overlapping windows of `block_size` + 1 characters: {"tokens": the first T, "targets": the last T}."""

    def __init__(self, ids: torch.Tensor, block_size: int):
        count = (len(ids) - 1) // block_size
        self.windows = ids[:count * block_size + 1].unfold(0, block_size + 1, block_size) if count else \
            ids.new_zeros((0, block_size + 1))

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict:
        window = self.windows[index]
        return {"tokens": window[:-1], "targets": window[1:]}

    def __getitems__(self, indices: list[int]) -> dict:
        """A whole batch in one gather (the opt-in to batched fetching): the samples `__getitem__` gives, stacked."""
        windows = self.windows.index_select(0, torch.as_tensor(indices, dtype=torch.long))
        return {"tokens": windows[:, :-1].contiguous(), "targets": windows[:, 1:].contiguous()}


def char_text(block_size: int = 64, max_chars: Optional[int] = None, val_fraction: float = 0.05,
              test_fraction: float = 0.05) -> DataSplits:
    """The stdlib docstrings as characters: vocabulary = the sorted set of characters; train / val / test are
    consecutive stretches of the text, each cut into windows."""
    text = corpus()
    if max_chars:
        text = text[:max_chars]
    vocab = sorted(set(text))
    index = {char: i for i, char in enumerate(vocab)}
    ids = torch.tensor([index[char] for char in text], dtype=torch.long)
    n_val, n_test = int(len(ids) * val_fraction), int(len(ids) * test_fraction)
    n_train = len(ids) - n_val - n_test
    train, val, test = ids[:n_train], ids[n_train:n_train + n_val], ids[n_train + n_val:]
    return DataSplits(CharWindows(train, block_size), CharWindows(val, block_size), CharWindows(test, block_size),
                      input_shape=(block_size,), num_outputs=len(vocab), task="classification")


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(dim, dim=2)
        q, k, v = (t.view(batch, length, self.heads, dim // self.heads).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                  dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, dim))
        return x + self.mlp(self.norm2(x))


class CharTransformer(nn.Module):
    """A small causal transformer over characters: tokens (B, T) -> logits (B, T, vocab)."""

    def __init__(self, input_shape: tuple, num_outputs: int, dim: int = 32, layers: int = 2, heads: int = 4,
                 dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(num_outputs, dim)
        self.position = nn.Embedding(int(input_shape[0]), dim)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_outputs, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per token (in fp32 whatever the autocast dtype)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def next_token_sums(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """One batch's sums (float64): cross-entropy, correct next characters, tokens."""
    logits, targets = logits.float().flatten(0, 1), targets.flatten()
    return {"loss_sum": F.cross_entropy(logits, targets, reduction="sum").double(),
            "correct": (logits.argmax(dim=1) == targets).sum().double(),
            "count": torch.tensor(float(targets.numel()), dtype=torch.float64, device=targets.device)}


def next_token_metrics(totals: Mapping[str, torch.Tensor]) -> dict[str, float]:
    count = totals["count"].clamp(min=1)
    loss = float(totals["loss_sum"] / count)
    return {"loss": loss, "bpc": loss / math.log(2), "accuracy": float(totals["correct"] / count)}


class CharLMTask(Task):
    """stride's side: dict batches through the Task protocol (`task_kwargs.task_name=bench.lm:CharLMTask`)."""

    best_metric = "val_loss"

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return next_token_loss(model(batch["tokens"]), batch["targets"])

    def eval_sums(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        return next_token_sums(model(batch["tokens"]), batch["targets"])

    def compute(self, totals: Mapping[str, torch.Tensor]) -> dict[str, float]:
        return next_token_metrics(totals)

    def predict(self, model: nn.Module, batch: Any) -> Any:
        return model(batch["tokens"] if isinstance(batch, Mapping) else batch)

    def higher_is_better(self, metric: str) -> Optional[bool]:
        return metric.rpartition("_")[2] == "accuracy"


if __name__ == "__main__":
    text = corpus()
    splits = char_text()
    print(f"{len(text):,} characters, {splits.num_outputs} distinct, sha256 "
          f"{hashlib.sha256(text.encode()).hexdigest()[:16]}; windows train {len(splits.train)} val "
          f"{len(splits.val)} test {len(splits.test)}")
