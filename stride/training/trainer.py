"""The Trainer: resolve a config, build data, model and task, train with validation each epoch, test the best
weights; load any run back for evaluation or prediction.

It owns one run folder (`work_dir/<run>`) and writes everything there. It is handed its place in a distributed job
(`DistEnv`) and never reads the cluster's environment itself. Resuming is the default: if the run folder holds a
checkpoint, `fit()` continues from it exactly (mid-epoch too).
"""
from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from stride import config as config_lib
from stride import placement, registry
from stride.checkpoint import Checkpointer, load_file, save_file
from stride.datasets import DataSplits
from stride.distenv import DistEnv
from stride.errors import ConfigError, RunError
from stride.logs import setup_logging
from stride.rundir import RunDir, find_run, validate_run_name
from stride.training.data import (MODEL_PROVIDED, SPLITS, build_splits, data_info, eval_loader, names_parameter,
                                  to_device)
from stride.training.hooks import Callback
from stride.training.sinks import MetricSink
from stride.training.task import Task, build_task


def resolve_device(name: str, env: DistEnv) -> torch.device:
    """auto: this rank's GPU when CUDA is present, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device=cuda but no CUDA device is visible: use device=auto or device=cpu")
        return torch.device("cuda", placement.device_index(env.local_rank, os.environ.get("CUDA_VISIBLE_DEVICES"),
                                                           env.node_visible_gpus, torch.cuda.device_count()))
    return torch.device(name)


class Trainer:
    """Train, validate, test and save one run of an experiment.

    >>> trainer = Trainer(work_dir="experiments/digits", model_kwargs={"model_name": "MLP"})
    >>> results = trainer.fit()          # work_dir/0: config.json, logs/, checkpoints/, weights/, results.json
    >>> Trainer(work_dir="experiments/digits").load_run("0").evaluate("test")

    Subclasses work on every rank when they live in an importable module (config key `trainer_class`); the usual
    way to change training is a plug-in instead: a Task (loss, metrics), a Callback, a MetricSink.
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
        task_kwargs: Optional[Mapping] = None,
        callbacks: Optional[Sequence[Any]] = None,
        sinks: Optional[Sequence[Any]] = None,
        config: Optional[Mapping] = None,
        overrides: Sequence[str] = (),
        config_files: Sequence[Union[str, Path]] = (),
        dist_env: Optional[DistEnv] = None,
        run_dir: Optional[RunDir] = None,
    ):
        """Resolve and validate the config, then load the data and build the model.

        `config` is a complete resolved config (e.g. a run's config.json); otherwise the keyword arguments, YAML
        `config_files` and `key=value` `overrides` are layered over the defaults and work_dir/config.yaml.
        `callbacks` and `sinks` take import paths (recorded in config.json, so they reach every rank) or objects
        (this process only).
        """
        self.extra_callbacks = [c for c in callbacks or () if isinstance(c, Callback)]
        self.extra_sinks = [s for s in sinks or () if isinstance(s, MetricSink)]
        given = {"work_dir": str(work_dir) if work_dir is not None else None, "dataset_kwargs": dataset_kwargs,
                 "load_data_kwargs": load_data_kwargs, "model_kwargs": model_kwargs, "device": device, "run": run,
                 "training_kwargs": training_kwargs, "distributed_kwargs": distributed_kwargs, "slurm": slurm,
                 "task_kwargs": task_kwargs,
                 "callbacks": [c for c in callbacks if not isinstance(c, Callback)] if callbacks else None,
                 "sinks": [s for s in sinks if not isinstance(s, MetricSink)] if sinks is not None else None}
        self.env = dist_env or DistEnv()
        self.run_dir = run_dir
        self.config = self.comprehend_config(
            config=config, layers=[{k: v for k, v in given.items() if v is not None}],
            overrides=overrides, config_files=config_files)
        self.device = resolve_device(self.config["device"], self.env)
        self._data: Optional[DataSplits] = None
        self._data_for: Optional[Path] = None
        self._task: Optional[Task] = None
        self.shapes: Optional[dict] = None
        self.stop_reason: Optional[str] = None
        self._model: Optional[nn.Module] = None

    @property
    def model(self) -> nn.Module:
        """The model, built on first use: `Trainer(work_dir=...).load_run(run)` never builds the default one."""
        if self._model is None:
            self._model = self.build_model()
        return self._model

    @model.setter
    def model(self, model: nn.Module) -> None:
        self._model = model

    # ----------------------------------------------------------------------------------------------- configuration
    def comprehend_config(self, config: Optional[Mapping] = None, layers: Sequence[Mapping] = (),
                          overrides: Sequence[str] = (), config_files: Sequence[Union[str, Path]] = ()) -> dict:
        """Resolve the layered config and check every plug-in's name and keyword arguments."""
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
    @property
    def data(self) -> DataSplits:
        """The dataset's splits, built on first use (a model loaded for inference never reads the training set)."""
        if self._data is None:
            self._data = self.load_data()
        return self._data

    @data.setter
    def data(self, splits: DataSplits) -> None:
        self._data = splits

    def load_data(self, splits: Optional[Sequence[str]] = None) -> DataSplits:
        """Build the splits. Builders that take `run_dir` get the run folder; with several ranks, rank 0 builds
        first (and writes what it derives there), then the others, which find it."""
        run_path = self.run_dir.path if self.run_dir is not None else None
        builder_writes = names_parameter(self._dataset_builder(), "run_dir") and run_path is not None
        ordered = builder_writes and self.env.distributed and dist.is_initialized()
        if ordered and not self.env.is_main:
            dist.barrier()
        data = build_splits(self.config, run_path, splits)
        if ordered and self.env.is_main:
            dist.barrier()
        self._data_for = run_path
        return data

    def _dataset_builder(self) -> Any:
        return registry.resolve("dataset", self.config["dataset_kwargs"]["dataset_name"])

    def _shape_info(self) -> dict:
        if self.shapes is None:
            self.shapes = data_info(self.data)
        return self.shapes

    @property
    def task(self) -> Task:
        """The task (loss and metrics), set up for the data, or for the shapes a loaded run recorded."""
        if self._task is None:
            data = self._data
            if data is None and self.shapes is not None:  # a loaded run: what the task needs, without the data
                data = DataSplits(None, None, None, tuple(self.shapes.get("input_shape") or ()),
                                  self.shapes.get("num_outputs"), self.shapes.get("task") or "classification")
            self._task = build_task(self.config, data if data is not None else self.data)
        return self._task

    # ------------------------------------------------------------------------------------------------------- model
    def build_model(self) -> nn.Module:
        kwargs = dict(self.config["model_kwargs"])
        name = kwargs.pop("model_name")
        target = registry.resolve("model", name)
        shapes = self._shape_info()
        for key, value in (("input_shape", tuple(shapes["input_shape"] or ())), ("num_outputs",
                                                                                  shapes["num_outputs"])):
            if key not in kwargs and names_parameter(target, key):
                kwargs[key] = value
        tk = self.config["training_kwargs"]
        seed = tk["model_seed"] if tk["model_seed"] is not None else tk["seed"]
        torch.manual_seed(seed)  # identical initial weights on every rank
        model = registry.call_plugin("model", name, target, kwargs,
                                     shown={k: v for k, v in kwargs.items() if k not in MODEL_PROVIDED})
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model '{name}' built a {type(model).__name__}, not a torch.nn.Module")
        return model.to(self.device)

    @property
    def raw_model(self) -> nn.Module:
        return _unwrap(self.model)

    def save_weights(self, path: Union[str, Path], **extra: Any) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"model": self.raw_model.state_dict(), **extra}, path)
        return path

    def load_weights(self, path: Union[str, Path]) -> "Trainer":
        path = Path(path)
        if not path.is_file():
            raise RunError(f"weights file '{path}' does not exist")
        state = load_file(path, map_location=self.device)
        self.raw_model.load_state_dict(state["model"] if "model" in state else state)
        return self

    def load_run(self, run: Union[str, Path], weights: str = "best",
                 splits: Optional[Sequence[str]] = None) -> "Trainer":
        """Restore a run's config and weights (best, final, or the latest checkpoint) from its folder.

        The model is rebuilt from the shapes the run recorded, so no data is read; `trainer.data` is built on first
        use, and `splits=("test",)` builds only those splits (for builders that take `splits`).
        """
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
        self._data, self._task = None, None
        self.shapes = (run_dir.read_metadata() or {}).get("data")
        if splits is not None:
            unknown = [s for s in splits if s not in SPLITS]
            if unknown:
                raise ConfigError(f"load_run splits: unknown split '{unknown[0]}'; choose from {', '.join(SPLITS)}")
            self._data = self.load_data(splits)
            self.shapes = self.shapes or data_info(self._data)
        self._model = None
        self.model  # from the recorded shapes: no data read
        choices = {"best": [run_dir.best_weights, run_dir.final_weights],
                   "final": [run_dir.final_weights, run_dir.best_weights]}.get(weights, [])
        for path in choices:
            if path.is_file():
                return self.load_weights(path)
        latest = Checkpointer(run_dir.checkpoints_dir).load_latest(self.device)
        if latest is not None:
            self.raw_model.load_state_dict(latest[0]["model"])
            return self
        raise RunError(f"run {run_dir.path} has no weights or checkpoint yet: it has not finished an epoch")

    # ---------------------------------------------------------------------------------------------------- training
    def request_stop(self, reason: str) -> None:
        """Ask the loop to checkpoint and return at the next step boundary (safe to call from a signal handler)."""
        self.stop_reason = reason

    def prepare_run_dir(self, command: Optional[Sequence[str]] = None) -> RunDir:
        """Allocate the run folder (unless one was given) and write config.json, metadata.json and status.json."""
        from stride.provenance import create_run

        if self.run_dir is None:
            self.config["trainer_class"] = self.config["trainer_class"] or trainer_class_path(type(self))
            self.run_dir = create_run(self.config, command)
        self.run_dir.make_subdirs()
        return self.run_dir

    def fit(self) -> dict:
        """Train (resuming from the run folder's latest checkpoint if it has one), test, and return the results."""
        from stride.training.loop import Loop

        self.model  # built (or its one-line error raised) before the run folder exists
        if self.env.is_main:
            run_dir = self.prepare_run_dir()
        else:
            assert self.run_dir is not None, "ranks other than 0 are handed the run folder rank 0 prepared"
            run_dir = self.run_dir
        log = setup_logging(run_dir.rank_log(self.env.rank), self.env.hostname, self.env.rank,
                            self.env.local_rank, console=self.env.is_main)
        if self._data is not None and self._data_for != run_dir.path and names_parameter(self._dataset_builder(),
                                                                                          "run_dir"):
            self._data, self._task = self.load_data(), None  # built before the folder existed: now with it
        if self.env.is_main:
            info = data_info(self.data)
            if run_dir.read_metadata().get("data") != info:
                run_dir.update_metadata(lambda m: m.update(data=info))
        tk = self.config["training_kwargs"]
        if self.device.type == "cuda":
            # Object collectives (RNG states, the checkpoint choice) and barriers use the current device: without
            # this, every rank of a node would use GPU 0.
            torch.cuda.set_device(self.device)
        if tk["deterministic"]:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS needs a fixed workspace
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        loop = Loop(self, run_dir, log)
        try:
            results = loop.run()
        except BaseException:
            loop.close(quiet=True)
            raise
        loop.close()
        return results

    # ------------------------------------------------------------------------------------------ evaluation, use
    @torch.no_grad()
    def evaluate(self, split: str = "test", loader: Optional[DataLoader] = None) -> dict:
        """The task's metrics over a whole split, from sums reduced across ranks: {f"{split}_{name}": value}."""
        if loader is None:
            if split not in SPLITS:
                raise ConfigError(f"evaluate: unknown split '{split}'; choose from {', '.join(SPLITS)}")
            loader = eval_loader(getattr(self.data, split), self.config, self.env.rank, self.env.world_size)
        model, task = self.model, self.task
        was_training = model.training
        model.eval()
        sums: dict[str, torch.Tensor] = {}
        for batch in loader:
            with self.autocast():
                part = task.eval_sums(model, to_device(batch, self.device))
            for key, value in part.items():
                value = value.detach().to(torch.float64)
                sums[key] = sums[key] + value if key in sums else value.clone()
        if self.env.distributed and dist.is_initialized():
            sums = _all_reduce_sums(sums, self.device)
        model.train(was_training)
        return {f"{split}_{name}": value for name, value in task.compute(sums).items()}

    @torch.no_grad()
    def predict(self, inputs: Any) -> Any:
        """The model's outputs for a batch of new inputs (moved to the device, eval mode, no gradients)."""
        was_training = self.model.training
        self.model.eval()
        try:
            with self.autocast():
                return self.task.predict(self.model, to_device(inputs, self.device))
        finally:
            self.model.train(was_training)

    def autocast(self):
        precision = self.config["training_kwargs"]["precision"]
        if precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)


