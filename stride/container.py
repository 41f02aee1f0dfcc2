"""A container spec -> the command every rank runs: `apptainer exec ...`, `docker run ...`, `podman run ...` or
`ch-run ... --`, ending with the image's Python, so launchers only append `-m stride.job RUN` (or submitit's own
`-u -m submitit.core._submit FOLDER`).

Pure and standard library only: no PATH lookups, no image probing, no torch. `stride.container_check` does the side
effects (which runtime is installed, does the image exist, what its Python says, its digest).
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Iterable, Mapping, Optional, Sequence

from stride.errors import ConfigError

RUNTIMES = ("apptainer", "docker", "podman", "charliecloud")
EXECUTABLES = {"apptainer": "apptainer", "docker": "docker", "podman": "podman", "charliecloud": "ch-run"}
GPU_CHOICES = ("auto", True, False)
# Rank and node names resolve through the node's /etc/hosts (submitit's MASTER_ADDR is a node NAME).
HOSTS_FILE = "/etc/hosts"
# Docker and Podman start a container with an empty environment, so every variable a rank reads is passed by name:
# submitit's SLURM_*/SUBMITIT_*, torch's rendezvous variables, stride's own, and the GPUs Slurm bound to the task.
# `-e NAME` copies the value only when NAME is set, so one list serves `stride local` and SLURM alike.
# Apptainer and Charliecloud keep the host's environment, so they need no list. container.secret_env's names travel
# the same way (values never in argv): `-e NAME`, APPTAINERENV_NAME, or Charliecloud's inherited environment.
PASSED_ENV = (
    "SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES", "SLURM_NTASKS", "SLURM_NODEID",
    "SLURM_PROCID", "SLURM_LOCALID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT",
    "SLURM_CPUS_PER_TASK",
    "SLURM_CONF", "SLURMD_NODENAME", "SUBMITIT_EXECUTOR", "SUBMITIT_LOG_LEVEL", "SUBMITIT_PREEMPT_SIGNAL",
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "STRIDE_RENDEZVOUS_ID",
    "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "USER",
)
# Apptainer and Charliecloud also pass the host's Python settings, which would make the image's Python import the
# host's packages (a checkout on PYTHONPATH, ~/.local): they are cleared inside unless container.env sets them.
HOST_PYTHON_ENV = (("PYTHONPATH", ""), ("PYTHONHOME", ""), ("PYTHONUSERBASE", ""), ("PYTHONNOUSERSITE", "1"))
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_BIND_MODES = ("ro", "rw")
_ENV_SPLIT = re.compile(r",[A-Za-z_][A-Za-z0-9_]*=")


@dataclass(frozen=True)
class Bind:
    """A host path mounted in the container."""

    src: str
    dst: str
    read_only: bool = False

    def spec(self) -> str:
        return f"{self.src}:{self.dst}" + (":ro" if self.read_only else "")


@dataclass(frozen=True)
class ContainerSpec:
    """Everything a runtime needs to start a rank; built from the config's `container` section by `make_spec`."""

    image: str
    runtime: str
    executable: str
    python: str = "python3"
    binds: tuple[Bind, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    secret_env: tuple[str, ...] = ()
    """Names only: the values come from the launcher's environment (see `secret_env_passing`)."""
    gpus: bool = False
    runtime_args: tuple[str, ...] = ()
    slurm_client: tuple[str, ...] = ()
    """Host folders of Slurm's client config and munge's socket, bound read-only in a SLURM job's Apptainer ranks:
    rank 0 calls `scontrol` from inside to requeue the job (see container_check.slurm_client_paths)."""


def parse_bind(text: str) -> Bind:
    """'SRC', 'SRC:DST' or 'SRC:DST:ro' (absolute paths) -> Bind."""
    parts = str(text).split(":")
    if len(parts) > 3 or not all(parts[:2]):
        raise ConfigError(f"container bind '{text}' is not SRC, SRC:DST or SRC:DST:ro")
    src = parts[0]
    dst = parts[1] if len(parts) > 1 else src
    mode = parts[2] if len(parts) == 3 else "rw"
    if mode not in _BIND_MODES:
        raise ConfigError(f"container bind '{text}' ends in '{mode}'; expected ro or rw")
    for path in (src, dst):
        if not PurePosixPath(path).is_absolute():
            raise ConfigError(f"container bind '{text}': '{path}' must be an absolute path")
    return Bind(src, dst, mode == "ro")


def check_section(section: Mapping[str, Any]) -> list[str]:
    """Problems in the config's `container` section that its field types cannot catch (one string each)."""
    problems = []
    for key in ("image", "python", "executable"):
        value = section.get(key)
        if isinstance(value, str) and (not value.strip() or value.startswith("-")):
            problems.append(f"config key 'container.{key}' got {value!r}; expected a path or name (not empty, not "
                            f"starting with '-')")
    if section.get("gpus") not in GPU_CHOICES:
        problems.append(f"config key 'container.gpus' got {section.get('gpus')!r}; expected auto, true or false")
    binds, env, runtime_args = section.get("binds"), section.get("env"), section.get("runtime_args")
    for item in binds if isinstance(binds, list) else []:
        if not isinstance(item, str):
            problems.append(f"config key 'container.binds' holds {item!r}; expected strings like /data:/data:ro")
            continue
        try:
            parse_bind(item)
        except ConfigError as exc:
            problems.append(f"config key 'container.binds': {exc}")
    for name, value in (env if isinstance(env, dict) else {}).items():
        if not _ENV_NAME.match(str(name)):
            problems.append(f"config key 'container.env' has '{name}', which is not an environment variable name")
        elif isinstance(value, (dict, list)) or value is None:
            problems.append(f"config key 'container.env.{name}' got {value!r}; expected a string or number")
    for item in runtime_args if isinstance(runtime_args, list) else []:
        if not isinstance(item, str):
            problems.append(f"config key 'container.runtime_args' holds {item!r}; expected strings")
    secret_env = section.get("secret_env")
    seen: set = set()
    for name in secret_env if isinstance(secret_env, list) else []:
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            problems.append(f"config key 'container.secret_env' holds {name!r}, which is not an environment variable "
                            f"name: list names only, e.g. [WANDB_API_KEY] (the values stay in your environment)")
        elif name in seen:
            problems.append(f"config key 'container.secret_env' lists {name} twice: list it once")
        elif isinstance(env, dict) and name in env:
            problems.append(f"{name} is in both container.env (a value written into config.json and command lines) "
                            f"and container.secret_env (passed by name): remove container.env.{name}")
        seen.add(name)
    return problems


def looks_secret(name: str) -> bool:
    """HF_TOKEN, WANDB_API_KEY, AWS_SECRET_ACCESS_KEY, DB_PASSWORD: a name whose value should not be written down
    (TOKENIZERS_PARALLELISM is not one)."""
    words = str(name).upper().split("_")
    pairs = set(zip(words, words[1:]))
    return bool({"TOKEN", "SECRET", "PASSWORD", "PASSWD", "APIKEY", "CREDENTIALS", "CREDENTIAL"} & set(words)
                or {("API", "KEY"), ("ACCESS", "KEY"), ("PRIVATE", "KEY"), ("AUTH", "KEY")} & pairs)


def secret_env_passing(spec: ContainerSpec, values: Mapping[str, str]) -> dict:
    """Variables the launcher exports so that the runtime hands each secret to the rank by name, never in argv:
    Apptainer reads APPTAINERENV_NAME (SINGULARITYENV_NAME for a `singularity` executable), which holds even with
    --cleanenv. Docker and Podman copy `-e NAME` from the launcher's environment; Charliecloud inherits it."""
    if spec.runtime != "apptainer":
        return {}
    prefix = "SINGULARITYENV_" if PurePosixPath(spec.executable).name == "singularity" else "APPTAINERENV_"
    return {prefix + name: values[name] for name in spec.secret_env if name in values}


def wants_gpus(gpus_setting: Any, gpus_requested: int) -> bool:
    """GPU pass-through: `auto` turns it on exactly when the run asks for GPUs."""
    return gpus_requested > 0 if gpus_setting == "auto" else bool(gpus_setting)


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def make_spec(section: Mapping[str, Any], runtime: str, gpus: bool) -> ContainerSpec:
    """The config's `container` section with its runtime resolved (see container_check.resolve_runtime)."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"container runtime '{runtime}' is not one of {', '.join(RUNTIMES)}")
    return ContainerSpec(
        image=str(section["image"]), runtime=runtime,
        executable=section.get("executable") or EXECUTABLES[runtime], python=section.get("python") or "python3",
        binds=tuple(parse_bind(b) for b in section.get("binds") or []),
        env=tuple((str(k), _env_value(v)) for k, v in sorted((section.get("env") or {}).items())),
        secret_env=tuple(str(name) for name in section.get("secret_env") or []),
        gpus=gpus, runtime_args=tuple(str(a) for a in section.get("runtime_args") or []))


def guess_runtime(image: str, is_file: bool, is_dir: bool, installed: Iterable[str]) -> Optional[str]:
    """`runtime: auto`: a .sif file runs in Apptainer; a directory in Charliecloud (else Apptainer, else Podman's
    --rootfs); any other name is an image in Docker's (else Podman's) store. None when no fitting runtime is
    installed."""
    installed = set(installed)
    if is_file or image.endswith(".sif"):
        order = ("apptainer",)
    elif is_dir or image.startswith(("/", "./", "../")):
        order = ("charliecloud", "apptainer", "podman")
    else:
        order = ("docker", "podman")
    return next((runtime for runtime in order if runtime in installed), None)


def _binds(spec: ContainerSpec, work_mount: str) -> list[Bind]:
    """work_dir at its own path, the node's /etc/hosts, Slurm's client files (read-only), then the user's binds (a
    later one with the same target wins in every runtime)."""
    if ":" in work_mount:
        raise ConfigError(f"work_dir '{work_mount}' holds ':', which no container runtime's bind syntax (SRC:DST) can "
                          f"express: choose a work_dir without ':'")
    slurm = [Bind(path, path, read_only=True) for path in spec.slurm_client]
    return [Bind(work_mount, work_mount), Bind(HOSTS_FILE, HOSTS_FILE, read_only=True), *slurm, *spec.binds]


def _apptainer(spec: ContainerSpec, binds: Sequence[Bind]) -> list[str]:
    # Apptainer splits --bind at every ',' and --env at ',NAME=': such values would silently become two.
    for bind in binds:
        if "," in bind.spec():
            raise ConfigError(f"container bind '{bind.spec()}' holds ',', which Apptainer reads as two binds: "
                              f"rename the folder or use another runtime")
    for name, value in spec.env:
        if _ENV_SPLIT.search(value):
            raise ConfigError(f"container.env.{name} holds ',NAME=', which Apptainer reads as two variables")
    # --contain: Apptainer would otherwise share the host's home, /tmp and current folder; only the binds are seen.
    argv = [spec.executable, "exec", "--contain"]
    if spec.gpus:
        argv.append("--nv")
    for bind in binds:
        argv += ["--bind", bind.spec()]
    # Start in work_dir, not in the submitting shell's folder (which `python -m` would put first on sys.path).
    argv += ["--pwd", binds[0].dst]
    for name, value in _with_host_python_cleared(spec.env):
        argv += ["--env", f"{name}={_apptainer_literal(name, value)}"]
    return [*argv, *spec.runtime_args, spec.image, spec.python]


def _with_host_python_cleared(env: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    given = {name for name, _ in env}
    return [(name, value) for name, value in HOST_PYTHON_ENV if name not in given] + list(env)


def _apptainer_literal(name: str, value: str) -> str:
    """Apptainer expands `--env` values as a shell would inside double quotes (`$(id)` runs!): escape `\\`, `$` and
    backquotes so the rank sees the value as written, as in every other runtime."""
    if value.endswith('"'):  # Apptainer drops a trailing double quote, escaped or not
        raise ConfigError(f"container.env.{name} ends with '\"', which Apptainer drops: end the value otherwise")
    return value.replace("\\", "\\\\").replace("$", "\\$").replace("`", "\\`")


def _oci(spec: ContainerSpec, binds: Sequence[Bind], uid: int, gid: int) -> list[str]:
    """Docker and Podman: host network and IPC (the rendezvous and NCCL's shared memory), never a registry pull (the
    image that runs is the one the preflight checked and the run recorded), the host user's ids on files."""
    argv = [spec.executable, "run", "--rm", "--pull", "never", "--network", "host", "--ipc", "host",
            "-w", binds[0].dst]
    if spec.runtime == "docker":
        argv += ["--user", f"{uid}:{gid}"]
        if spec.gpus:
            argv += ["--gpus", "all"]
    else:
        if uid != 0:
            argv += ["--userns", "keep-id"]  # rootless Podman: files in work_dir stay the user's
        if spec.gpus:
            argv += ["--device", "nvidia.com/gpu=all"]  # CDI, what nvidia-ctk generates for Podman
    for bind in binds:
        argv += ["-v", bind.spec()]
    for name in (*PASSED_ENV, *spec.secret_env):  # by name: the value stays in the environment, out of argv
        argv += ["-e", name]
    for name, value in spec.env:
        argv += ["-e", f"{name}={value}"]
    argv += list(spec.runtime_args)
    # A folder image runs in Podman without an import: `--rootfs DIR:O` (an overlay, or Podman would create mount
    # points inside the image and so change it).
    image = [spec.image]
    if spec.runtime == "podman" and spec.image.startswith("/"):
        image = ["--rootfs", f"{spec.image}:O"]
    return [*argv, *image, spec.python]


