"""Built-in defaults + the experiment's config.yaml + YAML files + `key.sub=value` overrides -> one validated config.

Standard library and PyYAML only, so the CLI resolves, prints and validates configs without importing torch.
The resolved config is a plain JSON-ready dict: it is what `config.json` holds and all a job needs to rebuild a run.
"""
from __future__ import annotations

import collections.abc
import copy
import dataclasses
import functools
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import yaml

from stride.errors import ConfigError, did_you_mean

EXPERIMENT_CONFIG_NAME = "config.yaml"


@dataclass
class LoadDataKwargs:
    batch_size: int = 64
    """Samples per step on each process (the global batch is batch_size x world size x grad_accum_steps)."""
    eval_batch_size: Optional[int] = None
    """Samples per validation/test step; None means 4 x batch_size."""
    num_workers: Union[int, str] = 0
    """DataLoader worker processes per rank; 0 loads in the training process (best for in-memory data); auto: one per
    CPU of the rank beyond its own (from its affinity mask and Slurm's CPUs per task), at most 8."""
    pin_memory: bool = True
    """Page-locked host batches for asynchronous copies; only used on CUDA."""
    persistent_workers: bool = True
    """Keep workers alive across epochs (only when num_workers > 0)."""
    worker_start: str = "auto"
    """How DataLoader workers start: fork, forkserver or spawn; auto: forkserver in the ranks stride launches (a fork
    of a rank whose communication threads enter Python at that moment can leave the worker deadlocked in CPython
    3.11's fork handling, and the job hung), fork elsewhere (a lone process, where it is safe and shares memory)."""
    shuffle: bool = True
    drop_last: bool = False


@dataclass
class TrainingKwargs:
    epochs: int = 20
    optimizer: str = "adamw"
    """Any torch.optim optimizer by name, case-insensitive (sgd, adam, adamw, rmsprop, ...), or an import path
    'pkg.module:Class'; built with the trainable parameters, lr, weight_decay (momentum for SGD) and
    optimizer_kwargs."""
    optimizer_kwargs: dict = field(default_factory=dict)
    """More keyword arguments of the optimizer, e.g. {betas: [0.9, 0.95], eps: 1e-8}; checked against its signature."""
    lr: float = 3e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    """SGD's momentum; other optimizers' own settings go in optimizer_kwargs."""
    scheduler: str = "cosine"
    """constant or cosine (per step, after warmup_steps); step, multistep, exponential (per epoch); plateau (per
    epoch, on the best metric); or an import path to a factory (optimizer, **scheduler_kwargs) -> LR scheduler,
    stepped every optimizer step."""
    scheduler_kwargs: dict = field(default_factory=dict)
    """The scheduler's own arguments: step {step_size, gamma}, multistep {milestones, gamma}, exponential {gamma},
    plateau {factor, patience, threshold, cooldown, min_lr}, cosine {min_lr_ratio}."""
    warmup_steps: int = 0
    """Linear warmup over this many optimizer steps (constant and cosine schedules)."""
    early_stopping_patience: int = 0
    """Stop when the best metric has not improved by early_stopping_min_delta for this many epochs (0: never)."""
    early_stopping_min_delta: float = 0.0
    grad_clip_norm: Optional[float] = None
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step; gradients are all-reduced only on the last one (no_sync)."""
    precision: str = "fp32"
    """One of fp32, bf16, fp16 (autocast; fp16 uses a grad scaler)."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    seed: int = 0
    """Seeds the data order, dropout and augmentation (and the initial weights unless model_seed is set)."""
    model_seed: Optional[int] = None
    """Seeds the model's initial weights apart from the data order; None: seed."""
    deterministic: bool = False
    """Deterministic algorithms and seeded workers: bitwise-reproducible runs, somewhat slower."""
    log_every_steps: int = 50
    """Read the on-device loss and write a metrics line every N optimizer steps (no per-step host sync)."""
    stop_check_seconds: float = 5.0
    """With several ranks, how often (about) they agree on stop requests and checkpoint deadlines (0: every step)."""
    best_metric: Optional[str] = None
    """Validation metric that picks the best weights (and drives plateau schedules and early stopping); None: the
    task's own choice (val_accuracy for classification, val_loss otherwise)."""
    best_mode: str = "auto"
    """max, min, or auto (min for losses and errors, max for accuracy, f1, auc and the like)."""
    checkpoint_every_steps: int = 0
    """Also checkpoint every N optimizer steps (0: by time only, plus the last epoch and stop requests)."""
    checkpoint_every_minutes: float = 5.0
    """Checkpoint when this much wall time passed since the last one (0: off), checked at log points and epoch ends;
    the last epoch and every stop request also end with one."""
    keep_last_checkpoints: int = 2
    async_checkpoint: bool = True
    """Snapshot to host memory and write in the background, so training does not stall on disk."""
    check_batch: bool = True
    """Before a run folder is written, push one batch through the model and the task (shapes, label range)."""


