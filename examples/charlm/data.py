"""The text: the docstrings of a fixed list of standard-library modules (every Python ships them, nothing to
download), split into contiguous train / val / test stretches and cut into windows of `context` + 1 characters.

The vocabulary is built from the train stretch and kept in the run folder (`vocab.json`), so a resumed run, a
`load_run` and text generation all use the very characters the model was trained on.
"""
from __future__ import annotations

import importlib
import inspect
import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.utils.data import Dataset

from stride import DataSplits

MODULES = ("argparse", "collections", "csv", "functools", "heapq", "itertools", "json", "logging", "re", "statistics",
           "string", "textwrap")
VOCAB_FILE = "vocab.json"
UNKNOWN = "\N{REPLACEMENT CHARACTER}"
"""Id 0: any character the train stretch never showed (val and test may hold a few)."""


def corpus(modules: Sequence[str] = MODULES) -> str:
    """Each module's docstring, then those of its public functions and classes, in name order."""
    parts = []
    for name in modules:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if not attr.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj)) \
                    and getattr(obj, "__module__", None) == name:
                parts.append(f"{attr}: {inspect.getdoc(obj) or ''}")
    text = "\n\n".join(part for part in parts if part.strip())
    if len(text) < 10_000:
        raise ValueError(f"the docstrings of {', '.join(modules)} hold only {len(text)} characters: is Python "
                         f"running with -OO (docstrings stripped)?")
    return text


def split_text(text: str, val_fraction: float, test_fraction: float) -> dict[str, str]:
    """Contiguous stretches (a random split of overlapping windows would leak val text into train)."""
    n_val, n_test = int(len(text) * val_fraction), int(len(text) * test_fraction)
    n_train = len(text) - n_val - n_test
    return {"train": text[:n_train], "val": text[n_train:n_train + n_val], "test": text[n_train + n_val:]}


def unigram_entropy(text: str) -> float:
    """Nats per character of the best model that ignores context: the bar a language model must clear."""
    counts = Counter(text)
    return -sum(c / len(text) * math.log(c / len(text)) for c in counts.values())


class Vocabulary:
    """Characters <-> ids; id 0 is UNKNOWN."""

    def __init__(self, chars: Sequence[str]):
        self.chars = [UNKNOWN, *chars]
        self.ids = {char: index for index, char in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> "Vocabulary":
        return cls(sorted(set(text) - {UNKNOWN}))

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.ids.get(char, 0) for char in text], dtype=torch.long)

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def save(self, path: Path, **extra: object) -> None:
        """Atomically (a temporary name, fsync, rename): a rank or a resume never reads half a file."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as handle:
            json.dump({"chars": self.chars[1:], **extra}, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "Vocabulary":
        return cls(json.loads(Path(path).read_text())["chars"])


def load_vocabulary(run_dir: Path) -> Vocabulary:
    """The vocabulary a run was trained with (for generation after `Trainer.load_run`)."""
    path = Path(run_dir) / VOCAB_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: this run folder was not made by examples.charlm.data:build")
    return Vocabulary.load(path)


class Windows(Dataset):
    """Non-overlapping windows: sample i is {"tokens": ids[s:s+T], "targets": ids[s+1:s+T+1]}, s = i*T."""

    def __init__(self, ids: torch.Tensor, context: int):
        self.ids, self.context = ids, context
        self.count = max(0, (len(ids) - 1) // context)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = index * self.context
        chunk = self.ids[start:start + self.context + 1]
        return {"tokens": chunk[:-1], "targets": chunk[1:]}


def build(context: int = 64, modules: Optional[list] = None, val_fraction: float = 0.1, test_fraction: float = 0.1,
          run_dir: Optional[Path] = None, splits: Sequence[str] = ("train", "val", "test")) -> DataSplits:
    """stride's dataset builder (`dataset_kwargs.dataset_name=examples.charlm.data:build`).

    `run_dir` is the run folder (None in the check before a run exists: compute, do not save); `splits` the splits
    wanted (load_run(..., splits=("test",)) builds only those).
    """
    text = split_text(corpus(tuple(modules or MODULES)), val_fraction, test_fraction)
    path = Path(run_dir) / VOCAB_FILE if run_dir is not None else None
    if path is not None and path.is_file():
        vocab = Vocabulary.load(path)  # a resumed or reloaded run keeps its own characters
    else:
        vocab = Vocabulary.from_text(text["train"])
        if path is not None:
            vocab.save(path, unigram_entropy_nats=unigram_entropy(text["train"]), modules=list(modules or MODULES),
                       context=context, train_chars=len(text["train"]))
    datasets = {split: Windows(vocab.encode(text[split]), context) if split in splits else None
                for split in ("train", "val", "test")}
    return DataSplits(datasets["train"], datasets["val"], datasets["test"], input_shape=(context,),
                      num_outputs=len(vocab), task="language_model")
