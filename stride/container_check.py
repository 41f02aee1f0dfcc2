"""Before any rank starts in a container: pick the runtime, check that the image exists and is readable, run the
image's own Python once to learn its versions (submitit's pickles cannot cross Python minor versions; the ranks need
this stride), and take the image's digest for the run's metadata.

Side effects live here, each bounded in time; `stride.container` stays pure. Every failure is one ContainerError
line naming what differs and the fix. Standard library only.
"""
from __future__ import annotations

import dataclasses
import getpass
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import stat
import subprocess
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Optional

from stride import container
from stride.errors import ContainerError

PROBE_TIMEOUT_S = 180.0
INSPECT_TIMEOUT_S = 30.0
PROBE_MARKER = "STRIDE-CONTAINER-PROBE "
DIGEST_CACHE_ENTRIES = 64
HASH_CHUNK_BYTES = 1 << 20

# Runs inside the image, on whatever Python it has (3.8+), so it uses nothing but the standard library and stride.
PROBE_SCRIPT = r"""
import json, platform, sys
from importlib import metadata
def version(name):
    try:
        return metadata.version(name)
    except Exception:
        return None
facts = {"python": platform.python_version(), "executable": sys.executable, "stride": version("stride"),
         "submitit": version("submitit"), "cloudpickle": version("cloudpickle"), "torch": version("torch")}
try:
    import stride
    facts["stride_path"] = stride.__file__
    facts["stride"] = facts["stride"] or getattr(stride, "__version__", None)
except Exception as exc:
    facts["stride_error"] = "%s: %s" % (type(exc).__name__, exc)
print("MARKER" + json.dumps(facts), flush=True)
if len(sys.argv) > 1 and "stride_path" in facts:
    try:
        from stride.training.preflight import check
        check([json.loads(sys.argv[1])])
        print("MARKER" + json.dumps({"plugins": None}), flush=True)
    except Exception as exc:
        print("MARKER" + json.dumps({"plugins": "%s" % (exc,) or type(exc).__name__}), flush=True)
""".replace("MARKER", PROBE_MARKER)


@dataclass
class ContainerPlan:
    """How every rank of a run starts in its image, and what the preflight learnt about that image."""

    spec: container.ContainerSpec
    work_mount: str
    argv: list[str]
    facts: dict = field(default_factory=dict)
    digest: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    """Variables the launcher must export for the runtime (ch-run refuses to start without $USER)."""

    @property
    def shell(self) -> str:
        """The same command as one quoted shell string: submitit's `python=`."""
        return shlex.join(self.argv)

    def metadata(self) -> dict:
        """What metadata.json records: the image, its digest, and the software the ranks ran."""
        return {"image": self.spec.image, "runtime": self.spec.runtime, "executable": self.spec.executable,
                **self.digest, "gpus": self.spec.gpus, "python": self.facts.get("executable"),
                "python_version": self.facts.get("python"), "stride": self.facts.get("stride"),
                "submitit": self.facts.get("submitit"), "torch": self.facts.get("torch"), "command": self.shell}


# ----------------------------------------------------------------------------------------------------- runtime
def _is_path_image(spec: container.ContainerSpec) -> bool:
    """Apptainer and Charliecloud run files and folders; Podman too with --rootfs; Docker only names in its store."""
    return spec.runtime in ("apptainer", "charliecloud") or (spec.runtime == "podman" and spec.image.startswith("/"))


def resolve_runtime(section: Mapping[str, Any]) -> str:
    """`container.runtime`, with `auto` decided by the image's form and the runtimes on PATH."""
    if section["runtime"] != "auto":
        return section["runtime"]
    image = str(section["image"])
    path = Path(image).expanduser()
    installed = [name for name, exe in container.EXECUTABLES.items() if shutil.which(exe)]
    runtime = container.guess_runtime(image, path.is_file(), path.is_dir(), installed)
    if runtime is None:
        raise ContainerError(f"no container runtime on PATH can run image '{image}' (found: "
                             f"{', '.join(installed) or 'none'}): install or load one (e.g. `module load apptainer`), "
                             f"or name it with container.runtime=apptainer|docker|podman|charliecloud")
    return runtime


def _check_runtime_installed(spec: container.ContainerSpec) -> None:
    if shutil.which(spec.executable) is None:
        raise ContainerError(f"container runtime {spec.runtime} ('{spec.executable}') is not on PATH: install or load "
                             f"it (e.g. `module load {spec.runtime}`), set container.executable to its path, or choose "
                             f"another runtime with container.runtime=...")


