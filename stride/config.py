"""Built-in defaults + the experiment's config.yaml + YAML files + `key.sub=value` overrides -> one validated config.

Standard library and PyYAML only, so the CLI resolves, prints and validates configs without importing torch.
The resolved config is a plain JSON-ready dict: it is what `config.json` holds and all a job needs to rebuild a run.
"""
from __future__ import annotations

import collections.abc
import copy
import dataclasses
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
    num_workers: int = 0
    """DataLoader worker processes per rank; 0 loads in the training process (best for in-memory data)."""
    pin_memory: bool = True
    """Page-locked host batches for asynchronous copies; only used on CUDA."""
    persistent_workers: bool = True
    """Keep workers alive across epochs (only when num_workers > 0)."""
    shuffle: bool = True
    drop_last: bool = False


@dataclass
class TrainingKwargs:
    epochs: int = 20
    optimizer: str = "adamw"
    """One of sgd, adam, adamw."""
    lr: float = 3e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    """SGD momentum (ignored by Adam variants)."""
    scheduler: str = "cosine"
    """One of constant, cosine (per step, after warmup)."""
    warmup_steps: int = 0
    grad_clip_norm: Optional[float] = None
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step; gradients are all-reduced only on the last one (no_sync)."""
    precision: str = "fp32"
    """One of fp32, bf16, fp16 (autocast; fp16 uses a grad scaler)."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    seed: int = 0
    deterministic: bool = False
    """Deterministic algorithms and seeded workers: bitwise-reproducible runs, somewhat slower."""
    log_every_steps: int = 50
    """Read the on-device loss and write a metrics line every N optimizer steps (no per-step host sync)."""
    stop_check_seconds: float = 5.0
    """With several ranks, how often (about) they agree on stop requests and checkpoint deadlines (0: every step)."""
    best_metric: Optional[str] = None
    """Validation metric that picks the best weights; None means val_accuracy (classification) or val_loss."""
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


@dataclass
class DistributedKwargs:
    backend: str = "auto"
    """auto (nccl with GPUs, gloo on CPU), nccl or gloo."""
    init_timeout_s: float = 120.0
    """Bound on the rendezvous: a broken one fails in this many seconds instead of hanging."""
    timeout_s: float = 600.0
    """Bound on each collective once training runs."""


@dataclass
class SlurmKwargs:
    nodes: int = 1
    gpus_per_node: int = 0
    """GPUs per node; one task per GPU."""
    tasks_per_node: int = 1
    """Tasks per node for CPU jobs (ignored when gpus_per_node > 0)."""
    cpus_per_task: Optional[int] = None
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
    """Any other sbatch option, e.g. {mail-type: END}; values are quoted."""
    setup: list = field(default_factory=list)
    """Shell lines run before the ranks start, e.g. 'module load cuda'."""
    max_timeout_requeues: int = 3
    """How often a job that hits its time limit is requeued (preemptions do not count)."""
    max_crash_requeues: int = 1
    """How often a crashed job is retried; never twice in a row for the same error."""
    signal_delay_s: int = 90
    """Seconds before the time limit at which SLURM sends USR2 so the run can checkpoint."""


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
    gpus: Any = "auto"
    """GPU pass-through (--nv, --gpus all, CDI): auto (on when the run asks for GPUs), true or false."""
    runtime_args: list = field(default_factory=list)
    """More arguments for `apptainer exec`, `docker run`, `podman run` or `ch-run`, placed before the image."""


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
    training_kwargs: TrainingKwargs = field(default_factory=TrainingKwargs)
    distributed_kwargs: DistributedKwargs = field(default_factory=DistributedKwargs)
    slurm: SlurmKwargs = field(default_factory=SlurmKwargs)
    container: ContainerKwargs = field(default_factory=ContainerKwargs)


