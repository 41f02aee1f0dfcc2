"""Datasets into loaders: building the splits (with the run folder and the splits wanted, for builders that take
them), samplers that shard and resume mid-epoch, loaders that fetch whole batches where the dataset can (`fetch`),
and moving nested batches to the device."""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler

from stride import registry
from stride.datasets import DataSplits
from stride.errors import ConfigError
from stride.training.fetch import as_is, batch_fetch
from stride.training.rng import seed_worker

SPLITS = ("train", "val", "test")
# Filled in by stride for the builders and models that name them; never taken from the config.
DATASET_PROVIDED = ("run_dir", "splits")
MODEL_PROVIDED = ("input_shape", "num_outputs")


def names_parameter(target: Any, name: str) -> bool:
    """Whether `target` has a parameter called `name` (a `**kwargs` catch-all does not count: it would pass an
    injected value on to a parent that never asked for it)."""
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False
    return name in params and params[name].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                    inspect.Parameter.KEYWORD_ONLY)


def build_splits(config: Mapping, run_dir: Optional[Path] = None,
                 splits: Optional[Sequence[str]] = None) -> DataSplits:
    """The dataset builder's DataSplits. Builders that take `run_dir` get the run folder (statistics such as
    normalisation live there and are restored by load_run); builders that take `splits` build only those."""
    kwargs = dict(config["dataset_kwargs"])
    name = kwargs.pop("dataset_name")
    builder = registry.resolve("dataset", name)
    if names_parameter(builder, "run_dir"):
        kwargs["run_dir"] = Path(run_dir) if run_dir is not None else None
    if names_parameter(builder, "splits"):
        kwargs["splits"] = tuple(splits or SPLITS)
    result = registry.call_plugin("dataset", name, builder, kwargs,
                                  shown={k: v for k, v in kwargs.items() if k not in DATASET_PROVIDED})
    if not isinstance(result, DataSplits):
        raise ConfigError(f"dataset '{name}' returned {type(result).__name__}; a dataset builder must return "
                          f"stride.DataSplits(train, val, test, input_shape, num_outputs, task)")
    wanted = tuple(splits or SPLITS)
    missing = [split for split in wanted if getattr(result, split) is None]
    if missing:
        raise ConfigError(f"dataset '{name}' returned no {missing[0]} split; it is needed here")
    return result


def data_info(data: DataSplits) -> dict:
    """What a model needs to be rebuilt without the data (load_run for inference), kept in metadata.json."""
    return {"input_shape": list(data.input_shape) if data.input_shape is not None else None,
            "num_outputs": data.num_outputs, "task": data.task,
            "sizes": {split: len(getattr(data, split)) for split in SPLITS if getattr(data, split) is not None}}


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way, so a resumed run neither repeats nor skips batches."""

    def __init__(self, dataset: Dataset, **kwargs: Any):
        super().__init__(dataset, **kwargs)
        self.start_index = 0

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        super().set_epoch(epoch)
        # A stop on the epoch's last (partial) batch resumes with nothing left of the epoch, not a negative length.
        self.start_index = min(start_index, self.num_samples)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start_index:])

    def __len__(self) -> int:
        return self.num_samples - self.start_index

    def index_tensor(self) -> torch.Tensor:
        """What `__iter__` yields, as one index tensor: DistributedSampler's shuffle, padding and sharding in tensor
        operations, so a batched loader slices its batches without a Python int per sample."""
        n = len(self.dataset)
        if self.shuffle:
            indices = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            indices = torch.arange(n)
        if not self.drop_last and self.total_size > n:  # pad by repeating from the start, as DistributedSampler does
            indices = indices.repeat(-(-self.total_size // n))
        indices = indices[:self.total_size]
        return indices[self.rank:self.total_size:self.num_replicas][self.start_index:]


class ShardSampler(Sampler[int]):
    """Every rank evaluates a disjoint slice with no padding, so summed metrics count each sample exactly once."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = list(range(rank, length, world_size))
        self._tensor = torch.arange(rank, length, world_size)

    def index_tensor(self) -> torch.Tensor:
        return self._tensor

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def eval_batch_size(opts: Mapping) -> int:
    return opts["eval_batch_size"] or 4 * opts["batch_size"]


