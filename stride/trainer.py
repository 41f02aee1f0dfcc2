"""The Trainer: resolve a config, build data and model, train with validation each epoch, test the best weights.

It owns one run folder (`work_dir/<run>`) and writes everything there: config, logs, checkpoints, weights, metrics,
results. It is handed its place in a distributed job (`DistEnv`) and never reads the cluster's environment itself.
Resuming is the default: if the run folder holds a checkpoint, `fit()` continues from it exactly (mid-epoch too).
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from stride import config as config_lib
from stride import registry
from stride.checkpoint import BackgroundWriter, Checkpointer, HostStaging, load_file, save_file
from stride.compare import higher_is_better
from stride.datasets import DataSplits
from stride.distenv import DistEnv
from stride.errors import ConfigError, RunError
from stride.logs import ProgressBar, setup_logging
from stride.rundir import RunDir, atomic_write, find_run, now_iso, validate_run_name, write_json
from stride.provenance import create_run
from stride.tensorboard import TensorBoardLog

CHECKPOINT_FORMAT = 1
PROGRESS_EVERY_S = 2.0
"""status.json's step is refreshed at log points, at most this often (in the background, rank 0 only)."""


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


class ShardSampler(Sampler[int]):
    """Every rank evaluates a disjoint slice with no padding, so summed metrics count each sample exactly once."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _rng_state() -> dict:
    state = {"python": list(_to_plain(random.getstate())), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {"keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached": float(cached)}
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _to_plain(value: Any) -> Any:
    return [_to_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def _set_rng_state(state: Mapping) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np_state = state["numpy"]
        np.random.set_state(("MT19937", np_state["keys"].numpy().astype("uint32"), np_state["pos"],
                             np_state["has_gauss"], np_state["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def resolve_device(name: str, env: DistEnv) -> torch.device:
    """auto: this rank's GPU when CUDA is present, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device=cuda but no CUDA device is visible: use device=auto or device=cpu")
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device(name)