def runtime_env(spec: container.ContainerSpec) -> dict:
    """Variables a runtime needs in the launcher's environment that may be missing (ch-run needs $USER; Apptainer
    takes secrets from APPTAINERENV_NAME). Exported by the launcher, never written anywhere."""
    env = container.secret_env_passing(spec, os.environ)
    if spec.runtime == "charliecloud" and not os.environ.get("USER"):
        env["USER"] = getpass.getuser()
    return env


def check_secret_env(config: Mapping[str, Any]) -> list[str]:
    """container.secret_env's variables are set here and will reach the job; returns warnings (a container.env name
    that looks like a secret, whose value is written down), raises ContainerError otherwise.

    The values travel only through the environment: this process's, inherited by local ranks, exported by sbatch to
    the job (its default --export=ALL), and handed on by the runtime by name.
    """
    section = config["container"]
    names = list(section.get("secret_env") or [])
    missing = [name for name in names if name not in os.environ]
    if missing:
        raise ContainerError(f"container.secret_env names {', '.join(missing)}, not set in this environment: export "
                             f"{missing[0]}=... in the shell that runs stride (the ranks get it by name from there; "
                             f"its value is never written down)")
    export = next((str(v) for k, v in (config.get("slurm", {}).get("sbatch_args") or {}).items()
                   if str(k).lstrip("-") == "export"), None)
    if names and export is not None and not export.upper().startswith("ALL"):
        kept = {item.split("=", 1)[0] for item in export.split(",")}
        lost = [name for name in names if name not in kept]
        if lost:
            raise ContainerError(f"slurm.sbatch_args.export={export} keeps container.secret_env's {', '.join(lost)} "
                                 f"from the job: add {'them' if len(lost) > 1 else 'it'} to the list (e.g. "
                                 f"export={export},{','.join(lost)}) or leave export unset (ALL)")
    return [f"container.env.{name} looks like a secret, and its value is written into config.json and the ranks' "
            f"command lines: move it to container.secret_env (export {name} in your shell instead)"
            for name in (section.get("env") or {}) if container.looks_secret(name)]


# ------------------------------------------------------------------------------------------------------- image
def _run(argv: list[str], timeout_s: float, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=env,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ContainerError(f"'{' '.join(argv[:3])} ...' did not finish within {timeout_s:.0f}s: is the runtime "
                             f"healthy (daemon up, image on a reachable filesystem)?") from None
    except OSError as exc:
        raise ContainerError(f"cannot run '{argv[0]}': {exc.strerror}") from None


def _last_line(result: subprocess.CompletedProcess) -> str:
    """What the tool said: its last error line (before stdout, where `docker image inspect` prints a bare `[]`)."""
    for text in (result.stderr, result.stdout):
        lines = [line.strip() for line in text.splitlines() if line.strip() and line.strip() not in ("[]", "{}")]
        if lines:
            return lines[-1]
    return f"exit code {result.returncode}"


def _inspect_oci_image(spec: container.ContainerSpec) -> dict:
    result = _run([spec.executable, "image", "inspect", spec.image], INSPECT_TIMEOUT_S)
    if result.returncode != 0:
        raise ContainerError(f"{spec.runtime} has no image '{spec.image}' ({_last_line(result)}): build it (docker "
                             f"build -f containers/Dockerfile -t {spec.image} .) or load it on this machine; stride "
                             f"never pulls, so the image that runs is the one checked here")
    info = json.loads(result.stdout)[0]
    return {"digest": info.get("Id") or info.get("ID"), "digest_kind": f"{spec.runtime} image id",
            "repo_digests": info.get("RepoDigests") or []}


def check_image_path(image: Path) -> None:
    """A file or folder image must exist and be readable by this user (the ranks run as them)."""
    if not image.exists():
        raise ContainerError(f"container image '{image}' does not exist: build it (see containers/README.md) or fix "
                             f"container.image / --container")
    need = os.R_OK | (os.X_OK if image.is_dir() else 0)
    if not os.access(image, need):
        mode = stat.filemode(image.stat().st_mode)
        raise ContainerError(f"container image '{image}' is not readable by user {getpass.getuser()} ({mode}): "
                             f"chmod a+r{'x' if image.is_dir() else ''} it or use a copy you can read")


def charliecloud_mount(image: Path, work_dir: Path) -> str:
    """work_dir, bound at its own path and nothing wider. ch-run gets a private /tmp (always), in which it creates
    the mount point of a work_dir under /tmp; anywhere else the read-only image must already have that folder, and
    stride says what to add to the image rather than bind a parent (all of /home or /scratch)."""
    inside = image / str(work_dir).lstrip("/")
    if work_dir.is_relative_to("/tmp") or (inside.is_dir() and not inside.is_symlink()):
        return str(work_dir)
    raise ContainerError(f"Charliecloud cannot mount work_dir {work_dir} in image {image}: the read-only image has no "
                         f"folder at that path to mount over; add it when building the image (mkdir -p "
                         f"{image}{work_dir}), or put work_dir under /tmp")


# ------------------------------------------------------------------------------------------------------ digest
def _cache_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stride" / "image-digests.json"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _walk(root: Path) -> list[tuple[str, os.stat_result]]:
    """Every entry under root, sorted by path, without following symlinks."""
    entries = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + files):
            path = Path(folder) / name
            entries.append((str(path.relative_to(root)), path.lstat()))
    entries.sort(key=lambda item: item[0])
    return entries