def _all_reduce_sums(sums: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """One all-reduce for every sum. The ranks first agree on the names and shapes: a rank whose shard of a small
    split is empty has none of its own."""
    layouts: list = [None] * dist.get_world_size()
    dist.all_gather_object(layouts, {key: tuple(value.shape) for key, value in sums.items()})
    layout: dict[str, tuple] = {}
    for rank_layout in layouts:
        layout.update(rank_layout)
    names = sorted(layout)
    flat = torch.cat([(sums[name] if name in sums else torch.zeros(layout[name], dtype=torch.float64,
                                                                   device=device)).reshape(-1) for name in names]
                     ) if names else torch.zeros(0, dtype=torch.float64, device=device)
    dist.all_reduce(flat)
    out, offset = {}, 0
    for name in names:
        size = int(torch.Size(layout[name]).numel())
        out[name] = flat[offset:offset + size].reshape(layout[name])
        offset += size
    return out


def trainer_class_path(cls: type) -> Optional[str]:
    """A Trainer subclass's import path for config.json (so every rank builds it); None for stride's own.

    A class that cannot be imported by path (defined in __main__, a notebook or a function) cannot reach other
    processes: that is refused where they would be started.
    """
    if cls is Trainer:
        return None
    return f"{cls.__module__}:{cls.__qualname__}"


def trainer_class(config: Mapping) -> type:
    """The class every rank builds: config['trainer_class'] or Trainer."""
    path = config.get("trainer_class")
    if not path:
        return Trainer
    module = path.partition(":")[0]
    if module == "__main__" or "<locals>" in path:
        raise ConfigError(f"trainer_class {path} is defined in a script or function, which other processes cannot "
                          f"import: move the subclass into a module on PYTHONPATH, or better write a plug-in "
                          f"(a stride.Task for the loss and metrics, a stride.Callback for hooks, a "
                          f"stride.MetricSink for logging) and name it in the config")
    cls = registry.import_object("trainer_class", path)
    if not (isinstance(cls, type) and issubclass(cls, Trainer)):
        raise ConfigError(f"trainer_class {path} is not a subclass of stride.Trainer")
    return cls


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model) if isinstance(model, nn.parallel.DistributedDataParallel) else model