def make_loaders(data: DataSplits, config: Mapping, rank: int, world_size: int, device: torch.device,
                 num_workers: int = 0, worker_start: str = "fork"
                 ) -> tuple[DataLoader, Optional[DataLoader], Optional[DataLoader]]:
    """Train loader sharded and shuffled per epoch (resumable); val/test sharded without padding. `num_workers` and
    `worker_start`: load_data_kwargs' as this rank resolved them (`worker_context`)."""
    opts = config["load_data_kwargs"]
    seed = config["training_kwargs"]["seed"]
    common: dict[str, Any] = {"num_workers": num_workers, "pin_memory": opts["pin_memory"] and device.type == "cuda"}
    if num_workers > 0:
        common["persistent_workers"] = opts["persistent_workers"]
        common["worker_init_fn"] = seed_worker
        common["multiprocessing_context"] = worker_context(worker_start)
    train_sampler = ResumableDistributedSampler(data.train, num_replicas=world_size, rank=rank,
                                                shuffle=opts["shuffle"], seed=seed, drop_last=opts["drop_last"])
    generator = torch.Generator().manual_seed(seed + rank)
    train = make_loader(data.train, opts["batch_size"], train_sampler, drop_last=opts["drop_last"],
                        generator=generator, **common)
    # Every loader gets its own generator: a loader without one draws its workers' seed from the global RNG
    # when its iterator is first made, which a resumed run does at a different moment (dropout would drift).
    val, test = (eval_loader(split, config, rank, world_size, **common) if split is not None else None
                 for split in (data.val, data.test))
    return train, val, test


def resolve_worker_start(setting: str, launched_rank: bool) -> str:
    """load_data_kwargs.worker_start: auto is forkserver in a rank stride launched (`python -m stride.job`, whose
    __main__ a forkserver child can import again), fork in any other process."""
    if setting != "auto":
        return setting
    return "forkserver" if launched_rank else "fork"


def worker_context(method: str) -> Any:
    """The multiprocessing context DataLoader workers start in. A forkserver ignores the stop signals and imports
    torch and stride's data module once, so each worker it forks starts in a fraction of a second; tensors reach
    workers through shared memory, not copies."""
    import multiprocessing

    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(["stride.training.forkserver_preload", "torch", "stride.training.data"])
    return context


def eval_loader(dataset: Dataset, config: Mapping, rank: int, world_size: int, **common: Any) -> DataLoader:
    seed = config["training_kwargs"]["seed"]
    sampler = ShardSampler(len(dataset), rank, world_size)
    return make_loader(dataset, eval_batch_size(config["load_data_kwargs"]), sampler,
                       generator=torch.Generator().manual_seed(seed), **common)


def make_loader(dataset: Dataset, batch_size: int, sampler: Sampler[int], drop_last: bool = False,
                **options: Any) -> DataLoader:
    """Batches of `sampler`'s indices: fetched whole where the dataset can (one call per batch, nothing collated
    per sample), else sample by sample and collated. Both paths group the same indices with the same BatchSampler
    and draw the same seeds from the loader's generator, so their batches are equal and runs resume alike."""
    fetch = batch_fetch(dataset)
    if fetch is None:
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **options)
    # batch_size=None turns off the loader's own batching: each index the sampler yields is a whole batch's indices.
    batches = (IndexBatches(sampler, batch_size, drop_last) if callable(getattr(sampler, "index_tensor", None))
               else BatchSampler(sampler, batch_size, drop_last))
    return DataLoader(fetch, sampler=batches, batch_size=None, collate_fn=as_is, **options)


class IndexBatches(Sampler[torch.Tensor]):
    """BatchSampler's batches of a sampler's indices (stride's own samplers, which give them as one tensor) as
    index tensors: slices of the epoch's index tensor, with no Python int per sample."""

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool):
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last

    def __iter__(self) -> Iterator[torch.Tensor]:
        indices = self.sampler.index_tensor()
        size = self.batch_size
        end = len(indices) - len(indices) % size if self.drop_last else len(indices)
        return (indices[start:start + size] for start in range(0, end, size))

    def __len__(self) -> int:
        count = len(self.sampler)
        return count // self.batch_size if self.drop_last else -(-count // self.batch_size)


def set_train_epoch(loader: DataLoader, epoch: int, batches_done: int) -> None:
    """Point the train loader at `batches_done` batches into `epoch` (0: its start), for exact mid-epoch resume."""
    batches = loader.batch_sampler or loader.sampler  # the loader's own BatchSampler, or make_loader's
    batches.sampler.set_epoch(epoch, start_index=batches_done * batches.batch_size)


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors anywhere in nested tuples, lists and dicts, moved to `device`; everything else as it is.

    This runs on every training step, so the usual batches (a tensor, or a plain list, tuple or dict of them) take
    a path with no abstract-class check (`isinstance(x, Mapping)` costs about a microsecond) and no generator; other
    containers (Mapping subclasses, namedtuples, list and tuple subclasses) take the general one below.
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    kind = type(batch)
    if kind is list or kind is tuple:
        moved = [v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else to_device(v, device)
                 for v in batch]
        return moved if kind is list else tuple(moved)
    if kind is dict:
        return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else to_device(v, device)
                for k, v in batch.items()}
    if isinstance(batch, Mapping):
        return type(batch)({k: to_device(v, device) for k, v in batch.items()}) if type(batch) is not dict else \
            {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def batch_size_of(batch: Any) -> int:
    """Samples in a batch: the first dimension of its first tensor."""
    if torch.is_tensor(batch):
        return int(batch.shape[0]) if batch.dim() else 1
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        size = batch_size_of(value)
        if size:
            return size
    return 0
