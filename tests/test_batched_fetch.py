"""Batches fetched in one call are those of the per-sample path, bit for bit: the same tensors under sharding, workers
and mid-epoch starts, and the same weights after training and after a stop and resume. And batches on the device."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import ConcatDataset, Dataset, SequentialSampler, Subset, TensorDataset

from stride import Callback, Trainer
from stride.checkpoint import Checkpointer
from stride.config import resolve
from stride.datasets import DataSplits, split_dataset
from stride.datasets.builtin import digits, synthetic_regression
from stride.registry import register_dataset
from stride.rundir import RunDir
from stride.training.data import (IndexBatches, ResumableDistributedSampler, ShardSampler, make_loader,
                                  make_loaders, set_train_epoch)
from stride.training.fetch import BatchFetch, batch_fetch
from stride.training.prefetch import device_batches, tensors_in

CPU = torch.device("cpu")


class PerSample(Dataset):
    """Today's path: one `__getitem__` per sample, collated by the DataLoader."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __getitem__(self, index: int):
        return self.dataset[index]

    def __len__(self) -> int:
        return len(self.dataset)


def per_sample(data: DataSplits) -> DataSplits:
    return DataSplits(PerSample(data.train), PerSample(data.val), PerSample(data.test), data.input_shape,
                      data.num_outputs, data.task)


@register_dataset("digits_one_by_one")
def digits_one_by_one() -> DataSplits:
    """The built-in digits, fetched sample by sample."""
    return per_sample(digits())


def assert_same_batches(got: list, expected: list) -> None:
    assert len(got) == len(expected) > 0
    for a, b in zip(got, expected):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a.values() if isinstance(a, dict) else a, b.values() if isinstance(b, dict) else b):
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)


def loader_batches(data: DataSplits, rank: int, epoch: int, batches_done: int, **load) -> list[list]:
    config = resolve(layers=[{"load_data_kwargs": load, "training_kwargs": {"seed": 5}}], experiment_config=False)
    train, val, test = make_loaders(data, config, rank, 2, CPU)
    set_train_epoch(train, epoch, batches_done)
    return [list(train), list(val), list(test), len(train)]


@pytest.mark.parametrize("workers, drop_last, batches_done", [(0, False, 0), (0, True, 3), (2, False, 2)])
def test_built_in_datasets_give_the_per_sample_batches_on_every_rank_and_epoch(workers, drop_last, batches_done):
    # DistributedSampler shards of two ranks, shuffled per epoch (with workers, one shard: each loader forks them).
    shards = [(0, 0), (0, 1), (1, 0), (1, 1)] if not workers else [(1, 1)]
    datasets = (digits(), synthetic_regression(num_samples=203)) if not workers else (digits(),)
    for data in datasets:
        reference = per_sample(data)
        assert batch_fetch(data.train) is not None and batch_fetch(reference.train) is None
        for rank, epoch in shards:
            opts = {"batch_size": 7, "drop_last": drop_last, "num_workers": workers, "eval_batch_size": 9}
            got = loader_batches(data, rank, epoch, batches_done, **opts)
            expected = loader_batches(reference, rank, epoch, batches_done, **opts)
            assert got[3] == expected[3]  # len(): the loop's steps per epoch
            for mine, theirs in zip(got[:3], expected[:3]):
                assert_same_batches(mine, theirs)


def test_tensor_datasets_and_subsets_of_them_are_gathered_whole():
    x, y = torch.randn(50, 3, 2), torch.arange(50)
    table = TensorDataset(x, y)
    inner = Subset(table, list(range(49, -1, -2)))  # 25 rows, in reverse
    nested = Subset(inner, [-1, 0, 3, 24, 7])  # negative indices counted from the end, as dataset[i] does
    for dataset in (table, inner, nested, *split_dataset(table, 0.2, 0.2, split_seed=1)):
        fetch = batch_fetch(dataset)
        assert isinstance(fetch, BatchFetch) and fetch.tensors is not None
        indices = list(range(len(dataset)))[::-1][:4]
        assert_same_batches([fetch[indices]], [[torch.stack([dataset[i][k] for i in indices]) for k in range(2)]])


