"""The baseline: a plain, well-written PyTorch training loop, with no stride in it but the data and model builders.

It comes in two forms, which differ only in how batches are fetched: "careful" gathers each batch from in-memory
tensors with one index operation (or one `__getitems__` call), "usual" uses the per-sample
`DataLoader(dataset, batch_size, ...)` most loops are written with. Otherwise it does what a careful researcher writes
by hand, and what stride's Trainer does for the same settings: AdamW with a
per-step cosine schedule, a seeded shuffle per epoch, autocast behind a switch (the torch AMP recipe), the training
loss summed on the device and read every `log_every_steps`, validation every epoch, the best weights kept with
`torch.save`, a final test with them. Seeds are drawn in the same order as stride's, so both sides compute the same
numbers: the bench checks that their final losses agree.

    python -m bench.raw --workload cnn          # train one workload and print its results as JSON
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from bench.workloads import Workload, get
from stride.datasets import builtin as datasets
from stride.models import builtin as models

DATASETS: dict[str, Callable[..., Any]] = {"digits": datasets.digits,
                                           "synthetic_regression": datasets.synthetic_regression}
MODELS: dict[str, Callable[..., nn.Module]] = {"CNN": models.CNN, "MLP": models.MLP, "ResNet": models.ResNet}


def _import(name: str, table: dict) -> Callable[..., Any]:
    if ":" in name:  # module:attr, as stride resolves it
        module, _, attr = name.partition(":")
        return getattr(importlib.import_module(module), attr)
    return table[name]


def _dataset_builder(name: str) -> Callable[..., Any]:
    return _import(name, DATASETS)


def build(workload: Workload, device: torch.device):
    """(data splits, model on `device`): the same builders and the same seed stride uses."""
    kwargs = dict(workload.dataset_kwargs)
    splits = _dataset_builder(kwargs.pop("dataset_name"))(**kwargs)
    kwargs = dict(workload.model_kwargs)
    torch.manual_seed(workload.seed)
    model = _import(kwargs.pop("model_name"), MODELS)(splits.input_shape, splits.num_outputs, **kwargs)
    return splits, model.to(device)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device, classification: bool,
             autocast: Callable[[], Any], kind: str = "supervised", fetch: str = "usual") -> dict:
    if fetch == "careful":
        loader = careful_batches(dataset, in_memory(dataset), torch.arange(len(dataset)), batch_size)
    else:
        # A loader without a generator of its own draws a seed from the global RNG each time it is iterated, which
        # would shift the dropout stream by how often we evaluate: evaluation gets its own.
        loader = DataLoader(OneByOne(dataset), batch_size=batch_size, pin_memory=device.type == "cuda",
                            generator=torch.Generator())
    if kind == "lm":
        return _evaluate_lm(model, loader, device, autocast)
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count: no per-batch sync
    for inputs, targets in loader:
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast():
            outputs = model(inputs)
        outputs = outputs.float()
        if classification:
            totals[0] += nn.functional.cross_entropy(outputs, targets, reduction="sum")
            totals[1] += (outputs.argmax(dim=1) == targets).sum()
        else:
            totals[0] += nn.functional.mse_loss(outputs, targets.float(), reduction="sum") / targets[0].numel()
        totals[2] += targets.shape[0]
    model.train()
    loss_sum, correct, count = totals.tolist()
    metrics = {"loss": loss_sum / count}
    if classification:
        metrics["accuracy"] = correct / count
    return metrics


@torch.no_grad()
def _evaluate_lm(model: nn.Module, loader: Iterable, device: torch.device, autocast: Callable[[], Any]) -> dict:
    """The language model's metrics: bench.lm's per-batch sums, added up on the device, read once."""
    from bench import lm

    model.eval()
    totals: dict[str, torch.Tensor] = {}
    for batch in loader:
        tokens = batch["tokens"].to(device, non_blocking=True)
        targets = batch["targets"].to(device, non_blocking=True)
        with autocast():
            sums = lm.next_token_sums(model(tokens), targets)
        totals = {k: totals[k] + v for k, v in sums.items()} if totals else sums
    model.train()
    return lm.next_token_metrics(totals)


def in_memory(dataset: Dataset) -> Optional[list[torch.Tensor]]:
    """A split's samples as whole tensors, gathered once before training, for the careful loop: a Subset of a
    TensorDataset (what random_split gives) becomes its tensors' rows. None for any other dataset."""
    if isinstance(dataset, Subset) and type(dataset.dataset) is TensorDataset:
        rows = torch.as_tensor(dataset.indices, dtype=torch.long)
        return [tensor.index_select(0, rows) for tensor in dataset.dataset.tensors]
    if type(dataset) is TensorDataset:
        return list(dataset.tensors)
    return None