def check_plugins(config: Mapping) -> None:
    """Resolve every plug-in the config names (dataset, model, task, optimizer, scheduler, callbacks, sinks,
    trainer class) and check their keyword arguments against their signatures."""
    from stride.training import recipe
    from stride.training.data import DATASET_PROVIDED

    for kind, section, name_key, provided in (("dataset", "dataset_kwargs", "dataset_name", DATASET_PROVIDED),
                                              ("model", "model_kwargs", "model_name", MODEL_PROVIDED),
                                              ("task", "task_kwargs", "task_name", ())):
        kwargs = dict(config[section])
        name = kwargs.pop(name_key, "auto")
        target = registry.resolve(kind, name)
        registry.check_kwargs(kind, name, target, kwargs, provided=provided)
    recipe.check_optimizer(config["training_kwargs"])
    recipe.check_scheduler(config["training_kwargs"])
    for kind, key in (("callback", "callbacks"), ("sink", "sinks")):
        for spec in config[key]:
            name = spec.get("name") if isinstance(spec, Mapping) else spec
            if not isinstance(name, str) or not name:
                raise ConfigError(f"config key '{key}' holds {spec!r}: give an import path 'pkg.module:Class' or "
                                  f"{{name: PATH, ...}}")
            kwargs = {k: v for k, v in spec.items() if k != "name"} if isinstance(spec, Mapping) else {}
            registry.check_kwargs(kind, name, registry.resolve(kind, name), kwargs)
    if config.get("trainer_class") and not str(config["trainer_class"]).startswith("__main__"):
        trainer_class(config)
