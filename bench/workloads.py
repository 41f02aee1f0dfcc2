"""The benchmark workloads: one description that both sides read, so stride's Trainer and the raw loop train the same
model on the same data with the same optimizer, schedule, batch size, seeds and step count.

Data and model come from the same builder functions on both sides (stride's built-ins are plain `Dataset`s and
`nn.Module`s), so the tensors and the initial weights are identical, not merely alike.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(frozen=True)
class Workload:
    name: str
    summary: str
    dataset_kwargs: dict
    """stride's dataset_kwargs: a built-in dataset_name plus its arguments."""
    model_kwargs: dict
    """stride's model_kwargs: a built-in model_name plus its arguments."""
    batch_size: int = 64
    eval_batch_size: Optional[int] = None
    """None means 4 x batch_size, as in stride."""
    epochs: int = 20
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    log_every_steps: int = 50
    """Both sides read the on-device mean training loss this often (and never in between)."""
    checkpoint_every_steps: int = 0
    """Both sides save model + optimizer every N steps (raw: a plain synchronous torch.save)."""
    extra_training_kwargs: dict = field(default_factory=dict)
    """stride-only settings that a plain loop has no counterpart for (none change the arithmetic)."""
    kind: str = "supervised"
    """supervised: (inputs, targets) batches, stride's built-in task; lm: {"tokens", "targets"} dict batches and
    bench.lm's next-token loss (stride through the Task named in task_kwargs, the raw loop directly)."""
    task_kwargs: dict = field(default_factory=dict)
    """stride's task_kwargs (empty: stride's default, the dataset's own task)."""

    @property
    def eval_batch(self) -> int:
        return self.eval_batch_size or 4 * self.batch_size

    def scaled(self, **changes: Any) -> "Workload":
        return dataclasses.replace(self, **changes)

    def stride_kwargs(self, work_dir: str, device: str = "cpu", precision: str = "fp32",
                      compile: bool = False) -> dict:
        """Keyword arguments for `stride.Trainer` that spell out every setting the raw loop hard-codes."""
        training = {"epochs": self.epochs, "optimizer": "adamw", "lr": self.lr, "weight_decay": self.weight_decay,
                    "scheduler": "cosine", "warmup_steps": 0, "grad_clip_norm": None, "grad_accum_steps": 1,
                    "precision": precision, "compile": compile, "seed": self.seed, "deterministic": False,
                    "log_every_steps": self.log_every_steps, "checkpoint_every_steps": self.checkpoint_every_steps,
                    **self.extra_training_kwargs}
        kwargs = {"work_dir": work_dir, "device": device, "dataset_kwargs": dict(self.dataset_kwargs),
                  "model_kwargs": dict(self.model_kwargs),
                  "load_data_kwargs": {"batch_size": self.batch_size, "eval_batch_size": self.eval_batch_size,
                                       "num_workers": 0, "shuffle": True, "drop_last": False},
                  "training_kwargs": training}
        if self.task_kwargs:
            kwargs["task_kwargs"] = dict(self.task_kwargs)
        return kwargs

    def stride_overrides(self) -> list[str]:
        """The same settings as `key=value` words for `stride local` (only what differs from stride's defaults)."""
        words = [f"dataset_kwargs.{k}={_word(v)}" for k, v in self.dataset_kwargs.items()]
        words += [f"model_kwargs.{k}={_word(v)}" for k, v in self.model_kwargs.items()]
        words += [f"load_data_kwargs.batch_size={self.batch_size}", f"training_kwargs.epochs={self.epochs}",
                  f"training_kwargs.lr={self.lr}", f"training_kwargs.seed={self.seed}"]
        return words


