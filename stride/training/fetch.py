"""Whole batches in one call, for datasets that can give them: a TensorDataset (or Subsets of one) by one gather per
tensor, a dataset with `__getitems__` by one call. Each batch holds the samples, in the order, that the per-sample
DataLoader path would collate; every other dataset keeps that path (`batch_fetch` returns None)."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch.utils.data import Dataset, Subset, TensorDataset
from torch.utils.data._utils.collate import default_collate, default_convert

# Subset indices of these types index one row each (a uint8 or bool tensor would be read as a mask instead).
_INTEGER_TYPES = (torch.int64, torch.int32, torch.int16, torch.int8)


class BatchFetch(Dataset):
    """`fetch[indices]` is the batch that `default_collate([dataset[i] for i in indices])` would be.

    `tensors` are the rows of the TensorDataset under the Subsets, `rows` maps the dataset's positions to them (None:
    the same positions); without `tensors` the dataset's own `__getitems__` fetches.
    """

    def __init__(self, dataset: Dataset, tensors: Optional[Sequence[torch.Tensor]] = None,
                 rows: Optional[torch.Tensor] = None):
        self.dataset, self.tensors, self.rows = dataset, tensors, rows

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: Union[list[int], torch.Tensor]) -> Any:
        """`indices`: a list of ints (torch's BatchSampler) or an index tensor (stride's IndexBatches)."""
        if self.tensors is None:
            items = self.dataset.__getitems__(indices.tolist() if torch.is_tensor(indices) else indices)
            # torch's contract for __getitems__ is a list of samples, which the DataLoader collates; anything else is
            # the batch itself (numpy arrays in it become tensors, as in a DataLoader without auto-batching).
            return default_collate(items) if isinstance(items, list) else default_convert(items)
        rows = indices if torch.is_tensor(indices) else torch.tensor(indices, dtype=torch.long)
        if self.rows is not None:
            rows = self.rows.index_select(0, rows)
        # A list, as default_collate makes of tuple samples; a gather copies the very rows stack would.
        return [tensor.index_select(0, rows) for tensor in self.tensors]


def as_is(batch: Any) -> Any:
    """The collate step of a batch fetched whole: nothing left to do (collating it again would stack the batch)."""
    return batch


def batch_fetch(dataset: Dataset) -> Optional[BatchFetch]:
    """A BatchFetch for `dataset` when it can give a batch in one call, else None (the per-sample path).

    Only exact TensorDataset and Subset classes are gathered directly: a subclass that changes `__getitem__` (an
    augmentation, say) must keep being called, so it takes the path its own methods give.
    """
    base, rows = dataset, None
    while _is_plain(base, Subset):
        positions = _positions(base.indices, len(base.dataset))
        if positions is None:
            return None
        rows = positions if rows is None else positions.index_select(0, rows)
        base = base.dataset
    if _is_plain(base, TensorDataset) and all(t.device.type == "cpu" for t in base.tensors):
        return BatchFetch(dataset, base.tensors, rows)
    if callable(getattr(base, "__getitems__", None)):
        return BatchFetch(dataset)  # the Subsets above it map the indices on the way down (Subset.__getitems__)
    return None


def _is_plain(dataset: Dataset, kind: type) -> bool:
    cls = type(dataset)
    return (isinstance(dataset, kind) and cls.__getitem__ is kind.__getitem__
            and getattr(cls, "__getitems__", None) is getattr(kind, "__getitems__", None))


def _positions(indices: Sequence[int], length: int) -> Optional[torch.Tensor]:
    """A Subset's indices as one index tensor, negative ones counted from the end as `dataset[i]` counts them; None
    when one is not an integer or out of range, so that the per-sample path raises its usual error."""
    values = indices if torch.is_tensor(indices) else list(indices)
    if not len(values):
        return torch.zeros(0, dtype=torch.long)
    try:
        positions = torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        return None
    if positions.dim() != 1 or positions.dtype not in _INTEGER_TYPES:
        return None
    positions = positions.long().cpu()
    if not bool(((positions >= -length) & (positions < length)).all()):
        return None
    return torch.where(positions < 0, positions + length, positions)