def _charliecloud(spec: ContainerSpec, binds: Sequence[Bind]) -> list[str]:
    argv = [spec.executable]
    for bind in binds:
        if bind.read_only and bind.dst != HOSTS_FILE:
            raise ConfigError(f"container bind '{bind.spec()}': Charliecloud mounts binds read-write only; drop "
                              f"':ro' or use another runtime")
        argv += ["-b", f"{bind.src}:{bind.dst}"]
    argv += ["-c", binds[0].dst, "--env-no-expand"]  # start in work_dir; values stay literal ($PATH unexpanded)
    for name, value in _with_host_python_cleared(spec.env):
        argv.append(f"--set-env={name}={value}")
    # ch-run shares the host's whole /tmp unless told otherwise; a private one exposes only the binds.
    if not {"-t", "--private-tmp"} & set(spec.runtime_args):
        argv.append("--private-tmp")
    # GPUs: ch-run shares the host's /dev; the driver's libraries enter the image once with `ch-fromhost --nvidia`.
    return [*argv, *spec.runtime_args, spec.image, "--", spec.python]


def build_command(spec: ContainerSpec, work_mount: str, uid: int = 0, gid: int = 0) -> list[str]:
    """The argv that starts the image's Python with work_dir mounted at `work_mount` (its own path); append the
    Python arguments. `uid`/`gid` are the submitting user's (Docker runs as them)."""
    binds = _binds(spec, str(work_mount))
    if spec.runtime == "apptainer":
        return _apptainer(spec, binds)
    if spec.runtime in ("docker", "podman"):
        return _oci(spec, binds, uid, gid)
    if spec.runtime == "charliecloud":
        return _charliecloud(spec, binds)
    raise ConfigError(f"container runtime '{spec.runtime}' is not one of {', '.join(RUNTIMES)}")


def build_shell_command(spec: ContainerSpec, work_mount: str, uid: int = 0, gid: int = 0) -> str:
    """The same command as one shell string, every word quoted: submitit's `python=` (it appends its own arguments)."""
    return shlex.join(build_command(spec, work_mount, uid, gid))
