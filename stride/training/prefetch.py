"""Training batches on the training device. On CUDA each batch is copied on a side stream while the kernels of the
step before it still run; on the CPU the loader's batches are used as they are (no thread, no copy, no extra call).

Batches are taken from the loader in the order and at the moments the steps ask for them, never ahead: a dataset's
own random draws in this process, and the RNG state a checkpoint records, stay those of a run without the copy
stream, and the loop's batch counter is the number of batches training consumed.
"""
from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator, Mapping

import torch

from stride.training.data import to_device


def device_batches(loader: Iterable, device: torch.device) -> Iterable:
    """`loader`'s batches, on `device`."""
    if device.type == "cpu":
        return loader  # DataLoader batches are CPU tensors already
    if device.type == "cuda":
        return _copied_on_side_stream(loader, device)
    return map(to_device, loader, itertools.repeat(device))


def _copied_on_side_stream(loader: Iterable, device: torch.device) -> Iterator:
    """The copy of batch k+1 is issued once step k's kernels are queued (the host runs ahead of the GPU), on its own
    stream, so it overlaps them instead of queueing behind them; pinned host batches (pin_memory) make it async."""
    copy_stream = torch.cuda.Stream(device)
    step_stream = torch.cuda.current_stream(device)
    for batch in loader:
        with torch.cuda.stream(copy_stream):
            batch = to_device(batch, device)
        step_stream.wait_stream(copy_stream)  # the step's kernels start once the copy is done; the host never waits
        for tensor in tensors_in(batch):
            # Allocated on the copy stream, used on the step stream: without this the allocator could hand the
            # memory to the next copy while the step still reads it.
            tensor.record_stream(step_stream)
        yield batch


def tensors_in(batch: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nested batch of tuples, lists and mappings."""
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for value in batch.values():
            yield from tensors_in(value)
    elif isinstance(batch, (list, tuple)):
        for value in batch:
            yield from tensors_in(value)