def _tree_sha256(root: Path, entries: list[tuple[str, os.stat_result]]) -> str:
    """One hash over every path, type, mode and content (symlinks by target): equal only for equal trees."""
    digest = hashlib.sha256()
    for rel, st in entries:
        path = root / rel
        if stat.S_ISREG(st.st_mode):
            try:
                content = _file_sha256(path)
            except OSError:
                content = f"unreadable:{st.st_size}:{st.st_mtime_ns}"
        elif stat.S_ISLNK(st.st_mode):
            content = os.readlink(path)
        else:
            content = ""
        digest.update(f"{rel}\0{st.st_mode:o}\0{content}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _stat_key(path: Path, entries: list[tuple[str, os.stat_result]]) -> str:
    """Changes whenever any file is written, replaced or chmod-ed (ctime cannot be set back): the cache's key."""
    digest = hashlib.sha256(str(path).encode())
    for rel, st in entries:
        digest.update(f"{rel}\0{st.st_mode}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\n"
                      .encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def content_digest(image: Path) -> dict:
    """sha256 of a SIF/SquashFS file, or a content hash of an image folder; cached per stat signature, since hashing
    a multi-GB image on every submission would cost seconds."""
    image = image.resolve()
    if image.is_dir():
        entries, kind = _walk(image), "sha256 of the image folder's paths, modes and contents"
    else:
        entries, kind = [(".", image.stat())], "sha256 of the image file"
    key = _stat_key(image, entries)
    cache_file = _cache_file()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache, dict):
        cache = {}
    digest = cache.get(key)
    if digest is None:
        digest = "sha256:" + (_tree_sha256(image, entries) if image.is_dir() else _file_sha256(image))
        cache.pop(key, None)
        cache[key] = digest
        while len(cache) > DIGEST_CACHE_ENTRIES:
            cache.pop(next(iter(cache)))
        try:
            from stride.rundir import write_json

            cache_file.parent.mkdir(parents=True, exist_ok=True)
            write_json(cache_file, cache)
        except OSError:
            pass  # a read-only home only costs the next submission a re-hash
    return {"digest": digest, "digest_kind": kind}


# ------------------------------------------------------------------------------------------------------- probe
def host_facts() -> dict:
    """The submitting side's versions, which the image must match."""
    import stride

    def version(name: str) -> Optional[str]:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "stride": stride.__version__, "submitit": version("submitit"),
            "cloudpickle": version("cloudpickle")}


def probe(argv: list[str], env: Mapping[str, str], config: Optional[Mapping] = None) -> dict:
    """Run the image's Python once (bounded): its versions and, given a config, whether its plug-ins load there."""
    command = [*argv, "-c", PROBE_SCRIPT] + ([json.dumps(config)] if config is not None else [])
    result = _run(command, PROBE_TIMEOUT_S, env=dict(os.environ, **env))
    facts: dict = {}
    for line in result.stdout.splitlines():
        if line.startswith(PROBE_MARKER):
            facts.update(json.loads(line[len(PROBE_MARKER):]))
    if "python" not in facts:
        raise ContainerError(f"the image's Python did not run ({argv[0]} exit code {result.returncode}: "
                             f"{_last_line(result)}); check container.python (now '{argv[-1]}') and the image")
    return facts


def _minor(version: Optional[str]) -> Optional[str]:
    return ".".join(version.split(".")[:2]) if version else None