@dataclass
class DistributedKwargs:
    backend: str = "auto"
    """auto (nccl with GPUs, gloo on CPU), nccl or gloo."""
    init_timeout_s: float = 120.0
    """Bound on the rendezvous: a broken one fails in this many seconds instead of hanging."""
    timeout_s: float = 600.0
    """Bound on each collective once training runs."""
    env: dict = field(default_factory=dict)
    """Environment variables every rank sets for itself before torch.distributed and CUDA start, on the host and in
    every container runtime, over the site's values: NCCL_SOCKET_IFNAME, NCCL_IB_HCA, GLOO_SOCKET_IFNAME... Each
    rank checks first that the interfaces they name exist on its node. Written into config.json: not for secrets
    (container.secret_env passes those by name)."""
    nccl_debug: bool = False
    """NCCL's INFO log of its set-up and network, one file per rank (logs/nccl_rank_N.log); `stride status RUN` says
    which version, transport and NICs NCCL used."""


@dataclass
class SlurmKwargs:
    nodes: int = 1
    gpus_per_node: int = 0
    """GPUs per node; one task per GPU."""
    tasks_per_node: int = 1
    """Tasks per node for CPU jobs; with gpus_per_node > 0 it is set to that (one task per GPU)."""
    cpus_per_task: Optional[int] = None
    gpu_binding: str = "node"
    """Which GPUs of its node each rank sees: node (all of them, so NVLink/P2P work between the node's ranks; rank i
    uses the i-th), task (one GPU per task, --gpus-per-task=1), or closest (those nearest the task's CPUs,
    --gpu-bind=closest). Each rank picks its device right in every mode, also where Slurm narrowed
    CUDA_VISIBLE_DEVICES."""
    mem_gb: Optional[float] = None
    time_min: Optional[int] = None
    """Time limit in minutes; None leaves it to the partition's default."""
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    exclusive: bool = False
    job_name: Optional[str] = None
    sbatch_args: dict = field(default_factory=dict)
    """Any other sbatch option, e.g. {mail-type: END}; values are quoted. Options stride sets itself (nodes, array,
    signal, output, requeue...) are refused, naming the flag or key to use instead."""
    setup: list = field(default_factory=list)
    """Shell lines run before the ranks start, e.g. 'module load cuda'."""
    max_timeout_requeues: int = 3
    """How often a job that hits its time limit is requeued (preemptions do not count)."""
    max_crash_requeues: int = 1
    """How often a crashed job is retried; never twice in a row for the same error."""
    signal_delay_s: int = 90
    """Seconds before the time limit at which SLURM sends USR2 so the run can checkpoint."""
    work_dir_shared: bool = False
    """The compute nodes see work_dir even where it looks node-local (/tmp of a one-machine test cluster, as the
    `local` profile says): no warning about it."""


@dataclass
class ContainerKwargs:
    image: Optional[str] = None
    """The image every rank runs in: a .sif file or image folder (Apptainer, Charliecloud, Podman) or an image name
    in Docker's/Podman's store; None runs on the host."""
    runtime: str = "auto"
    """auto, apptainer, docker, podman or charliecloud; auto: .sif -> apptainer, folder -> charliecloud (else
    apptainer), name -> docker (else podman)."""
    executable: Optional[str] = None
    """The runtime's program when not the usual name on PATH, e.g. singularity for runtime apptainer."""
    python: str = "python3"
    """The image's Python that runs each rank."""
    binds: list = field(default_factory=list)
    """More host paths to mount: 'SRC', 'SRC:DST' or 'SRC:DST:ro'; work_dir and /etc/hosts are always mounted."""
    env: dict = field(default_factory=dict)
    """Variables set inside the container, e.g. {PYTHONPATH: /code}."""
    secret_env: list = field(default_factory=list)
    """Names of variables taken from the submitting shell's environment and handed to every rank by name only (API
    keys, tokens), e.g. [WANDB_API_KEY]: their values never enter config.json, metadata.json, the sbatch script or a
    command line. Honoured with or without an image."""
    gpus: Any = "auto"
    """GPU pass-through (--nv, --gpus all, CDI): auto (on when the run asks for GPUs), true or false."""
    runtime_args: list = field(default_factory=list)
    """More arguments for `apptainer exec`, `docker run`, `podman run` or `ch-run`, placed before the image."""