class OneByOne(Dataset):
    """A dataset seen only through `__getitem__`: the usual loop's DataLoader fetches it sample by sample and
    collates, as it does any dataset that does not return whole batches."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]


def careful_batches(dataset: Dataset, tensors: Optional[list[torch.Tensor]], order: torch.Tensor,
                    batch_size: int) -> Iterator[Any]:
    """The batches of `order`, each fetched with one index operation per tensor (or the dataset's own
    `__getitems__`, one call per batch): what a careful hand-written loop does instead of a per-sample DataLoader."""
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        if tensors is not None:
            yield [tensor.index_select(0, rows) for tensor in tensors]
        else:
            yield dataset.__getitems__(rows.tolist())


def train(workload: Workload, splits, model: nn.Module, device: torch.device, out_dir: Path,
          precision: str = "fp32", compile: bool = False, log=None, fetch: str = "careful",
          batches: Callable[[Iterable], Iterable] = iter) -> dict:
    """Train `model` for the workload's epochs; returns final metrics and the number of optimizer steps.

    `fetch`: "careful" gathers each batch in one call (`careful_batches`); "usual" is the per-sample
    `DataLoader(dataset, batch_size, shuffle)` most loops are written with. Both see the same batches in the same
    order. `batches` wraps each epoch's batch iterable (the bench's step timer)."""
    lm_batches = workload.kind == "lm"  # {"tokens", "targets"} batches and bench.lm's next-token loss
    if lm_batches:
        from bench import lm  # not at the top: `python -m bench.raw` (the startup baseline) imports no more of stride
    classification = splits.task == "classification" and not lm_batches
    on_cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=workload.lr, weight_decay=workload.weight_decay)
    steps_per_epoch = math.ceil(len(splits.train) / workload.batch_size)
    total_steps = steps_per_epoch * workload.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(1.0, s / max(1, total_steps)))))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()

    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    step_model = torch.compile(model) if compile else model
    loss_fn = nn.CrossEntropyLoss() if classification else nn.MSELoss()
    loader_rng = torch.Generator().manual_seed(workload.seed)
    torch.manual_seed(workload.seed)  # dropout stream
    best_metric, best_value = ("accuracy", -math.inf) if classification else ("loss", -math.inf)
    evaluation = dict(batch_size=workload.eval_batch, device=device, classification=classification, autocast=autocast,
                      kind=workload.kind, fetch=fetch)
    best_path = out_dir / "best.pt"
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    step = 0
    model.train()
    if fetch not in ("careful", "usual"):
        raise ValueError(f"fetch must be 'careful' or 'usual', not {fetch!r}")
    tensors = in_memory(splits.train) if fetch == "careful" else None
    if fetch == "careful" and tensors is None and not callable(getattr(splits.train, "__getitems__", None)):
        raise SystemExit("bench.raw: the careful loop needs a TensorDataset (or a Subset of one) or __getitems__")
    for epoch in range(workload.epochs):
        # A fresh permutation per epoch from (seed + epoch): reproducible, and independent of how far we got.
        order = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(workload.seed + epoch))
        if fetch == "careful":
            loader = careful_batches(splits.train, tensors, order, workload.batch_size)
        else:
            loader = DataLoader(OneByOne(splits.train), batch_size=workload.batch_size, sampler=order.tolist(),
                                generator=loader_rng, pin_memory=on_cuda)
        for batch in batches(loader):
            if lm_batches:
                tokens = batch["tokens"].to(device, non_blocking=True)
                targets = batch["targets"].to(device, non_blocking=True)
                with autocast():
                    loss = lm.next_token_loss(step_model(tokens), targets)
            else:
                inputs, targets = batch
                inputs = inputs.to(device, non_blocking=True)
                targets = targets.to(device, non_blocking=True)
                with autocast():
                    outputs = step_model(inputs)
                    loss = loss_fn(outputs.float(), targets if classification else targets.float())
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            loss_sum += loss.detach()
            loss_count += 1
            step += 1
            if step % workload.log_every_steps == 0:
                if log is not None:
                    log(f"epoch {epoch + 1} step {step}/{total_steps} train_loss {loss_sum.item() / loss_count:.4f}")
                loss_sum.zero_()
                loss_count = 0
            if workload.checkpoint_every_steps and step % workload.checkpoint_every_steps == 0:
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "step": step}, out_dir / "checkpoint.pt")
        val = evaluate(model, splits.val, **evaluation)
        value = val[best_metric] if classification else -val["loss"]
        if value > best_value:
            best_value = value
            torch.save(model.state_dict(), best_path)
        if log is not None:
            log(f"epoch {epoch + 1}/{workload.epochs} " + " ".join(f"val_{k} {v:.4f}" for k, v in val.items()))
    torch.save(model.state_dict(), out_dir / "final.pt")
    model.load_state_dict(torch.load(best_path, map_location=device, weights_only=True))
    test = evaluate(model, splits.test, **evaluation)
    val = evaluate(model, splits.val, **evaluation)
    return {"steps": step, **{f"test_{k}": v for k, v in test.items()}, **{f"val_{k}": v for k, v in val.items()}}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.raw", description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="cnn")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--fetch", default="careful", choices=("careful", "usual"))
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--dataset", default=None, help="another dataset builder, e.g. bench.probe:digits")
    args = parser.parse_args(argv)
    workload = get(args.workload, args.quick)
    if args.dataset:
        workload = workload.scaled(dataset_kwargs={**workload.dataset_kwargs, "dataset_name": args.dataset})
    device = torch.device(args.device)
    splits, model = build(workload, device)
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="bench-raw-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = train(workload, splits, model, device, out_dir, args.precision, args.compile,
                    log=lambda line: print(line, file=sys.stderr), fetch=args.fetch)
    results["train_time_s"] = round(time.perf_counter() - start, 3)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