class Augmented(TensorDataset):
    def __getitem__(self, index):
        x, y = super().__getitem__(index)
        return x + 1, y


def test_datasets_that_cannot_give_a_batch_keep_the_per_sample_path():
    x, y = torch.randn(20, 2), torch.arange(20)
    table = TensorDataset(x, y)
    for dataset in (PerSample(table), Augmented(x, y), Subset(Augmented(x, y), [1, 2]), ConcatDataset([table]),
                    Subset(table, [0, 20]), Subset(PerSample(table), [3, 4])):
        assert batch_fetch(dataset) is None
    # A subclass that changes __getitem__ keeps being called: its batches are the augmented ones.
    batch = next(iter(make_loader(Augmented(x, y), 4, SequentialSampler(x))))
    assert torch.equal(batch[0], x[:4] + 1)


class Rows(Dataset):
    """A user dataset that opts in: `__getitems__` returns the batch itself ("dict") or, as torch's contract has
    it, a list of samples ("samples"); the calls are counted."""

    def __init__(self, kind: str):
        self.x, self.y = torch.randn(30, 4), torch.randint(0, 3, (30,))
        self.kind, self.calls, self.single_calls = kind, 0, 0

    def __len__(self) -> int:
        return 30

    def __getitem__(self, index: int):
        self.single_calls += 1
        return {"x": self.x[index], "y": self.y[index]} if self.kind == "dict" else (self.x[index], self.y[index])

    def __getitems__(self, indices: list[int]):
        self.calls += 1
        rows = torch.tensor(indices)
        if self.kind == "dict":
            return {"x": self.x[rows], "y": self.y[rows]}
        return [(self.x[i], self.y[i]) for i in indices]


class TupleRows(Rows):
    def __getitems__(self, indices: list[int]):
        self.calls += 1
        rows = torch.tensor(indices)
        return self.x[rows].numpy(), self.y[rows]  # numpy arrays in a batch become tensors, as torch converts them


@pytest.mark.parametrize("dataset", [Rows("dict"), Rows("samples"), TupleRows("tuple")], ids=["dict", "samples",
                                                                                            "tuple"])
def test_a_user_dataset_opts_in_with_getitems_and_is_called_once_per_batch(dataset):
    sampler = torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(0))
    batches = list(make_loader(dataset, 8, sampler))
    assert dataset.calls == len(batches) == 4 and dataset.single_calls == 0
    dataset.calls = 0
    sampler.generator.manual_seed(0)
    expected = list(make_loader(PerSample(dataset), 8, sampler))
    assert dataset.calls == 0 and dataset.single_calls == 30
    if isinstance(dataset, TupleRows):
        batches = [list(batch) for batch in batches]  # the user's tuple, where collating makes a list
    assert_same_batches(batches, expected)
    # Under a split the Subsets map the indices on their way down to the dataset's own __getitems__.
    train, _, _ = split_dataset(dataset, 0.2, 0.2, split_seed=0)
    got = list(make_loader(train, 5, SequentialSampler(train)))
    expected = list(make_loader(PerSample(train), 5, SequentialSampler(train)))
    assert_same_batches([list(b) for b in got] if isinstance(dataset, TupleRows) else got, expected)


# ------------------------------------------------------------------------------------------------ whole runs
RECIPE = {"model_kwargs": {"model_name": "MLP", "hidden": [32], "dropout": 0.2}, "device": "cpu", "sinks": [],
          "load_data_kwargs": {"batch_size": 48}, "training_kwargs": {"epochs": 2, "deterministic": True,
                                                                      "log_every_steps": 5}}


def train(work_dir: Path, dataset: str, callbacks=(), **load) -> tuple[dict, Path]:
    recipe = {**RECIPE, "load_data_kwargs": {**RECIPE["load_data_kwargs"], **load}}
    trainer = Trainer(work_dir=work_dir, dataset_kwargs={"dataset_name": dataset}, callbacks=list(callbacks),
                      **recipe)
    return trainer.fit(), trainer.run_dir.path


def weights(run: Path, name: str) -> dict:
    return torch.load(run / "weights" / f"{name}.pt", weights_only=True)["model"]