@dataclass
class ProvenanceKwargs:
    copy_untracked: bool = False
    """Copy the content of files git does not track yet (a new plug-in module) into the run's git.diff; off, they are
    recorded by name, size and sha256 only, since an untracked file may hold a secret (.env, credentials). Even on,
    secret-looking names (.env*, *.pem, *.key, id_*, credentials*, .netrc) are never copied."""
    max_untracked_bytes: int = 1 << 20
    """With copy_untracked: the most bytes of untracked content one record copies, in total; the files beyond it are
    recorded by name and hash only."""


@dataclass
class Config:
    work_dir: Optional[str] = None
    """The experiment folder; each run is a subfolder."""
    run: Optional[str] = None
    """The run's folder name inside work_dir; None means the next free integer."""
    device: str = "auto"
    """auto (CUDA if present, else CPU), cpu, cuda or cuda:N."""
    dataset_kwargs: dict = field(default_factory=lambda: {"dataset_name": "digits"})
    """dataset_name (registered name or 'pkg.module:attr') and its keyword arguments."""
    load_data_kwargs: LoadDataKwargs = field(default_factory=LoadDataKwargs)
    model_kwargs: dict = field(default_factory=lambda: {"model_name": "CNN"})
    """model_name (registered name or 'pkg.module:attr') and its keyword arguments."""
    task_kwargs: dict = field(default_factory=lambda: {"task_name": "auto"})
    """task_name and its keyword arguments: how a batch becomes a loss and which metrics are measured. auto: the
    dataset's task (classification or regression); model_loss: the model returns its own loss; or a registered
    name or import path of a stride.Task."""
    callbacks: list = field(default_factory=list)
    """Hooks run on rank 0 at log points and epoch ends: import paths 'pkg.module:Class', or {name: PATH, **kwargs}."""
    sinks: list = field(default_factory=lambda: ["tensorboard"])
    """Where metrics go besides metrics.jsonl (always written): tensorboard, or import paths / {name: PATH, **kwargs}
    of stride.MetricSink classes; written from rank 0."""
    trainer_class: Optional[str] = None
    """The Trainer subclass every rank builds, as an import path; None: stride's Trainer."""
    training_kwargs: TrainingKwargs = field(default_factory=TrainingKwargs)
    distributed_kwargs: DistributedKwargs = field(default_factory=DistributedKwargs)
    slurm: SlurmKwargs = field(default_factory=SlurmKwargs)
    container: ContainerKwargs = field(default_factory=ContainerKwargs)
    provenance: ProvenanceKwargs = field(default_factory=ProvenanceKwargs)
    """What a run records about the code it came from (metadata.json's git, the git.diff beside it)."""