class Trainer:
    """Train, validate, test and save one run of an experiment.

    >>> trainer = Trainer(work_dir="experiments/digits", model_kwargs={"model_name": "MLP"})
    >>> results = trainer.fit()          # work_dir/0: config.json, logs/, checkpoints/, weights/, results.json
    >>> Trainer(work_dir="experiments/digits").load_run("0").evaluate("test")
    """

    def __init__(
        self,
        work_dir: Optional[Union[str, Path]] = None,
        dataset_kwargs: Optional[Mapping] = None,
        load_data_kwargs: Optional[Mapping] = None,
        model_kwargs: Optional[Mapping] = None,
        device: Optional[str] = None,
        run: Optional[str] = None,
        training_kwargs: Optional[Mapping] = None,
        distributed_kwargs: Optional[Mapping] = None,
        slurm: Optional[Mapping] = None,
        config: Optional[Mapping] = None,
        overrides: Sequence[str] = (),
        config_files: Sequence[Union[str, Path]] = (),
        dist_env: Optional[DistEnv] = None,
        run_dir: Optional[RunDir] = None,
    ):
        """Resolve and validate the config, then load the data and build the model.

        `config` is a complete resolved config (e.g. a run's config.json); otherwise the keyword arguments, YAML
        `config_files` and `key=value` `overrides` are layered over the defaults and work_dir/config.yaml.
        """
        given = {"work_dir": str(work_dir) if work_dir is not None else None, "dataset_kwargs": dataset_kwargs,
                 "load_data_kwargs": load_data_kwargs, "model_kwargs": model_kwargs, "device": device, "run": run,
                 "training_kwargs": training_kwargs, "distributed_kwargs": distributed_kwargs, "slurm": slurm}
        self.env = dist_env or DistEnv()
        self.run_dir = run_dir
        self.config = self.comprehend_config(
            config=config, layers=[{k: v for k, v in given.items() if v is not None}],
            overrides=overrides, config_files=config_files)
        self.device = resolve_device(self.config["device"], self.env)
        self.data: DataSplits = self.load_data()
        self.model: nn.Module = self.build_model()
        self.stop_reason: Optional[str] = None

    # ----------------------------------------------------------------------------------------------- configuration
    def comprehend_config(self, config: Optional[Mapping] = None, layers: Sequence[Mapping] = (),
                          overrides: Sequence[str] = (), config_files: Sequence[Union[str, Path]] = ()) -> dict:
        """Resolve the layered config and check the dataset and model names and keyword arguments."""
        if config is not None:
            resolved = config_lib.validate(json.loads(json.dumps(dict(config))))
        else:
            resolved = config_lib.resolve(overrides=overrides, files=config_files, layers=layers)
        check_plugins(resolved)
        return resolved

    @property
    def work_dir(self) -> Optional[Path]:
        return Path(self.config["work_dir"]) if self.config.get("work_dir") else None

    # -------------------------------------------------------------------------------------------------------- data
    def load_data(self) -> DataSplits:
        kwargs = dict(self.config["dataset_kwargs"])
        name = kwargs.pop("dataset_name")
        splits = registry.resolve("dataset", name)(**kwargs)
        if not isinstance(splits, DataSplits):
            raise ConfigError(f"dataset '{name}' returned {type(splits).__name__}; a dataset builder must return "
                              f"stride.datasets.DataSplits(train, val, test, input_shape, num_outputs, task)")
        return splits

    def make_loaders(self) -> tuple[DataLoader, DataLoader, DataLoader]:
        """Train loader sharded and shuffled per epoch (resumable); val/test sharded without padding."""
        opts = self.config["load_data_kwargs"]
        seed = self.config["training_kwargs"]["seed"]
        on_cuda = self.device.type == "cuda"
        common: dict[str, Any] = {"num_workers": opts["num_workers"], "pin_memory": opts["pin_memory"] and on_cuda}
        if opts["num_workers"] > 0:
            common["persistent_workers"] = opts["persistent_workers"]
            common["worker_init_fn"] = _seed_worker
        train_sampler = ResumableDistributedSampler(
            self.data.train, num_replicas=self.env.world_size, rank=self.env.rank, shuffle=opts["shuffle"],
            seed=seed, drop_last=opts["drop_last"])
        generator = torch.Generator().manual_seed(seed + self.env.rank)
        train = DataLoader(self.data.train, batch_size=opts["batch_size"], sampler=train_sampler,
                           drop_last=opts["drop_last"], generator=generator, **common)
        eval_batch = opts["eval_batch_size"] or 4 * opts["batch_size"]
        # Every loader gets its own generator: a loader without one draws its workers' seed from the global RNG
        # when its iterator is first made, which a resumed run does at a different moment (dropout would drift).
        val, test = (DataLoader(split, batch_size=eval_batch, generator=torch.Generator().manual_seed(seed),
                                sampler=ShardSampler(len(split), self.env.rank, self.env.world_size), **common)
                     for split in (self.data.val, self.data.test))
        return train, val, test

    # ------------------------------------------------------------------------------------------------------- model
    def build_model(self) -> nn.Module:
        kwargs = dict(self.config["model_kwargs"])
        name = kwargs.pop("model_name")
        target = registry.resolve("model", name)
        for key, value in (("input_shape", tuple(self.data.input_shape)), ("num_outputs", self.data.num_outputs)):
            if key not in kwargs and _accepts(target, key):
                kwargs[key] = value
        torch.manual_seed(self.config["training_kwargs"]["seed"])  # identical initial weights on every rank
        model = target(**kwargs)
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model '{name}' built a {type(model).__name__}, not a torch.nn.Module")
        return model.to(self.device)

    def save_weights(self, path: Union[str, Path], **extra: Any) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"model": _unwrap(self.model).state_dict(), **extra}, path)
        return path

    def load_weights(self, path: Union[str, Path]) -> "Trainer":
        path = Path(path)
        if not path.is_file():
            raise RunError(f"weights file '{path}' does not exist")
        state = load_file(path, map_location=self.device)
        _unwrap(self.model).load_state_dict(state["model"] if "model" in state else state)
        return self

    def load_run(self, run: Union[str, Path], weights: str = "best") -> "Trainer":
        """Restore a run's config and weights (best, final, or the latest checkpoint) from its folder."""
        target = Path(str(run))
        if target.is_absolute() or os.sep in str(run):
            run_dir = find_run(target)
        else:
            if self.work_dir is None:
                raise ConfigError("load_run needs work_dir: Trainer(work_dir=...).load_run('0')")
            validate_run_name(str(run))
            run_dir = find_run(str(run), self.work_dir)
        self.run_dir = run_dir
        self.config = self.comprehend_config(config=run_dir.read_config())
        self.device = resolve_device(self.config["device"], self.env)
        self.data = self.load_data()
        self.model = self.build_model()
        choices = {"best": [run_dir.best_weights, run_dir.final_weights],
                   "final": [run_dir.final_weights, run_dir.best_weights]}.get(weights, [])
        for path in choices:
            if path.is_file():
                return self.load_weights(path)
        latest = Checkpointer(run_dir.checkpoints_dir).load_latest(self.device)
        if latest is not None:
            _unwrap(self.model).load_state_dict(latest[0]["model"])
            return self
        raise RunError(f"run {run_dir.path} has no weights or checkpoint yet: it has not finished an epoch")

    # ---------------------------------------------------------------------------------------------------- training
    def request_stop(self, reason: str) -> None:
        """Ask the loop to checkpoint and return at the next step boundary (safe to call from a signal handler)."""
        self.stop_reason = reason

    def prepare_run_dir(self, command: Optional[Sequence[str]] = None) -> RunDir:
        """Allocate the run folder (unless one was given) and write config.json, metadata.json and status.json."""
        if self.run_dir is None:
            self.run_dir = create_run(self.config, command)
        self.run_dir.make_subdirs()
        return self.run_dir

    def fit(self) -> dict:
        """Train (resuming from the run folder's latest checkpoint if it has one), test, and return the results."""
        if self.env.is_main:
            run_dir = self.prepare_run_dir()
        else:
            assert self.run_dir is not None, "ranks other than 0 are handed the run folder rank 0 prepared"
            run_dir = self.run_dir
        log = setup_logging(run_dir.rank_log(self.env.rank), self.env.hostname, self.env.rank,
                            self.env.local_rank, console=self.env.is_main)
        tk = self.config["training_kwargs"]
        if self.device.type == "cuda":
            # Object collectives (RNG states, the checkpoint choice) and barriers use the current device: without
            # this, every rank of a node would use GPU 0.
            torch.cuda.set_device(self.device)
        if tk["deterministic"]:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS needs a fixed workspace
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        loop = _Loop(self, run_dir, log)
        try:
            results = loop.run()
        except BaseException:
            loop.close(quiet=True)
            raise
        loop.close()
        return results

    @torch.no_grad()
    def evaluate(self, split: str = "test", loader: Optional[DataLoader] = None) -> dict:
        """Loss (and accuracy for classification) over a whole split, summed across ranks."""
        if loader is None:
            dataset = {"train": self.data.train, "val": self.data.val, "test": self.data.test}[split]
            batch = self.config["load_data_kwargs"]["eval_batch_size"] or 4 * self.config["load_data_kwargs"]["batch_size"]
            loader = DataLoader(dataset, batch_size=batch, generator=torch.Generator(),
                                sampler=ShardSampler(len(dataset), self.env.rank, self.env.world_size))
        model = self.model
        was_training = model.training
        model.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, correct, count
        classification = self.data.task == "classification"
        for inputs, targets in loader:
            inputs = inputs.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            with self._autocast():
                outputs = model(inputs)
            outputs = outputs.float()
            if classification:
                totals[0] += nn.functional.cross_entropy(outputs, targets, reduction="sum")
                totals[1] += (outputs.argmax(dim=1) == targets).sum()
            else:
                totals[0] += nn.functional.mse_loss(outputs, targets.float(), reduction="sum") / max(1, targets[0].numel())
            totals[2] += targets.shape[0]
        if self.env.distributed and dist.is_initialized():
            dist.all_reduce(totals)
        model.train(was_training)
        loss_sum, correct, count = totals.tolist()
        metrics = {f"{split}_loss": loss_sum / max(1.0, count)}
        if classification:
            metrics[f"{split}_accuracy"] = correct / max(1.0, count)
        return metrics

    def _autocast(self):
        precision = self.config["training_kwargs"]["precision"]
        if precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)