def assert_same_weights(run_a: Path, run_b: Path) -> None:
    for name in ("final", "best"):
        a, b = weights(run_a, name), weights(run_b, name)
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), f"{name}.pt differs"


@pytest.fixture(scope="module")
def one_by_one(tmp_path_factory) -> tuple[dict, Path]:
    """The uninterrupted run on the per-sample path."""
    return train(tmp_path_factory.mktemp("one_by_one"), "digits_one_by_one")


def test_a_run_on_the_batched_path_ends_with_the_per_sample_weights(tmp_path, one_by_one):
    results, run = train(tmp_path, "digits")
    assert results["steps"] == one_by_one[0]["steps"] == 2 * 27  # 1258 samples in batches of 48: 27 per epoch
    assert_same_weights(run, one_by_one[1])
    assert results["test_accuracy"] == one_by_one[0]["test_accuracy"]


class StopAfter(Callback):
    """Asks for a stop at a log point; the loop stops, with a checkpoint, at the next step."""

    def __init__(self, step: int):
        self.step = step

    def on_log(self, state) -> None:
        if state.step >= self.step:
            state.trainer.request_stop("test")


def test_a_batched_run_stopped_mid_epoch_and_resumed_ends_with_the_per_sample_weights(tmp_path, one_by_one):
    """With DataLoader workers too: the batched gather draws nothing, so the workers change no sample."""
    stopped, run = train(tmp_path, "digits", callbacks=[StopAfter(35)], num_workers=2)
    assert stopped["stopped"] and stopped["step"] == 36
    state, _ = Checkpointer(run / "checkpoints").load_latest()
    assert (state["epoch"], state["batches_done"]) == (1, 36 - 27)  # mid-epoch, counted in batches trained on
    rundir = RunDir(run)
    results = Trainer(config=rundir.read_config(), run_dir=rundir).fit()
    assert results["steps"] == one_by_one[0]["steps"]
    assert_same_weights(run, one_by_one[1])


# ------------------------------------------------------------------------------------------ onto the device
def test_batches_reach_the_device_as_the_loader_gives_them():
    loader = make_loader(TensorDataset(torch.randn(10, 3), torch.arange(10)), 4, SequentialSampler(range(10)))
    assert device_batches(loader, CPU) is loader  # the CPU path adds nothing per step
    meta = list(device_batches(loader, torch.device("meta")))
    assert [len(b) for b in meta] == [2, 2, 2] and all(t.is_meta for b in meta for t in b)
    assert [t.shape[0] for b in meta for t in b[:1]] == [4, 4, 2]
    nested = {"a": (torch.zeros(1), [torch.ones(2), "text"]), "b": {"c": torch.full((3,), 2.0)}, "n": 3}
    assert [t.tolist() for t in tensors_in(nested)] == [[0.0], [1.0, 1.0], [2.0, 2.0, 2.0]]


def test_the_samplers_index_tensor_is_their_indices_with_padding_sharding_and_a_mid_epoch_start():
    """The batched path slices one index tensor; it must be exactly what DistributedSampler's list gives."""
    for n in (1, 2, 5, 23, 64):
        for replicas in (1, 2, 3, 8):
            for rank in range(replicas):
                for shuffle, drop_last in ((True, False), (False, False), (True, True)):
                    if drop_last and n < replicas:
                        continue  # DistributedSampler gives every rank nothing
                    sampler = ResumableDistributedSampler(range(n), num_replicas=replicas, rank=rank,
                                                          shuffle=shuffle, seed=3, drop_last=drop_last)
                    for epoch, start in ((0, 0), (4, 1), (2, n)):
                        sampler.set_epoch(epoch, start_index=start)
                        assert sampler.index_tensor().tolist() == list(sampler), (n, replicas, rank, epoch, start)
    shards = ShardSampler(11, 2, 3)
    assert shards.index_tensor().tolist() == list(shards) == [2, 5, 8]
    batches = IndexBatches(shards, 2, drop_last=False)
    assert [b.tolist() for b in batches] == [[2, 5], [8]] and len(batches) == 2
    assert [b.tolist() for b in IndexBatches(shards, 2, drop_last=True)] == [[2, 5]]