CHOICES: dict[str, tuple[str, ...]] = {
    "training_kwargs.precision": ("fp32", "bf16", "fp16"),
    "training_kwargs.best_mode": ("auto", "max", "min"),
    "distributed_kwargs.backend": ("auto", "nccl", "gloo"),
    "container.runtime": ("auto", "apptainer", "docker", "podman", "charliecloud"),
    "slurm.gpu_binding": ("node", "task", "closest"),
    "load_data_kwargs.worker_start": ("auto", "fork", "forkserver", "spawn"),
}
POSITIVE = {
    "load_data_kwargs.batch_size", "load_data_kwargs.eval_batch_size", "training_kwargs.epochs",
    "training_kwargs.lr", "training_kwargs.grad_accum_steps", "training_kwargs.log_every_steps",
    "training_kwargs.keep_last_checkpoints", "distributed_kwargs.init_timeout_s", "distributed_kwargs.timeout_s",
    "slurm.nodes", "slurm.time_min", "slurm.cpus_per_task", "slurm.mem_gb",
}
NON_NEGATIVE = {
    "load_data_kwargs.num_workers", "training_kwargs.weight_decay", "training_kwargs.warmup_steps",
    "training_kwargs.checkpoint_every_steps", "training_kwargs.checkpoint_every_minutes",
    "training_kwargs.stop_check_seconds", "training_kwargs.early_stopping_patience",
    "training_kwargs.early_stopping_min_delta", "training_kwargs.model_seed",
    "slurm.gpus_per_node", "slurm.tasks_per_node", "slurm.max_timeout_requeues", "slurm.signal_delay_s",
    "slurm.max_crash_requeues", "provenance.max_untracked_bytes",
}
class Range(typing.NamedTuple):
    """The numbers a key accepts: from `low` (above it when not `low_inclusive`) to below `high`; None: unbounded."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_inclusive: bool = True
    why: str = ""

    def holds(self, value: float) -> bool:
        above = self.low is None or (value >= self.low if self.low_inclusive else value > self.low)
        return above and (self.high is None or value < self.high)

    def describe(self) -> str:
        low = "" if self.low is None else f"{_bound_text(self.low)} {'<=' if self.low_inclusive else '<'} "
        high = "" if self.high is None else f" < {_bound_text(self.high)}"
        return f"{low}value{high}" + (f" ({self.why})" if self.why else "")


_SEED_RANGE = Range(0, 2**63, why="torch.manual_seed takes 0 <= seed < 2**64; numpy gets seed % 2**32")
# Bounds beyond POSITIVE/NON_NEGATIVE, where the library that consumes a key has its own limits.
RANGES: dict[str, Range] = {
    "training_kwargs.grad_clip_norm": Range(0, low_inclusive=False, why="a negative bound trains uphill; null: off"),
    "training_kwargs.momentum": Range(0, why="torch.optim.SGD refuses negative momentum"),
    "training_kwargs.seed": _SEED_RANGE,
    "training_kwargs.model_seed": _SEED_RANGE,
    "distributed_kwargs.init_timeout_s": Range(0, 1e9, low_inclusive=False, why="a datetime.timedelta of seconds"),
    "distributed_kwargs.timeout_s": Range(0, 1e9, low_inclusive=False, why="a datetime.timedelta of seconds"),
    "slurm.signal_delay_s": Range(0, 65536, why="sbatch --signal takes 0 to 65535 seconds"),
}
# Every integer key must fit the C int64 that torch, numpy and Slurm read it into.
INT_LIMIT = 2**63
# Sections whose keys belong to the chosen plug-in; they are checked against its signature, not here.
FREE_FORM = {"dataset_kwargs", "model_kwargs", "task_kwargs", "training_kwargs.optimizer_kwargs",
             "training_kwargs.scheduler_kwargs"}

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_DEVICE = re.compile(r"(auto|cpu|cuda|cuda:\d+|mps)\Z")
# Every string of a config (keys too) may reach the sbatch script, a command line, a file name or a status table:
# control characters (line breaks, NUL, ESC, tab...), Unicode line/paragraph separators, bidirectional overrides and
# lone surrogates (undecodable bytes) are refused. A line break in a value would end an `#SBATCH` line and start a
# shell line.
_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
_UNSAFE_TEXT = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
# YAML from users is bounded: a few hundred bytes of nested aliases ("billion laughs") expand to billions of values.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_VALUES = 10_000
"""Values in one document, every use of an alias counted in full."""
MAX_YAML_DEPTH = 50


def defaults() -> dict:
    """The built-in defaults as a fresh nested dict."""
    return dataclasses.asdict(Config())


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, Any]:
    """A section's declared types (cached: resolving a 1,000-point sweep asks for them thousands of times)."""
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is Union:
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin in (list, tuple, collections.abc.Sequence):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"a list of {_describe(args[0]).split(' ', 1)[-1]}s" if len(args) == 1 else "a list"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string", list: "a list",
            tuple: "a list", dict: "a mapping"}.get(origin or tp, getattr(tp, "__name__", str(tp)))