class _Loop:
    """One fit(): optimizer, scheduler, DDP wrapping, checkpoint/resume, the epoch loop. Kept out of Trainer's API."""

    def __init__(self, trainer: Trainer, run_dir: RunDir, log):
        self.t, self.run_dir, self.log = trainer, run_dir, log
        self.env = trainer.env
        self.tk = trainer.config["training_kwargs"]
        self.is_main = self.env.is_main
        self.classification = trainer.data.task == "classification"
        self.best_metric = self.tk["best_metric"] or ("val_accuracy" if self.classification else "val_loss")
        mode = self.tk["best_mode"]
        self.maximize = mode == "max" or (mode == "auto" and higher_is_better(self.best_metric))
        self.checkpointer = Checkpointer(run_dir.checkpoints_dir, self.tk["keep_last_checkpoints"],
                                         background=self.tk["async_checkpoint"])
        self.best_staging = HostStaging()  # rank 0: the best weights since the last checkpoint, until it is written
        self.best_unsaved = False
        self.staging_in_flight = False  # rank 0: a checkpoint's host copy that the next optimizer step must wait for
        # status.json updates during training go through their own thread: each costs two fsyncs.
        self.status_writer = BackgroundWriter("stride-status")
        self.last_progress_time = -math.inf
        self.tensorboard = TensorBoardLog(run_dir.tensorboard_dir)  # opens at rank 0's first record, if installed
        if self.is_main:
            self.tensorboard.prepare()

    # -------------------------------------------------------------------------------------------------- building
    def _build(self) -> None:
        t, tk = self.t, self.tk
        self.train_loader, self.val_loader, self.test_loader = t.make_loaders()
        self.steps_per_epoch = math.ceil(len(self.train_loader) / tk["grad_accum_steps"])
        self.total_steps = self.steps_per_epoch * tk["epochs"]
        self.raw_model = _unwrap(t.model)
        params = [p for p in self.raw_model.parameters() if p.requires_grad]
        if tk["optimizer"] == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=tk["lr"], momentum=tk["momentum"],
                                             weight_decay=tk["weight_decay"])
        else:
            cls = torch.optim.AdamW if tk["optimizer"] == "adamw" else torch.optim.Adam
            self.optimizer = cls(params, lr=tk["lr"], weight_decay=tk["weight_decay"])
        warmup, total, cosine = tk["warmup_steps"], max(1, self.total_steps), tk["scheduler"] == "cosine"

        def lr_factor(step: int) -> float:
            if warmup and step < warmup:
                return (step + 1) / warmup
            if not cosine:
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor)
        self.scaler = torch.amp.GradScaler(t.device.type, enabled=tk["precision"] == "fp16")
        model = t.model
        if self.env.distributed:
            device_ids = [t.device.index] if t.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
            if tk["deterministic"]:
                model.register_comm_hook(None, _rank_ordered_mean_hook)
        if tk["compile"]:
            model = torch.compile(model)
        self.model = model
        self.loss_fn = nn.CrossEntropyLoss() if self.classification else nn.MSELoss()

    # ---------------------------------------------------------------------------------------------- checkpointing
    def _state(self, epoch: int, step: int, batches_done: int) -> dict:
        rng = _rng_state()
        rng_by_rank = [rng]
        if self.env.distributed:
            rng_by_rank = [None] * self.env.world_size
            dist.all_gather_object(rng_by_rank, rng)
        return {"format": CHECKPOINT_FORMAT, "model": self.raw_model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": epoch, "step": step, "batches_done": batches_done,
                "world_size": self.env.world_size, "rng": rng_by_rank, "best": self.best,
                "config_model": json.dumps(self.t.config["model_kwargs"], sort_keys=True),
                "saved_at": time.time()}

    def save_checkpoint(self, epoch: int, step: int, batches_done: int, wait: bool = False) -> None:
        """A checkpoint, and best.pt with it when the best weights changed since the last one (same background
        write, best.pt first: a checkpoint's record of the best never runs ahead of the file)."""
        state = self._state(epoch, step, batches_done)  # collective: every rank takes part
        if self.is_main:
            weights = (self.run_dir.best_weights, {"best": self.best}, self.best_staging) if self.best_unsaved else None
            self.best_unsaved = False
            self.checkpointer.save(state, step, wait=wait, weights=weights, late=self._changed_only_by_steps())
            self.staging_in_flight = self.checkpointer.copy_pending
        self.last_checkpoint_time = time.monotonic()

    def _changed_only_by_steps(self) -> frozenset:
        """Data pointers of the tensors only an optimizer step changes (weights, optimizer state): their checkpoint
        copy may overlap the next forward and backward. Buffers (BatchNorm statistics) change in forward: not here."""
        tensors = [p for group in self.optimizer.param_groups for p in group["params"]]
        tensors += [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        return frozenset(t.data_ptr() for t in tensors if t.device.type == "cpu")

    def _keep_best(self) -> None:
        """New best weights: a host copy now (one memcpy into kept buffers); best.pt is written with the next
        checkpoint, so short epochs do not each pay for a file."""
        self.checkpointer.wait()  # a write still in flight may be reading the previous best copy
        self.best_staging.copy(self.raw_model.state_dict())
        self.best_unsaved = True

    def _resume(self) -> tuple[int, int, int]:
        """Restore the newest good checkpoint; (epoch, step, batches done in that epoch)."""
        if self.is_main:
            self.checkpointer.remove_partial_writes()
        found = self._load_checkpoint()
        if found is None:
            if self.is_main:
                self._forget_metrics_after(0)  # a restart before the first checkpoint (e.g. a crash retry)
            return 0, 0, 0
        state, path = found
        if state["batches_done"] and state["world_size"] != self.env.world_size:
            raise RunError(f"checkpoint {path.name} was taken mid-epoch by {state['world_size']} ranks; this job has "
                           f"{self.env.world_size}: resume with {state['world_size']} ranks (stride resume keeps the "
                           f"run's own size unless told otherwise)")
        if state.get("config_model") != json.dumps(self.t.config["model_kwargs"], sort_keys=True):
            raise RunError(f"checkpoint {path} was written for model_kwargs {state.get('config_model')}, not "
                           f"{json.dumps(self.t.config['model_kwargs'], sort_keys=True)}: resume with the run's own "
                           f"model settings")
        try:
            self.raw_model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise RunError(f"checkpoint {path} does not fit this model: {str(exc).splitlines()[0]}") from None
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        rngs = state["rng"]
        if len(rngs) == self.env.world_size:
            _set_rng_state(rngs[self.env.rank])
        else:
            self.log.warning("checkpoint was written by %d ranks, this job has %d: RNG streams restart from rank 0's",
                             len(rngs), self.env.world_size)
            _set_rng_state(rngs[0])
        self.best = state.get("best")
        if self.is_main:
            self._forget_metrics_after(state["step"])
        self.log.info("resumed from %s (epoch %d, step %d, %d batches into the epoch)", path.name, state["epoch"],
                      state["step"], state["batches_done"])
        return state["epoch"], state["step"], state["batches_done"]

    def _load_checkpoint(self) -> Optional[tuple[dict, Path]]:
        """Rank 0 picks the newest good checkpoint (moving bad ones aside) and the other ranks load that very file,
        so a file only some ranks could read never starts the ranks from different steps."""
        if not self.env.distributed:
            return self.checkpointer.load_latest(self.t.device, move_aside=True)
        choice: list = [None, None]  # file name, error
        found, error = None, None
        if self.is_main:
            try:
                found = self.checkpointer.load_latest(self.t.device, move_aside=True)
                choice[0] = found[1].name if found else None
            except Exception as exc:  # tell the other ranks before raising, or they would wait in the broadcast
                error, choice[1] = exc, f"{type(exc).__name__}: {exc}"
        dist.broadcast_object_list(choice, src=0)
        if error is not None:
            raise error
        if choice[1] is not None:
            raise RunError(f"rank 0 could not load a checkpoint: {choice[1]}")
        if self.is_main or choice[0] is None:
            return found
        path = self.checkpointer.directory / choice[0]
        # Rank 0 checked its checksum: every rank reading the whole file once more would only double the I/O.
        return self.checkpointer.load(path, self.t.device, verify=False), path

    # ----------------------------------------------------------------------------------------------------- metrics
    def _forget_metrics_after(self, step: int) -> None:
        """Metrics logged after the checkpoint we resume from (step 0: all of them) are about to be redone: drop them
        (and old test lines) so metrics.jsonl stays one continuous story."""
        path = self.run_dir.metrics_file
        if not path.is_file():
            return
        kept, dropped = [], 0
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                dropped += 1
                continue
            if not 0 < record.get("step", 0) <= step or record.get("split") == "test":
                dropped += 1
            else:
                kept.append(line)
        if dropped:
            atomic_write(path, lambda handle: handle.write("".join(f"{line}\n" for line in kept)))

    def _write_metrics(self, record: dict) -> None:
        if self.is_main:
            record = {"time": round(time.time(), 3), **record}
            with open(self.run_dir.metrics_file, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            self.tensorboard.write(record)

    def _is_better(self, value: float) -> bool:
        if self.best is None:
            return True
        return value > self.best["value"] if self.maximize else value < self.best["value"]

    def _agree(self, stop: bool, checkpoint_due: bool, elapsed_s: float) -> tuple[bool, bool, float]:
        """All ranks must stop and checkpoint at the same step: one tiny all-reduce (MAX) of the stop and checkpoint
        flags, and of the seconds since the last agreement, from which every rank plans the next one alike."""
        if not self.env.distributed:
            return stop, checkpoint_due, elapsed_s
        flags = torch.tensor([float(stop), float(checkpoint_due), elapsed_s], dtype=torch.float64,
                             device=self.t.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop_any, due_any, slowest_s = flags.tolist()
        return bool(stop_any), bool(due_any), slowest_s

    def _report_progress(self, epoch: int, step: int) -> None:
        """Live epoch and step in status.json between epoch ends: rank 0, in the background, at most every
        PROGRESS_EVERY_S, and never queued behind an update still being written."""
        now = time.monotonic()
        if not self.is_main or now - self.last_progress_time < PROGRESS_EVERY_S or self.status_writer.busy():
            return
        self.last_progress_time = now
        self.status_writer.submit(self.run_dir.update_status, epoch=epoch, step=step)

    def _set_status(self, **fields: Any) -> None:
        """A status update that must land now (stop, finish): after the background ones still queued."""
        self.status_writer.wait()
        self.run_dir.update_status(**fields)

    # -------------------------------------------------------------------------------------------------------- loop
    def run(self) -> dict:
        t, tk, log = self.t, self.tk, self.log
        self._build()
        self.best: Optional[dict] = None
        start_epoch, step, batches_done = self._resume()
        restarted = step > 0
        if self.is_main:
            self.run_dir.update_status(state="running", started_at=self.run_dir.read_status().get("started_at")
                                       or now_iso(), host=self.env.hostname, world_size=self.env.world_size,
                                       epoch=start_epoch, step=step, total_steps=self.total_steps,
                                       launcher=self.env.launcher, job_id=self.env.job_id, pid=os.getpid(),
                                       ended_at=None, error=None, error_tail=None, failed_rank=None,
                                       failed_host=None, stop_reason=None)
        log.info("run %s: %d parameters, %d train / %d val / %d test samples, %d ranks on %s, %d steps per epoch",
                 self.run_dir.path, sum(p.numel() for p in self.raw_model.parameters()), len(t.data.train),
                 len(t.data.val), len(t.data.test), self.env.world_size, t.device, self.steps_per_epoch)
        if not restarted:
            torch.manual_seed(tk["seed"] + self.env.rank)  # per-rank dropout/augmentation streams
        self.last_checkpoint_time = time.monotonic()
        progress = self.progress = ProgressBar(self.is_main)
        accum = tk["grad_accum_steps"]
        log_every = tk["log_every_steps"]
        ckpt_every_steps = tk["checkpoint_every_steps"]
        ckpt_every_s = tk["checkpoint_every_minutes"] * 60
        cadence = _Cadence(tk["stop_check_seconds"], log_every, step)
        stop_seen_at: Optional[float] = None
        train_start = time.monotonic()
        loss_sum = torch.zeros((), device=t.device)
        loss_count = 0
        last_loss: Optional[float] = None
        self.model.train()

        for epoch in range(start_epoch, tk["epochs"]):
            sampler = self.train_loader.sampler
            sampler.set_epoch(epoch, start_index=batches_done * self.train_loader.batch_size)
            num_batches = batches_done + len(self.train_loader)
            batch_index = batches_done
            cadence.restart(step)  # the evaluation just done is no training step's time
            for inputs, targets in self.train_loader:
                batch_index += 1
                inputs = inputs.to(t.device, non_blocking=True)
                targets = targets.to(t.device, non_blocking=True)
                boundary = batch_index % accum == 0 or batch_index == num_batches
                # Gradients are all-reduced only on the micro-batch that ends an accumulation window.
                sync = nullcontext() if boundary or not self.env.distributed else self.model.no_sync()
                with sync:
                    with t._autocast():
                        outputs = self.model(inputs)
                        loss = self.loss_fn(outputs.float(), targets if self.classification else targets.float())
                    # Dividing by 1 is exact but still one more autograd node per step: skip it.
                    self.scaler.scale(loss / accum if accum > 1 else loss).backward()
                loss_sum += loss.detach()
                loss_count += 1
                if not boundary:
                    continue
                if tk["grad_clip_norm"]:
                    self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(self.raw_model.parameters(), tk["grad_clip_norm"])
                if self.staging_in_flight:  # the last checkpoint's host copy may still be reading the weights
                    self.checkpointer.staging_ready()
                    self.staging_in_flight = False
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                step += 1

                if stop_seen_at is None and self.t.stop_reason is not None:
                    stop_seen_at = time.monotonic()
                    if not self.env.distributed:
                        cadence.next_step = step  # a lone process has no one to agree with: act at once
                    log.info("stop requested (%s) at step %d; stopping at step %d", self.t.stop_reason, step,
                             max(step, cadence.next_step))
                at_log_point = step % log_every == 0
                due = bool(ckpt_every_steps and step % ckpt_every_steps == 0)
                # Ranks agree at steps they all planned alike (every few seconds, and at every log point), so no step
                # waits on the host.
                if step >= cadence.next_step or at_log_point:
                    time_due = bool(ckpt_every_s and time.monotonic() - self.last_checkpoint_time >= ckpt_every_s)
                    stop, due_any, elapsed_s = self._agree(self.t.stop_reason is not None, due or time_due,
                                                           cadence.elapsed_s())
                    cadence.agreed(step, elapsed_s)
                    due = due or due_any
                    if at_log_point:
                        last_loss = self._log_train(loss_sum, loss_count, epoch, step, train_start)
                        loss_sum.zero_()
                        loss_count = 0
                    if stop:
                        self.save_checkpoint(epoch, step, batch_index, wait=True)
                        reason = self.t.stop_reason or "another rank was asked to stop"
                        after = f", {time.monotonic() - stop_seen_at:.2f}s after the request" if stop_seen_at else ""
                        log.info("stopping at epoch %d step %d (%s%s): checkpoint written", epoch, step, reason, after)
                        if self.is_main:
                            self._set_status(state="stopped", epoch=epoch, step=step, stop_reason=reason,
                                             keep_states=("cancelled",))
                        return {"stopped": True, "epoch": epoch, "step": step, "reason": reason}
                if due:
                    self.save_checkpoint(epoch, step, batch_index)
                progress.update(epoch, tk["epochs"], math.ceil(batch_index / accum), self.steps_per_epoch, last_loss)
            progress.close()
            batches_done = 0
            metrics = t.evaluate("val", self.val_loader)
            if loss_count:
                metrics["train_loss"] = self._log_train(loss_sum, loss_count, epoch, step, train_start, write=False)
                loss_sum.zero_()
                loss_count = 0
            self._end_epoch(epoch, step, metrics)

        self.checkpointer.wait()
        return self._finish(step, train_start)

    def close(self, quiet: bool = False) -> None:
        """Finish any checkpoint and status write and stop DataLoader workers now, not at interpreter exit.

        `quiet` while another error is on its way out: a failed background write must not hide it.
        """
        self.tensorboard.close()
        for writer in (self.checkpointer, self.status_writer):
            try:
                writer.close()
            except Exception:
                if not quiet:
                    raise
        for loader in (getattr(self, name, None) for name in ("train_loader", "val_loader", "test_loader")):
            iterator = getattr(loader, "_iterator", None)
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()

    def _log_train(self, loss_sum: torch.Tensor, count: int, epoch: int, step: int, train_start: float,
                   write: bool = True) -> float:
        """The one place the training loss leaves the device: every `log_every_steps` steps."""
        totals = torch.stack([loss_sum.detach().float(), torch.tensor(float(count), device=loss_sum.device)])
        if self.env.distributed:
            dist.all_reduce(totals)
        loss = (totals[0] / totals[1].clamp(min=1)).item()
        if write:
            lr = self.optimizer.param_groups[0]["lr"]
            self._write_metrics({"epoch": epoch, "step": step, "split": "train", "train_loss": loss, "lr": lr})
            self._report_progress(epoch, step)
            if not self.progress.enabled:
                self.log.info("epoch %d step %d/%d train_loss %.4f lr %.3g (%.1fs)", epoch + 1, step,
                              self.total_steps, loss, lr, time.monotonic() - train_start)
        return loss

    def _end_epoch(self, epoch: int, step: int, metrics: dict) -> None:
        value = metrics.get(self.best_metric)
        if value is None:
            raise ConfigError(f"training_kwargs.best_metric '{self.best_metric}' is not a validation metric; "
                              f"available: {', '.join(sorted(metrics))}")
        improved = self._is_better(value)
        if improved:
            self.best = {"metric": self.best_metric, "value": value, "epoch": epoch, "step": step}
            if self.is_main:
                self._keep_best()
        self._write_metrics({"epoch": epoch, "step": step, "split": "val", **metrics})
        self.log.info("epoch %d/%d done: %s%s", epoch + 1, self.tk["epochs"],
                      " ".join(f"{k} {v:.4f}" for k, v in metrics.items()), " (best)" if improved else "")
        # Checkpoints keep their own cadence (minutes, steps) rather than one per epoch: a short epoch would spend
        # more on the file than on training. The last epoch always ends with one (best.pt, resume with more epochs).
        every_s = self.tk["checkpoint_every_minutes"] * 60
        due = bool(every_s and time.monotonic() - self.last_checkpoint_time >= every_s)
        _, due, _ = self._agree(False, due, 0.0)  # the ranks' clocks differ; a checkpoint is a collective
        if due or epoch + 1 == self.tk["epochs"]:
            self.save_checkpoint(epoch + 1, step, 0)
        if self.is_main:
            self.last_progress_time = time.monotonic()
            self.status_writer.submit(self.run_dir.update_status, epoch=epoch + 1, step=step, metrics=metrics,
                                      best=self.best)

    def _finish(self, step: int, train_start: float) -> dict:
        t = self.t
        train_time = time.monotonic() - train_start
        if self.is_main:
            t.save_weights(self.run_dir.final_weights, step=step)
        if self.env.distributed:
            dist.barrier()
        if self.run_dir.best_weights.is_file():
            t.load_weights(self.run_dir.best_weights)
        results = {**t.evaluate("test", self.test_loader), **t.evaluate("val", self.val_loader),
                   "best": self.best, "epochs": self.tk["epochs"], "steps": step,
                   "train_time_s": round(train_time, 3), "world_size": self.env.world_size}
        if self.is_main:
            write_json(self.run_dir.results_file, results)
            self._write_metrics({"epoch": self.tk["epochs"] - 1, "step": step, "split": "test",
                                 **{k: v for k, v in results.items() if k.startswith("test_")}})
            self._set_status(state="completed", ended_at=now_iso(), step=step,
                             results={k: v for k, v in results.items() if k.startswith(("test_", "val_"))})
        summary = " ".join(f"{k} {v:.4f}" for k, v in results.items() if k.startswith("test_"))
        self.log.info("finished: %s (best %s %.4f at epoch %d); run folder %s", summary,
                      self.best["metric"], self.best["value"], self.best["epoch"] + 1, self.run_dir.path)
        return results


class _Cadence:
    """The steps at which the ranks next compare stop requests and checkpoint deadlines.

    Comparing costs a host-device sync, so not every step; but at the log cadence alone a slow step could make a
    stop miss SLURM's warning (USR2 90 s before the limit). Each comparison also yields the slowest rank's seconds
    since the last one, so every rank computes the same next step: about `target_s` ahead, at least one step, and
    never past the next log point.
    """

    def __init__(self, target_s: float, log_every: int, step: int):
        self.target_s, self.log_every = target_s, log_every
        self.next_step = step + 1  # the first step measures how long steps take
        self.restart(step)

    def restart(self, step: int) -> None:
        """Count time from here (after an evaluation); the next planned step stays."""
        self.since_step, self.since_time = step, time.monotonic()

    def elapsed_s(self) -> float:
        return time.monotonic() - self.since_time

    def agreed(self, step: int, elapsed_s: float) -> None:
        """Plan the next comparison from `elapsed_s`, which must be the same number on every rank."""
        steps = step - self.since_step
        per_step_s = elapsed_s / steps if steps > 0 else 0.0
        ahead = int(self.target_s // per_step_s) if per_step_s > 0 else self.log_every
        next_log_point = (step // self.log_every + 1) * self.log_every
        self.next_step = min(step + max(1, min(self.log_every, ahead)), next_log_point)
        self.restart(step)


def _rank_ordered_mean_hook(process_group, bucket):  # DDP checks these parameters' annotations: leave them bare
    """DDP gradient averaging that sums the ranks' gradients in rank order, whatever the bucket layout.

    A ring all-reduce adds an element's contributions in an order that depends on where the element sits in its
    bucket, and DDP lays buckets out again after the first step, so a resumed run (whose first step uses the initial
    layout) would drift from an uninterrupted one by rounding. Gathering and adding in rank order makes deterministic
    runs bitwise reproducible across resumes, at world_size times the traffic.
    """
    tensor = bucket.buffer()
    group = process_group if process_group is not None else dist.group.WORLD
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    future = dist.all_gather(parts, tensor, group=group, async_op=True).get_future()

    def add_in_rank_order(_: torch.futures.Future) -> torch.Tensor:
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        return total.div_(len(parts))

    return future.then(add_in_rank_order)


def _seed_worker(worker_id: int) -> None:
    """DataLoader workers draw their seeds from torch's per-worker seed, so numpy/random agree with it.

    They also ignore the stop signals: SLURM signals every process of a job step (USR2 before the time limit, TERM
    on scancel), and a worker killed by it would crash the rank that is busy writing its checkpoint. The rank
    decides when to stop and shuts its workers down itself.
    """
    for signum in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model) if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _accepts(target: Any, name: str) -> bool:
    import inspect

    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def check_plugins(config: Mapping) -> None:
    """Resolve the dataset and model names and check their keyword arguments against their signatures."""
    for kind, section, name_key in (("dataset", "dataset_kwargs", "dataset_name"),
                                    ("model", "model_kwargs", "model_name")):
        kwargs = dict(config[section])
        name = kwargs.pop(name_key)
        target = registry.resolve(kind, name)
        provided = ("input_shape", "num_outputs") if kind == "model" else ()
        registry.check_kwargs(kind, name, target, kwargs, provided=provided)