CHOICES: dict[str, tuple[str, ...]] = {
    "training_kwargs.optimizer": ("sgd", "adam", "adamw"),
    "training_kwargs.scheduler": ("constant", "cosine"),
    "training_kwargs.precision": ("fp32", "bf16", "fp16"),
    "training_kwargs.best_mode": ("auto", "max", "min"),
    "distributed_kwargs.backend": ("auto", "nccl", "gloo"),
    "container.runtime": ("auto", "apptainer", "docker", "podman", "charliecloud"),
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
    "training_kwargs.stop_check_seconds",
    "slurm.gpus_per_node", "slurm.tasks_per_node", "slurm.max_timeout_requeues", "slurm.signal_delay_s",
    "slurm.max_crash_requeues",
}
# Sections whose keys belong to the chosen plug-in; they are checked against its signature, not here.
FREE_FORM = {"dataset_kwargs", "model_kwargs"}

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_DEVICE = re.compile(r"(auto|cpu|cuda|cuda:\d+|mps)\Z")
# Sections whose strings end up in the sbatch script or a rank's command line: one line each, no NUL.
SHELL_BOUND = ("slurm", "container")
_CONTROL = re.compile(r"[\x00\n\r]")


def defaults() -> dict:
    """The built-in defaults as a fresh nested dict."""
    return dataclasses.asdict(Config())


def _field_types(cls: type) -> dict[str, Any]:
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


def parse_value(text: str) -> Any:
    """Parse an override's value as a YAML scalar or list: `3e-4`, `[64,64]`, `true`, `null`, `ResNet`."""
    if _NUMBER.match(text.strip()):
        number = float(text)
        return int(text) if re.fullmatch(r"[+-]?\d+", text.strip()) else number
    try:
        return yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        return text


def parse_override(item: str) -> tuple[str, Any]:
    """`key.sub=value` -> ("key.sub", parsed value)."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"cannot read override '{item}': expected key=value, e.g. training_kwargs.lr=3e-4")
    if key.startswith("--"):
        raise ConfigError(f"cannot read override '{item}': write it as {key[2:]}=..., without the dashes")
    return key, parse_value(value)


def load_yaml_file(path: Union[str, Path]) -> dict:
    """Read one YAML config file; every failure is one ConfigError line."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file '{path}' is a folder, not a YAML file: name the file inside it")
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist: check the path")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
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
        if value is not None and key in POSITIVE and value <= 0:
            problems.append(f"config key '{key}' got {value}; expected a positive value")
        if value is not None and key in NON_NEGATIVE and value < 0:
            problems.append(f"config key '{key}' got {value}; expected zero or more")


def _line_breaks(value: Any, key: str) -> list[str]:
    """A line break in a value bound for the sbatch script would end its `#SBATCH` line and start a shell line."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _line_breaks(str(k), f"{key} (a key)") + _line_breaks(v, f"{key}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _line_breaks(v, f"{key}[{i}]")]
    if isinstance(value, str) and _CONTROL.search(value):
        return [f"config key '{key}' holds a line break or NUL ({json.dumps(value)}): these values go into the sbatch "
                f"script and command lines, one line each (give several items instead)"]
    return []


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


def validate(config: dict) -> dict:
    """Check every key and type, raising one ConfigError that lists every problem."""
    problems: list[str] = []
    _validate_section(config, Config, "", problems)
    for section in SHELL_BOUND:
        if isinstance(config.get(section), dict):
            problems.extend(_line_breaks(config[section], section))
    if isinstance(config.get("container"), dict):
        from stride.container import check_section

        problems.extend(check_section(config["container"]))
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
        raise ConfigError("; ".join(problems))
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
        if experiment_file.is_file():
            merge_layer(config, load_yaml_file(experiment_file), problems)

    for layer in [*layers, *file_layers]:
        merge_layer(config, layer, problems)
    for key, value in parsed:
        _set_dotted(config, key, value, problems)
    merge_layer(config, final or {}, problems)
    if problems:
        raise ConfigError("; ".join(problems))
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