def _word(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


def with_checkpoint_every(workload: Workload, steps: int) -> Workload:
    """The checkpoint workload saving every `steps` steps, with data for three saves (the first one is reported
    apart: it allocates the host buffers)."""
    batches = 3 * steps + steps // 2
    samples = -(-batches * workload.batch_size * 10 // 7)  # the train split is 70 % of synthetic_regression's samples
    return workload.scaled(checkpoint_every_steps=steps, log_every_steps=steps,
                           dataset_kwargs={**workload.dataset_kwargs, "num_samples": samples})


# Overhead-sensitive: an MLP on in-memory tensors, ~1-2 ms of arithmetic per step on two cores, ~2,000 steps. How
# batches are fetched (256 per-sample calls and a collate, or one gather) and any per-step bookkeeping (host syncs,
# Python glue, logging) show up here first.
MLP = Workload(
    name="mlp",
    summary="MLP 64-512-512-10 on 59k in-memory samples (10 Gaussian classes, bench.tabular), batch 256, 9 epochs "
            "(2,079 steps)",
    dataset_kwargs={"dataset_name": "bench.tabular:blobs", "num_samples": 65536, "num_features": 64},
    model_kwargs={"model_name": "MLP", "hidden": [512, 512]},
    batch_size=256,
    epochs=9,
)

# stride's built-in default, unchanged: the small CNN on the shipped 8x8 digits, 20 epochs of batch 64.
CNN = Workload(
    name="cnn",
    summary="stride's default: CNN (32, 64 channels) on the 8x8 digits, batch 64, 20 epochs",
    dataset_kwargs={"dataset_name": "digits"},
    model_kwargs={"model_name": "CNN"},
)

# Checkpoint cost: a model whose state (weights + AdamW moments, ~250 MB) takes a disk a noticeable time to write,
# saved every 72 steps (~11 s on 2 cores): a write beside most steps, yet time enough for it to finish in the CPU time
# training leaves idle. `python bench/run.py --checkpoint-every 12` shows tighter cadences (docs/benchmarks.md).
CHECKPOINT = with_checkpoint_every(Workload(
    name="ckpt",
    summary="MLP 1024-4096-4096-1 (21M parameters; 250 MB of weights + AdamW state), batch 64, "
            "a checkpoint every 72 steps",
    dataset_kwargs={"dataset_name": "synthetic_regression", "num_features": 1024},
    model_kwargs={"model_name": "MLP", "hidden": [4096, 4096]},
    epochs=1,
    checkpoint_every_steps=72,
    extra_training_kwargs={"checkpoint_every_minutes": 0, "keep_last_checkpoints": 2},
), 72)

# The plug-in path: a character-level transformer language model on text that ships with Python (bench/lm.py), dict
# batches {"tokens", "targets"}, and the next-token loss through a stride.Task subclass; the raw loop calls the same
# loss function directly.
LM = Workload(
    name="lm",
    summary="char-level transformer LM (2 layers, width 32, 4 heads, context 64; 34k parameters) on 227k characters "
            "of stdlib docstrings, dict batches through a stride.Task, batch 16, 3 epochs",
    dataset_kwargs={"dataset_name": "bench.lm:char_text", "block_size": 64},
    model_kwargs={"model_name": "bench.lm:CharTransformer", "dim": 32, "layers": 2, "heads": 4},
    batch_size=16,
    epochs=3,
    lr=3e-3,
    weight_decay=0.01,
    kind="lm",
    task_kwargs={"task_name": "bench.lm:CharLMTask"},
)

WORKLOADS = {w.name: w for w in (MLP, CNN, LM, CHECKPOINT)}

# --quick: the same workloads, a few seconds each (a smoke run of the bench itself, not a measurement).
QUICK = {
    "mlp": MLP.scaled(dataset_kwargs={**MLP.dataset_kwargs, "num_samples": 8192}, epochs=1),
    "cnn": CNN.scaled(epochs=2),
    "lm": LM.scaled(dataset_kwargs={**LM.dataset_kwargs, "max_chars": 40960}, epochs=1),
    "ckpt": CHECKPOINT.scaled(dataset_kwargs={**CHECKPOINT.dataset_kwargs, "num_samples": 1024},
                              model_kwargs={"model_name": "MLP", "hidden": [1024, 1024]}, checkpoint_every_steps=4,
                              log_every_steps=4),
}


def get(name: str, quick: bool = False) -> Workload:
    table = QUICK if quick else WORKLOADS
    if name not in table:
        raise SystemExit(f"bench: unknown workload {name!r}; choose from {', '.join(table)}")
    return table[name]