def incompatibilities(image: Mapping[str, Any], host: Mapping[str, Any], for_submit: bool) -> list[str]:
    """Each difference that would break the ranks, with its fix. Python, submitit and cloudpickle matter only when
    pickles cross (SLURM through submitit); stride must match always, since the ranks read this stride's config.json.
    """
    problems = []
    if for_submit and _minor(image.get("python")) != _minor(host["python"]):
        problems.append(f"its Python is {image.get('python')} but stride here runs on Python {host['python']}, and "
                        f"submitit's pickles cannot cross Python minor versions: build the image on Python "
                        f"{_minor(host['python'])} or submit from a Python {_minor(image.get('python'))} environment")
    if not image.get("stride_path"):
        problems.append(f"it cannot import stride ({image.get('stride_error', 'not installed')}): install stride "
                        f"{host['stride']} in the image (see containers/README.md)")
    elif image.get("stride") != host["stride"]:
        problems.append(f"it has stride {image.get('stride')} but this is stride {host['stride']}: rebuild the image "
                        f"with this stride, or submit with stride {image.get('stride')}")
    if for_submit:
        for package in ("submitit", "cloudpickle"):
            if not image.get(package):
                problems.append(f"it has no {package}: install {package}=={host[package]} in the image")
            elif _minor(image.get(package)) != _minor(host[package]):
                problems.append(f"it has {package} {image.get(package)} but this side has {host[package]}: install "
                                f"{package}=={host[package]} in the image (or the image's version here)")
    return problems


# -------------------------------------------------------------------------------------------------------- plan
def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def slurm_client_paths(environ: Mapping[str, str] = os.environ) -> list[str]:
    """What `scontrol requeue` inside an image needs from the host: the folder of Slurm's config ($SLURM_CONF, or
    /etc/slurm) and of munge's socket (/run/munge, or the one slurm.conf's AuthInfo names); those that exist."""
    conf = Path(environ.get("SLURM_CONF") or "/etc/slurm/slurm.conf")
    folders = [conf.parent] if conf.is_file() else []
    sockets = [Path("/run/munge")]
    try:
        named = re.search(r"^\s*AuthInfo\s*=.*?\bsocket=([^,\s]+)", conf.read_text(errors="replace"), re.M | re.I)
    except OSError:
        named = None
    if named:
        sockets.append(Path(named.group(1)).parent)
    folders += [folder for folder in sockets if folder.is_dir()]
    return list(dict.fromkeys(str(folder) for folder in folders))


def describe(config: Mapping[str, Any], gpus_requested: int, for_submit: bool = False) -> ContainerPlan:
    """The command alone, with no checks (for --dry-run): the runtime is resolved, nothing is run."""
    section = config["container"]
    runtime = resolve_runtime(section)
    spec = container.make_spec(section, runtime, container.wants_gpus(section["gpus"], gpus_requested))
    if for_submit and spec.runtime == "apptainer":
        spec = dataclasses.replace(spec, slurm_client=tuple(slurm_client_paths()))
    image = Path(spec.image).expanduser()
    if _is_path_image(spec):
        spec = dataclasses.replace(spec, image=str(image.absolute()))
    work_dir = Path(config["work_dir"])
    work_mount = str(work_dir)
    if spec.runtime == "charliecloud" and Path(spec.image).is_dir():
        work_mount = charliecloud_mount(Path(spec.image), work_dir)
    argv = container.build_command(spec, work_mount, os.getuid(), os.getgid())
    return ContainerPlan(spec=spec, work_mount=work_mount, argv=argv, env=runtime_env(spec))


def prepare(config: Mapping[str, Any], gpus_requested: int, for_submit: bool,
            check_plugins: bool = True) -> ContainerPlan:
    """Everything checked before a run folder exists: runtime, image, the image's Python and packages, digest."""
    plan = describe(config, gpus_requested, for_submit)
    spec = plan.spec
    _check_runtime_installed(spec)
    if _is_path_image(spec):
        check_image_path(Path(spec.image))
    else:
        plan.digest = _inspect_oci_image(spec)  # also says whether the image is there at all
    # The probe mounts what exists now: work_dir itself is created only once every check passed.
    probe_mount = str(_nearest_existing(Path(plan.work_mount)))
    probe_argv = container.build_command(dataclasses.replace(spec, gpus=False), probe_mount,
                                         os.getuid(), os.getgid())
    plan.facts = probe(probe_argv, plan.env, dict(config) if check_plugins else None)
    problems = incompatibilities(plan.facts, host_facts(), for_submit)
    if problems:
        raise ContainerError(f"container image '{spec.image}' ({spec.runtime}) cannot run this run's ranks: "
                             + "; ".join(problems))
    if plan.facts.get("plugins"):
        raise ContainerError(f"in container image '{spec.image}': {plan.facts['plugins']}")
    if _is_path_image(spec):
        plan.digest = content_digest(Path(spec.image))  # last: hashing a new multi-GB image takes seconds
    return plan