class YamlRefused(ConfigError):
    """YAML that parses but that stride will not take (too big, too deep, a key given twice); the message continues
    a sentence that names the source, e.g. "config file 'a.yaml' " + message."""


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader that counts values as it composes them, every alias counted in full, refusing documents
    past MAX_YAML_VALUES or MAX_YAML_DEPTH (and recursive aliases), and refusing a key repeated in one mapping
    (PyYAML would silently keep the last)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._composed = 0
        self._sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (values, depth), aliases expanded

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = self.anchors.get(event.anchor)
            if node is not None and id(node) not in self._sizes:
                raise YamlRefused(f"has an alias *{event.anchor} inside its own anchor (line "
                                  f"{event.start_mark.line + 1}): a recursive structure is not a config; remove it")
            return super().compose_node(parent, index)
        mark = self.peek_event().start_mark
        self._depth += 1
        self._composed += 1
        if self._depth > MAX_YAML_DEPTH:
            raise YamlRefused(f"nests deeper than {MAX_YAML_DEPTH} levels (line {mark.line + 1}): flatten it")
        if self._composed > MAX_YAML_VALUES:
            raise YamlRefused(f"holds more than {MAX_YAML_VALUES} values (line {mark.line + 1}): a config needs far "
                              f"fewer; is it really a config?")
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        sizes = [self._sizes[id(child)] for child in children]
        size, depth = 1 + sum(n for n, _ in sizes), 1 + max((d for _, d in sizes), default=0)
        if size > MAX_YAML_VALUES:
            raise YamlRefused(f"expands to more than {MAX_YAML_VALUES} values (line {mark.line + 1}; an alias counts "
                              f"in full each time it is used): remove the nested aliases")
        if depth > MAX_YAML_DEPTH:
            raise YamlRefused(f"nests deeper than {MAX_YAML_DEPTH} levels through aliases (line {mark.line + 1}): "
                              f"flatten it")
        self._sizes[id(node)] = (size, depth)
        return node

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` then `key: ...` is YAML's way to override a merged key
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = first_line.get(key)
                except TypeError:
                    continue  # an unhashable key: PyYAML's own error names it
                line = key_node.start_mark.line + 1
                if seen is not None:
                    raise YamlRefused(f"gives the key {json.dumps(key, default=str)} twice in one mapping (lines "
                                      f"{seen} and {line}): YAML would keep only the last and drop the first; "
                                      f"merge them into one")
                first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """Parse YAML from a user (a config file, a profile, an override's value) with bounded size and depth.

    Raises YamlRefused for documents stride will not take, yaml.YAMLError for invalid YAML.
    """
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except (ValueError, OverflowError) as exc:  # PyYAML builds ints, floats and dates with Python's own parsers
        raise YamlRefused(f"holds a value Python cannot read: {str(exc).splitlines()[0][:120]}") from None
    finally:
        loader.dispose()


def parse_value(text: str) -> Any:
    """Parse an override's value as a YAML scalar or list: `3e-4`, `[64,64]`, `true`, `null`, `ResNet`."""
    if _NUMBER.match(text.strip()):
        number = float(text)
        try:
            return int(text) if re.fullmatch(r"[+-]?\d+", text.strip()) else number
        except ValueError:  # Python refuses integers of more than 4300 digits
            raise ConfigError(f"the number {text.strip()[:20]}... has {len(text.strip())} digits: give a number that "
                              f"fits 64 bits") from None
    try:
        value = load_yaml(text) if text.strip() else None
    except YamlRefused as exc:
        raise ConfigError(f"the value {json.dumps(text[:40])}{'...' if len(text) > 40 else ''} {exc}") from None
    except yaml.YAMLError:
        return text
    return _python_words(value)


_PYTHON_WORDS = {"None": None, "True": True, "False": False}


def _python_words(value: Any) -> Any:
    """The seed's overrides were Python literals: bare None/True/False (also inside lists) mean what they say."""
    if isinstance(value, str):
        return _PYTHON_WORDS.get(value, value)
    if isinstance(value, list):
        return [_python_words(item) for item in value]
    return value


def parse_override(item: str) -> tuple[str, Any]:
    """`key.sub=value` -> ("key.sub", parsed value)."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(one_line(f"cannot read override '{item}': expected key=value, e.g. training_kwargs.lr=3e-4"))
    if key.startswith("--"):
        raise ConfigError(one_line(f"cannot read override '{item}': write it as {key[2:]}=..., without the dashes"))
    return key, parse_value(value)


def load_yaml_file(path: Union[str, Path]) -> dict:
    """Read one YAML config file; every failure is one ConfigError line."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file '{path}' is a folder, not a YAML file: name the file inside it")
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist: check the path")
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise ConfigError(f"config file '{path}' has {size} bytes: a config is far smaller (at most "
                              f"{MAX_YAML_BYTES} bytes); is it really a config file?")
        data = load_yaml(path.read_text(encoding="utf-8"))
    except YamlRefused as exc:
        raise ConfigError(f"config file '{path}' {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file '{path}' is not UTF-8 text (byte {exc.start}): is it really a YAML "
                          f"file?") from None
    except OSError as exc:
        raise ConfigError(f"config file '{path}' cannot be read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file '{path}' is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys, not {type(data).__name__}")
    return data


def _known_keys(cls: type = Config, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in _field_types(cls).items():
        full = prefix + name
        keys.append(full)
        if dataclasses.is_dataclass(tp):
            keys.extend(_known_keys(tp, full + "."))
    return keys


def known_keys() -> list[str]:
    """Every dotted key the schema knows (sections and their fields)."""
    return _known_keys()


def _suggest_key(dotted: str) -> str:
    """Suggest keys spelled alike at the same depth, or the full path of a key given without its section."""
    known = _known_keys()
    in_a_section = [k for k in known if k.endswith("." + dotted)]
    if in_a_section:
        return " (did you mean " + " or ".join(f"'{k}'" for k in in_a_section) + "?)"
    return did_you_mean(dotted, [k for k in known if k.count(".") == dotted.count(".")])


def _set_dotted(tree: dict, dotted: str, value: Any, problems: list[str]) -> None:
    """Set `a.b.c` in a nested dict, refusing keys the schema does not know."""
    parts = dotted.split(".")
    if any(not p for p in parts):
        problems.append(f"malformed config key '{dotted}'")
        return
    node, cls = tree, Config
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if cls is not None:
            types = _field_types(cls)
            if part not in types:
                problems.append(f"unknown config key '{dotted}'{_suggest_key(dotted)}")
                return
            nested = types[part]
            cls = nested if dataclasses.is_dataclass(nested) else None
        if last:
            node[part] = copy.deepcopy(value)
            return
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child


def _flatten(data: Mapping, prefix: str = "", stop_at: Optional[set] = None) -> Iterable[tuple[str, Any]]:
    for key, value in data.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and value and (stop_at is None or full not in stop_at):
            yield from _flatten(value, full + ".", stop_at)
        else:
            yield full, value


def flatten(data: Mapping, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; used by diffs, sweeps and status columns."""
    return dict(_flatten(data, prefix))


def merge_layer(tree: dict, layer: Mapping, problems: list[str]) -> None:
    """Overlay a nested mapping (a YAML file, Python kwargs) onto `tree`, key by key."""
    for key, value in _flatten(layer):
        if isinstance(value, dict) and not value:
            continue  # an empty mapping adds nothing; it must not wipe a section's defaults
        _set_dotted(tree, key, value, problems)


def _matches(value: Any, tp: Any) -> tuple[bool, Any]:
    """(does `value` fit the declared type `tp`, the value coerced where lossless). Unknown types always fit."""
    origin = typing.get_origin(tp)
    if origin is Union:
        for arg in typing.get_args(tp):
            ok, coerced = _matches(value, arg)
            if ok:
                return True, coerced
        return False, value
    expected = origin or tp
    if expected is type(None):
        return value is None, value
    if expected is float:
        if isinstance(value, str) and _NUMBER.match(value.strip()):
            value = float(value)  # YAML 1.1 reads `3e-4` as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False, value
        return True, float(value)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if expected is bool:
        return isinstance(value, bool), value
    if expected is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, str(value)  # `run: 5` in YAML names run "5"
        return isinstance(value, str), value
    if expected in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False, value
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if len(args) == 1:  # list[int], Sequence[int], tuple[int, ...]: every item
            items = [_matches(item, args[0]) for item in value]
            return all(ok for ok, _ in items), [item for _, item in items]
        return True, value
    if expected is dict:
        return isinstance(value, dict), value
    return True, value


def check_value(key: str, value: Any, tp: Any, problems: list[str]) -> Any:
    """Type-check one leaf against its declared type; returns the value, coerced where lossless."""
    ok, coerced = _matches(value, tp)
    if not ok:
        problems.append(f"config key '{key}' got {json.dumps(value, default=str)} ({type(value).__name__}); "
                        f"expected {_describe(tp)}")
    return coerced


def _validate_section(data: dict, cls: type, prefix: str, problems: list[str]) -> None:
    for name, tp in _field_types(cls).items():
        key = prefix + name
        if dataclasses.is_dataclass(tp):
            if not isinstance(data.get(name), dict):
                problems.append(f"config key '{key}' must be a mapping of keys, got {data.get(name)!r}")
                continue
            _validate_section(data[name], tp, key + ".", problems)
            continue
        before = len(problems)
        data[name] = check_value(key, data.get(name), tp, problems)
        if len(problems) > before:
            continue
        value = data[name]
        if key == "device" and not _DEVICE.match(value):
            problems.append(f"config key 'device' got '{value}'; expected auto, cpu, cuda, cuda:N or mps"
                            f"{did_you_mean(value, ('auto', 'cpu', 'cuda', 'mps'))}")
        if key in CHOICES and value is not None:
            allowed = CHOICES[key]
            if value not in allowed:
                problems.append(f"config key '{key}' got '{value}'; expected one of {', '.join(allowed)}"
                                f"{did_you_mean(str(value), allowed)}")
        if isinstance(value, int) and not isinstance(value, bool) and not -INT_LIMIT <= value < INT_LIMIT:
            shown = value if value.bit_length() <= 128 else f"a {value.bit_length()}-bit integer"
            problems.append(f"config key '{key}' got {shown}; expected an integer from -2**63 to 2**63 - 1")
            continue
        if key == "load_data_kwargs.num_workers" and isinstance(value, str):
            if re.fullmatch(r"\s*-?\d+\s*", value):  # `num_workers=2` on the command line: a text key keeps it
                data[name] = value = int(value)
            elif value != "auto":
                problems.append(f"config key '{key}' got '{value}'; expected a number of workers or auto")
        if isinstance(value, str) and key == "load_data_kwargs.num_workers":
            continue
        if value is not None and key in POSITIVE and value <= 0:
            problems.append(f"config key '{key}' got {value}; expected a positive value")
        if value is not None and key in NON_NEGATIVE and value < 0:
            problems.append(f"config key '{key}' got {value}; expected zero or more")
        if value is not None and key in RANGES and len(problems) == before and not RANGES[key].holds(value):
            problems.append(f"config key '{key}' got {value}; expected {RANGES[key].describe()}")


def _bound_text(number: float) -> str:
    whole = int(number)
    if number == whole and whole >= 2**32 and whole & (whole - 1) == 0:
        return f"2**{whole.bit_length() - 1}"  # 2**63, not 9.22337e+18
    return f"{number:g}"


def _unsafe_text(value: Any, key: str) -> list[str]:
    """Every string in `value` (mapping keys too) that holds a control character, one problem each."""
    if isinstance(value, dict):
        return [p for k, v in value.items()
                for p in _unsafe_text(str(k), f"{key} (a key)") + _unsafe_text(v, f"{key}.{k}" if key else str(k))]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in _unsafe_text(v, f"{key}[{i}]")]
    match = _UNSAFE_TEXT.search(value) if isinstance(value, str) else None
    if match is None:
        return []
    char = match.group()
    if char in _LINE_BREAKS:
        what = "a line break"
        fix = "give each line as its own list item" if key.endswith("]") else "remove it"
    elif "\ud800" <= char <= "\udfff":
        what, fix = "bytes that are not UTF-8", "give it as UTF-8 text"
    else:
        what, fix = f"the control character U+{ord(char):04X}", "remove it"
    shown = json.dumps(value[:60]) + ("..." if len(value) > 60 else "")
    return [f"config key '{key}' holds {what} ({shown}): config values reach the sbatch script, command lines, file "
            f"names and status tables, one plain line each; {fix}"]


def one_line(text: str) -> str:
    """`text` with every control character written as its escape: an error message stays one line."""
    return _UNSAFE_TEXT.sub(lambda m: json.dumps(m.group())[1:-1], text)


def declared_type(dotted: str) -> Any:
    """The schema's type of a dotted key, or None for keys inside free-form sections."""
    cls: Any = Config
    tp = None
    for part in dotted.split("."):
        if cls is None or not dataclasses.is_dataclass(cls):
            return None
        tp = _field_types(cls).get(part)
        cls = tp
    return tp


def _takes_text(dotted: str) -> bool:
    tp = declared_type(dotted)
    return tp is str or (typing.get_origin(tp) is Union and str in typing.get_args(tp))


def _fill_missing(config: dict, default: Mapping, cls: type = Config) -> None:
    """Keys a config lacks take their defaults: a config.json written before a key existed still loads."""
    for name, tp in _field_types(cls).items():
        if name not in config:
            config[name] = copy.deepcopy(default[name])
        elif dataclasses.is_dataclass(tp) and isinstance(config[name], dict):
            _fill_missing(config[name], default[name], tp)


def validate(config: dict) -> dict:
    """Check every key and type, raising one ConfigError that lists every problem."""
    problems: list[str] = []
    _fill_missing(config, defaults())
    _validate_section(config, Config, "", problems)
    problems.extend(_unsafe_text(config, ""))
    from stride.slurm import check_section as check_slurm_section

    problems.extend(check_slurm_section(config.get("slurm"), config.get("work_dir")))
    if isinstance(config.get("container"), dict):
        from stride.container import check_section

        problems.extend(check_section(config["container"]))
    if isinstance(config.get("distributed_kwargs"), dict):
        from stride.network import check_env_section

        problems.extend(check_env_section(config["distributed_kwargs"].get("env")))
    for section, name_key in (("dataset_kwargs", "dataset_name"), ("model_kwargs", "model_name")):
        section_value = config.get(section)
        if isinstance(section_value, dict) and not isinstance(section_value.get(name_key), str):
            problems.append(f"config key '{section}.{name_key}' must name a registered {name_key.split('_')[0]} "
                            f"or an import path like 'my_pkg.module:Class'")
    if isinstance(config.get("run"), str):
        from stride.rundir import validate_run_name

        try:
            validate_run_name(config["run"])
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError(one_line("; ".join(problems)))
    if config["slurm"]["gpus_per_node"]:  # one task per GPU: the config says what the sbatch script asks for
        config["slurm"]["tasks_per_node"] = config["slurm"]["gpus_per_node"]
    return config


def resolve(
    overrides: Sequence[str] = (),
    files: Sequence[Union[str, Path]] = (),
    layers: Sequence[Mapping] = (),
    base: Optional[Mapping] = None,
    experiment_config: bool = True,
    profile: Optional[str] = None,
    final: Optional[Mapping] = None,
) -> dict:
    """Resolve a config: defaults < cluster profile < work_dir/config.yaml < `layers` < YAML `files` < `overrides`
    < `final` (CLI flags such as --nodes).

    `layers` are Python mappings (the Trainer's keyword arguments). `work_dir` is searched for in every layer first,
    since the experiment's own config sits between the defaults and everything given explicitly.
    """
    problems: list[str] = []
    parsed = [parse_override(item) for item in overrides]
    # A text key keeps the text as typed: `run=007` names run "007", not 7.
    parsed = [(key, item.partition("=")[2].strip() if isinstance(value, (int, float)) and not isinstance(value, bool)
               and _takes_text(key) else value) for (key, value), item in zip(parsed, overrides)]
    file_layers = [load_yaml_file(path) for path in files]
    config = copy.deepcopy(dict(base)) if base is not None else defaults()
    if profile is not None:
        merge_layer(config, load_yaml_file(find_profile(profile)), problems)

    work_dir = config.get("work_dir")
    for layer in [*layers, *file_layers]:
        work_dir = layer.get("work_dir", work_dir)
    for key, value in parsed:
        if key == "work_dir":
            work_dir = value
    if experiment_config and isinstance(work_dir, str):
        experiment_file = Path(work_dir).expanduser() / EXPERIMENT_CONFIG_NAME
        from stride.trust import warn_if_foreign

        warn_if_foreign("work_dir", Path(work_dir).expanduser(), experiment_file)
        if experiment_file.is_file():
            merge_layer(config, load_yaml_file(experiment_file), problems)

    for layer in [*layers, *file_layers]:
        merge_layer(config, layer, problems)
    for key, value in parsed:
        _set_dotted(config, key, value, problems)
    merge_layer(config, final or {}, problems)
    if problems:
        raise ConfigError(one_line("; ".join(problems)))
    validate(config)
    if isinstance(config.get("work_dir"), str):
        config["work_dir"] = str(Path(config["work_dir"]).expanduser().absolute())
    return config


def profile_dirs() -> list[Path]:
    """Where cluster profiles live: $STRIDE_PROFILE_PATH, the user's config dir, then the repository's slurm/profiles."""
    import os

    dirs = [Path(p) for p in os.environ.get("STRIDE_PROFILE_PATH", "").split(os.pathsep) if p]
    config_home = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config"))
    dirs.append(config_home / "stride" / "profiles")
    dirs.append(Path(__file__).resolve().parents[1] / "slurm" / "profiles")
    return dirs


def find_profile(name: str) -> Path:
    """A profile by name (NAME.yaml in a profile dir) or by path."""
    if name.endswith((".yaml", ".yml")) and Path(name).is_file():
        return Path(name)
    known: list[str] = []
    for folder in profile_dirs():
        candidate = folder / f"{name}.yaml"
        if candidate.is_file():
            return candidate
        if folder.is_dir():
            known += [p.stem for p in folder.glob("*.yaml")]
    raise ConfigError(f"unknown profile '{name}'{did_you_mean(name, known)}; known profiles: "
                      f"{', '.join(sorted(set(known))) or '(none)'} (searched {', '.join(map(str, profile_dirs()))})")


def require_work_dir(config: Mapping) -> Path:
    if not config.get("work_dir"):
        raise ConfigError("work_dir is not set: give one, e.g. `stride local work_dir=experiments/digits`")
    return Path(config["work_dir"])


def to_yaml(config: Mapping) -> str:
    return yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=False)


def split_cli_args(args: Iterable[Any]) -> tuple[list[str], list[str]]:
    """Split positional CLI words into (YAML files, key=value overrides)."""
    files, overrides = [], []
    for arg in args:
        text = str(arg)
        if "=" in text:
            overrides.append(text)
        elif text.endswith((".yaml", ".yml", ".json")):
            files.append(text)  # JSON is YAML: a run's config.json is a valid layer
        else:
            raise ConfigError(f"cannot read argument '{text}': expected key=value or a .yaml/.yml/.json config file")
    return files, overrides
