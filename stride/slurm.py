"""SLURM specifics with no side effects beyond asking Slurm: sbatch parameters from a config, the sbatch text (a pure
function, shown by --dry-run), pre-submission checks with `sbatch --test-only`, and job state queries.

Standard library and PyYAML only. submitit's own `_make_sbatch_string` builds the text, so what --dry-run prints is
exactly what submitit submits; every value in it is shell-quoted there.
"""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from stride import placement
from stride.errors import ClusterError, ConfigError
from stride.proc import run_command

SBATCH_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_-]*\Z")
# sbatch options that stride sets itself, or that would break how it submits, with what to give instead ({value}: the
# value given). sbatch takes any unambiguous abbreviation of a long option (`--nod=2` is --nodes), so a key that
# abbreviates one of these is refused too; no other sbatch option is a prefix of one of them.
OWNED_SBATCH_OPTIONS: dict[str, str] = {
    "array": "a sweep is submitted as one job array: give comma-separated values, e.g. training_kwargs.lr=1e-3,3e-4 "
             "(--max-parallel N throttles it)",
    "nodes": "use --nodes {value} (slurm.nodes)",
    "ntasks": "use --tasks-per-node N (slurm.tasks_per_node), or --gpus N for one task per GPU",
    "ntasks-per-node": "use --tasks-per-node {value} (slurm.tasks_per_node), or --gpus N for one task per GPU",
    "ntasks-per-core": "use --tasks-per-node N (slurm.tasks_per_node), or --gpus N for one task per GPU",
    "ntasks-per-gpu": "use --gpus N (slurm.gpus_per_node): one task per GPU",
    "ntasks-per-socket": "use --tasks-per-node N (slurm.tasks_per_node), or --gpus N for one task per GPU",
    "gpus": "use --gpus N (slurm.gpus_per_node): GPUs per node, one task each",
    "gpus-per-node": "use --gpus {value} (slurm.gpus_per_node)",
    "cpus-per-task": "use --cpus-per-task {value} (slurm.cpus_per_task)",
    "mem": "use --mem {value} (slurm.mem_gb)",
    "time": "use --time {value} (slurm.time_min)",
    "partition": "use --partition {value} (slurm.partition)",
    "account": "use --account {value} (slurm.account)",
    "qos": "use --qos {value} (slurm.qos)",
    "constraint": "use --constraint {value} (slurm.constraint)",
    "exclusive": "use --exclusive (slurm.exclusive)",
    "job-name": "set slurm.job_name={value}",
    "signal": "stride asks for USR2 before the time limit to checkpoint: set slurm.signal_delay_s=SECONDS",
    "output": "stride keeps the job's logs in the run folder: read them with `stride logs RUN --slurm out`",
    "error": "stride keeps the job's logs in the run folder: read them with `stride logs RUN --slurm err`",
    "open-mode": "stride appends to the job's logs, so a requeued job keeps its earlier attempts",
    "requeue": "stride always submits with --requeue (give no-requeue to opt out)",
    "wrap": "stride writes the job script: give shell lines with --setup (slurm.setup)",
    "parsable": "stride reads the job id itself",
    "wait": "stride submit returns at once: follow the run with `stride status` or `stride logs RUN --follow`",
    "test-only": "stride submit asks `sbatch --test-only` itself before submitting; --dry-run prints the script",
    "help": "it is not a job option",
    "usage": "it is not a job option",
    "version": "it is not a job option",
}
# Keys whose values become `#SBATCH --key=value` lines. sbatch reads a backslash there as an escape even inside
# quotes (`'a\b'` becomes `ab`), so no quoting can carry one.
SBATCH_TEXT_KEYS = ("partition", "account", "qos", "constraint", "job_name")
# Slurm job states that mean the job is still alive (queued, starting, running or being requeued).
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"}
# Filesystems compute nodes share with the login node on real clusters.
WARN_FILESYSTEMS = {"tmpfs", "ramfs", "overlay"}


# sbatch --time's documented forms: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS (fields are integers).
_TIME_FORMS = (
    (re.compile(r"(\d+)"), ("m",)),
    (re.compile(r"(\d+):(\d+)"), ("m", "s")),
    (re.compile(r"(\d+):(\d+):(\d+)"), ("h", "m", "s")),
    (re.compile(r"(\d+)-(\d+)"), ("d", "h")),
    (re.compile(r"(\d+)-(\d+):(\d+)"), ("d", "h", "m")),
    (re.compile(r"(\d+)-(\d+):(\d+):(\d+)"), ("d", "h", "m", "s")),
)
_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
TIME_HELP = "give minutes (90), MM:SS, HH:MM:SS (1:30:00), D-HH (1-12), D-HH:MM or D-HH:MM:SS (2-00:00:00)"
# Slurm's --mem suffixes (K, M, G, T; an optional B); stride's default unit is GB, Slurm's is MB.
_MEM = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([KMGT])B?)?\s*", flags=re.I)
_MEM_SCALE_MB = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024**2}


def parse_time_min(value: Any) -> int:
    """Minutes from sbatch's --time forms; seconds round up to the next minute, as Slurm does."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ConfigError(f"--time '{value}' is not a time: {TIME_HELP}")
    text = str(int(value)) if isinstance(value, (int, float)) else str(value).strip()
    for pattern, units in _TIME_FORMS:
        match = pattern.fullmatch(text)
        if match:
            seconds = sum(int(field) * _SECONDS[unit] for field, unit in zip(match.groups(), units))
            break
    else:
        if re.fullmatch(r"-\d+", text):
            raise ConfigError(f"--time must be positive, got {value!r}: {TIME_HELP}")
        raise ConfigError(f"--time '{value}' is not a time: {TIME_HELP}")
    if seconds <= 0:
        # sbatch reads --time=0 as "no limit"; stride always asks for one.
        raise ConfigError(f"--time must be positive, got {value!r}: {TIME_HELP}")
    return math.ceil(seconds / 60)


def parse_mem_gb(value: Any) -> float:
    """GB from 16, '16', '16G', '16GB', '500M', '1T', '2048K'; at least 1 MB (Slurm reads --mem=0 as all memory)."""
    if isinstance(value, bool):
        raise ConfigError(f"--mem '{value}' is not a memory size: give GB (16) or a unit (16G, 500M)")
    match = _MEM.fullmatch(str(value))
    if not match:
        raise ConfigError(f"--mem '{value}' is not a memory size: give GB (16) or a unit (16G, 500M)")
    mem_mb = float(match.group(1)) * _MEM_SCALE_MB[(match.group(2) or "G").upper()]
    if mem_mb < 1:
        raise ConfigError(f"--mem '{value}' is below 1 MB: Slurm would read it as --mem=0 (all of a node's memory); "
                          f"give at least 1M")
    return mem_mb / 1024


def mem_text(mem_gb: float) -> str:
    """sbatch's --mem value: whole GB, else MB rounded up (never 0MB, which Slurm reads as all memory)."""
    mem_mb = round(mem_gb * 1024, 6)  # (500/1024 GB is 500 MB, not 500.00000000000006)
    if mem_mb < 1:
        raise ConfigError(f"slurm.mem_gb={mem_gb} is below 1 MB: Slurm would read it as --mem=0 (all of a node's "
                          f"memory); give at least 0.001")
    return f"{int(mem_gb)}GB" if mem_gb == int(mem_gb) else f"{math.ceil(mem_mb)}MB"


def tasks_per_node(slurm: Mapping) -> int:
    return slurm["gpus_per_node"] or slurm["tasks_per_node"] or 1


def check_sbatch_args(args: Any) -> list[str]:
    """Problems in `slurm.sbatch_args` (also what `--sbatch KEY=VALUE` gives), one line each; [] when fine."""
    if not isinstance(args, Mapping):
        return []  # the type check names it
    problems, seen = [], {}
    for key, value in args.items():
        shown = json.dumps(str(key))
        if not SBATCH_KEY.match(str(key)):
            problems.append(f"sbatch option {shown} (slurm.sbatch_args, --sbatch) is not an sbatch option name: use "
                            f"names like mail-type or gres, without leading dashes")
            continue
        name = str(key).replace("_", "-").lower()  # submitit writes `--job_name` as --job-name
        owned = name if name in OWNED_SBATCH_OPTIONS else next(
            (option for option in OWNED_SBATCH_OPTIONS if option.startswith(name)), None)
        if owned is not None:
            how = "is" if owned == name else "abbreviates"
            hint = OWNED_SBATCH_OPTIONS[owned].replace("{value}", "N" if value is True else str(value))
            problems.append(f"sbatch option {shown} (slurm.sbatch_args, --sbatch) {how} sbatch's --{owned}, which "
                            f"stride sets itself: {hint}")
            continue
        if name in seen:
            problems.append(f"sbatch option {shown} (slurm.sbatch_args, --sbatch) is also given as "
                            f"{json.dumps(seen[name])}: give it once")
            continue
        seen[name] = str(key)
        if value is True:
            continue  # a switch: `#SBATCH --hold`
        big = isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**63
        if big or value is False or value is None or not isinstance(value, (str, int, float)):
            given = f"a {value.bit_length()}-bit integer" if big else json.dumps(value, default=str)
            problems.append(f"sbatch option {shown} (slurm.sbatch_args, --sbatch) got {given}; expected a string or "
                            f"number, or true for a switch (drop the key to leave it unset)")
        elif isinstance(value, str) and not value.strip():
            problems.append(f"sbatch option {shown} (slurm.sbatch_args, --sbatch) has an empty value: give one "
                            f"(--sbatch {key}=VALUE), or just the name for a switch (--sbatch {key})")
        elif "\\" in str(value):
            problems.append(f"sbatch option {shown} (slurm.sbatch_args, --sbatch) holds a backslash "
                            f"({json.dumps(value)}), which sbatch drops from #SBATCH lines even when quoted: remove it")
    return problems


def check_section(slurm: Any, work_dir: Any = None) -> list[str]:
    """Problems in the config's `slurm` section (and work_dir) that field types cannot catch, one line each: what
    would not reach sbatch as written, or would override what stride sets itself."""
    if not isinstance(slurm, Mapping):
        return []
    problems = check_sbatch_args(slurm.get("sbatch_args"))
    for key in SBATCH_TEXT_KEYS:
        value = slurm.get(key)
        if isinstance(value, str) and "\\" in value:
            problems.append(f"config key 'slurm.{key}' holds a backslash ({json.dumps(value)}), which sbatch drops "
                            f"from #SBATCH lines even when quoted: remove it")
    setup = slurm.get("setup")
    for index, line in enumerate(setup if isinstance(setup, list) else []):
        if not isinstance(line, str):
            problems.append(f"config key 'slurm.setup[{index}]' got {json.dumps(line, default=str)}; expected a shell "
                            f"line (a string), e.g. 'module load cuda'")
        elif line.startswith("#SBATCH"):
            # sbatch reads every #SBATCH line before the first command, so this one would become a directive.
            problems.append(f"config key 'slurm.setup[{index}]' is an #SBATCH directive ({json.dumps(line)}): give "
                            f"sbatch options with --sbatch KEY=VALUE (slurm.sbatch_args)")
    if isinstance(work_dir, str):
        for char, why in (("%", "reads as a file-name pattern (%j: the job id, %u: the user...)"),
                          ("\\", "reads as 'no patterns here', so the logs would not be where stride looks")):
            if char in work_dir:
                problems.append(f"work_dir {json.dumps(work_dir)} holds '{char}', which Slurm {why} in the job's log "
                                f"paths: choose a folder without '%' or '\\'")
                break
    return problems


def submitit_parameters(slurm: Mapping, job_name: str) -> dict:
    """Config `slurm` section -> SlurmExecutor.update_parameters keywords (and _make_sbatch_string's)."""
    problems = check_section(slurm)  # config.validate already refused these; a hand-made section is checked again
    if problems:
        raise ConfigError(problems[0])
    params: dict[str, Any] = {
        "job_name": slurm["job_name"] or job_name,
        "nodes": slurm["nodes"],
        "ntasks_per_node": tasks_per_node(slurm),
        "time": slurm["time_min"],
        "signal_delay_s": slurm["signal_delay_s"],
        # If one rank dies, srun ends the others at once instead of leaving them blocked in a collective.
        "srun_args": ["--kill-on-bad-exit=1"],
        "setup": [str(line) for line in slurm["setup"]],
        "additional_parameters": {str(k): v for k, v in slurm["sbatch_args"].items()},
    }
    # Requeueing is how stride continues a preempted or timed-out run (`scontrol requeue`); sites with
    # JobRequeue=0 refuse that for jobs not submitted with --requeue.
    if not {"no-requeue", "no_requeue"} & set(params["additional_parameters"]):
        params["additional_parameters"] = {"requeue": True, **params["additional_parameters"]}
    # GPUs as slurm.gpu_binding says, restated for the step so that a site's default binding does not override it.
    binding = slurm.get("gpu_binding") or "node"
    params.update(placement.gpu_sbatch_parameters(binding, slurm["gpus_per_node"]))
    params["srun_args"] += placement.gpu_srun_args(binding, slurm["gpus_per_node"])
    if slurm["cpus_per_task"]:
        params["cpus_per_task"] = slurm["cpus_per_task"]
        # Since Slurm 22.05 srun no longer takes --cpus-per-task from the allocation: restated, or every rank (and
        # its data-loader workers) shares one CPU on sites that bind tasks to cores.
        params["srun_args"].append(f"--cpus-per-task={slurm['cpus_per_task']}")
    if slurm["mem_gb"]:
        params["mem"] = mem_text(slurm["mem_gb"])
    for key in ("partition", "account", "qos", "constraint"):
        if slurm[key]:
            params[key] = slurm[key]
    if slurm["exclusive"]:
        params["exclusive"] = True
    return params


def submitit_command(python: str, folder: Path) -> str:
    """The per-task command submitit's sbatch runs (what SlurmExecutor builds from its `python` string)."""
    return " ".join([python, "-u -m submitit.core._submit", shlex.quote(str(folder))])


def make_sbatch_text(params: Mapping, folder: Path, python: Optional[str] = None, array: Optional[int] = None) -> str:
    """The exact sbatch script submitit writes for these parameters (pure); `array`: a job array of that many tasks."""
    from submitit.slurm.slurm import _make_sbatch_string

    python = python or shlex.quote(sys.executable)
    extra = {"map_count": array} if array else {}
    return _make_sbatch_string(command=submitit_command(python, folder), folder=folder, **params, **extra)


def test_only(sbatch_text: str, timeout_s: float = 30.0) -> None:
    """Ask Slurm whether it would accept this script (`sbatch --test-only`); refuse with its own words if not."""
    with tempfile.NamedTemporaryFile("w", suffix=".sbatch", delete=False) as handle:
        handle.write(sbatch_text)
        path = handle.name
    try:
        result = run_command(["sbatch", "--test-only", path], timeout_s)
    finally:
        os.unlink(path)
    if result.returncode != 0:
        said = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        reason = said[-1] if said else f"exit code {result.returncode}"
        reason = re.sub(r"^sbatch: error: (Batch job submission failed: )?", "", reason)
        raise ClusterError(f"SLURM refused the request: {reason}; {refusal_hint(reason)}")


# What Slurm's refusal names -> the flag that set it (Slurm's own wording, src/common/slurm_errno.c).
REFUSAL_FLAGS = [
    (r"policy", "--qos, --time or --nodes against your limits (see `sacctmgr show assoc user=$USER`)"),
    (r"account|association", "--account (see `sacctmgr show assoc user=$USER`)"),
    (r"partition", "--partition (see `sinfo -s`)"),
    (r"qos", "--qos (see `sacctmgr show qos`)"),
    (r"time limit", "--time (see the partition's MaxTime in `sinfo -o '%P %l'`)"),
    (r"gres|generic resource|gpu", "--gpus (see the nodes' GPUs in `sinfo -o '%N %G'`)"),
    (r"feature|constraint", "--constraint (see the nodes' features in `sinfo -o '%N %f'`)"),
    (r"memory|mem", "--mem (see the nodes' memory in `sinfo -o '%N %m'`)"),
    (r"array", "the sweep's size or --max-parallel (see MaxArraySize in `scontrol show config`)"),
    (r"processors|cpu|node configuration|node count|nodes", "--nodes, --tasks-per-node, --cpus-per-task or --gpus "
     "(see the nodes in `sinfo -N -o '%N %c %m %G'`)"),
]


def refusal_hint(reason: str) -> str:
    """Name the flag Slurm objected to, or every candidate when its words do not say."""
    for pattern, flag in REFUSAL_FLAGS:
        if re.search(pattern, reason, re.IGNORECASE):
            return f"check {flag}"
    return "check --partition/--account/--qos/--time/--nodes against `sinfo` and `sacctmgr show assoc user=$USER`"


def filesystem_type(path: Path) -> Optional[str]:
    """The filesystem type holding `path`, from /proc/mounts (Linux); None when unknown."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    path = path.resolve()
    best, best_type = -1, None
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = fields[1].replace("\\040", " ")
        if (str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")) and len(mount) > best:
            best, best_type = len(mount), fields[2]
    return best_type


def visibility_warning(work_dir: Path) -> Optional[str]:
    """A warning when compute nodes are unlikely to see work_dir (node-local or memory filesystems)."""
    probe = work_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    fstype = filesystem_type(probe)
    if str(work_dir.resolve()).startswith(("/tmp/", "/var/tmp/", "/dev/shm/")) or fstype in WARN_FILESYSTEMS:
        return (f"work_dir {work_dir} is on a node-local filesystem ({fstype or 'local'}); compute nodes of a real "
                f"cluster may not see it: put work_dir on a shared filesystem (home, project or scratch)")
    return None


# What rank 0 writes to the job's stderr when an attempt starts: a requeued job keeps its id and appends to the same
# log, so only the text after the last mark tells how the latest attempt ended.
ATTEMPT_MARK = "stride: attempt "
# srun's report of a task that did not exit 0, in the batch step's stderr (JOB_0_log.err):
#   srun: error: node1: task 1: Killed            srun: error: node2: tasks 2-3: Exited with exit code 1
_SRUN_TASK_END = re.compile(r"^srun: error: (?P<node>[^\s:]+): tasks? (?P<tasks>[\d,-]+): (?P<how>.+?)\s*$", re.M)
# slurmstepd's line when the whole job ends early (a STEP line alone only means srun ended the step).
_JOB_ENDING = re.compile(r"\*\*\* JOB \S+ ON \S+ CANCELLED AT \S+(?: DUE TO (?P<why>[A-Z ]+?))? \*\*\*")
_ENDINGS = {None: "cancelled", "TIME LIMIT": "timeout", "PREEMPTION": "preempted", "NODE FAILURE": "node_fail"}


def last_attempt(log_text: str) -> str:
    """The part of a job log written by its latest attempt (all of it when no attempt mark is there)."""
    at = log_text.rfind(ATTEMPT_MARK)
    return log_text[at:] if at >= 0 else log_text


def job_ending(log_text: str) -> Optional[str]:
    """cancelled, timeout, preempted or node_fail from slurmstepd's last job line; None for a requeue or none."""
    endings = list(_JOB_ENDING.finditer(log_text))
    return _ENDINGS.get(endings[-1]["why"]) if endings else None


def dead_task(log_text: str) -> Optional[dict]:
    """{rank, node, how, tasks} of the task srun saw die: the first killed by a signal other than the SIGTERM srun
    sends the others once one has failed, else the first that exited non-zero; None when every task ended well."""
    ends = list(_SRUN_TASK_END.finditer(log_text))
    exited = [m for m in ends if m["how"].startswith("Exited with exit code")]
    signalled = [m for m in ends if m not in exited and m["how"] != "Terminated"]
    first = (signalled or exited or [None])[0]
    if first is None:
        return None
    return {"rank": int(re.match(r"\d+", first["tasks"]).group()), "node": first["node"], "how": first["how"],
            "tasks": first["tasks"]}


def query_squeue(job_ids: Iterable[str], timeout_s: float = 15.0) -> Optional[dict[str, dict]]:
    """{job_id: {state, nodes, elapsed, reason}} for jobs squeue still knows; None when squeue cannot be asked."""
    ids = sorted({str(j) for j in job_ids if j})
    if not ids:
        return {}
    try:
        # -r: one line per array task; without it pending tasks collapse into one `ID_[2-3%2]` line.
        result = run_command(["squeue", "-h", "-r", "-j", ",".join(ids), "-o", "%i|%T|%N|%M|%r"], timeout_s)
    except ClusterError:
        return None
    if result.returncode != 0:
        # Jobs the controller has already forgotten are an answer ("not queued"), anything else is not.
        return {} if "Invalid job id" in result.stderr else None
    out = {}
    for line in result.stdout.splitlines():
        parts = line.split("|")
        if len(parts) == 5:
            out[parts[0]] = {"state": parts[1], "nodes": parts[2], "elapsed": parts[3], "reason": parts[4]}
    return out


def query_sacct(job_ids: Iterable[str], timeout_s: float = 15.0) -> dict[str, dict]:
    """{job_id: {state, nodes, elapsed, exit_code}} from accounting; {} when sacct is unavailable or refuses."""
    ids = sorted({str(j) for j in job_ids if j})
    if not ids:
        return {}
    try:
        result = run_command(["sacct", "-n", "-P", "-X", "-j", ",".join(ids), "-o", "JobID,State,NodeList,Elapsed,"
                              "ExitCode"], timeout_s)
    except ClusterError:
        return {}
    if result.returncode != 0:
        return {}
    out = {}
    for line in result.stdout.splitlines():
        parts = line.split("|")
        if len(parts) == 5:
            out[parts[0]] = {"state": parts[1].split()[0], "nodes": parts[2], "elapsed": parts[3],
                             "exit_code": parts[4]}
    return out


def time_left_s(job_id: str, timeout_s: float = 15.0) -> Optional[float]:
    """Seconds until the job's time limit, from squeue; None when unknown or unlimited."""
    from stride.requeue import parse_time_left

    try:
        result = run_command(["squeue", "-h", "-r", "-j", str(job_id), "-o", "%L"], timeout_s)
    except ClusterError:
        return None
    return parse_time_left(result.stdout) if result.returncode == 0 else None


_PREEMPT_TIME = re.compile(r"(?:^|\s)PreemptTime=(\S+)")


def parse_preempted(show_job_text: str) -> bool:
    """Whether `scontrol show job -o` says Slurm has picked the job for preemption (PreemptTime set)."""
    match = _PREEMPT_TIME.search(show_job_text)
    return bool(match) and match.group(1) not in ("None", "Unknown", "N/A")


def being_preempted(job_id: str, timeout_s: float = 15.0) -> bool:
    """True while a preemption's GraceTime runs: the SIGTERM (or --signal) the ranks got is that preemption's."""
    try:
        result = run_command(["scontrol", "show", "job", "-o", str(job_id)], timeout_s)
    except ClusterError:
        return False
    return result.returncode == 0 and parse_preempted(result.stdout)


def requeue(job_id: str, timeout_s: float = 30.0) -> Optional[str]:
    """`scontrol requeue JOB`: the job goes back to pending with the same id; returns an error message or None."""
    try:
        result = run_command(["scontrol", "requeue", str(job_id)], timeout_s)
    except ClusterError as exc:
        return str(exc)
    return None if result.returncode == 0 else (result.stderr or result.stdout).strip()


def max_array_size(timeout_s: float = 15.0) -> Optional[int]:
    """The cluster's MaxArraySize (array indices must stay below it); None when scontrol cannot say."""
    try:
        result = run_command(["scontrol", "show", "config"], timeout_s)
    except ClusterError:
        return None
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", result.stdout, re.MULTILINE)
    return int(match.group(1)) if match else None


_DEF_CPU_PER_GPU = re.compile(r"(?:^|[\s,=])DefCpuPerGPU=(\d+)")
_GRES_GPUS = re.compile(r"(?:^|,)gpu(?::[^:,(]+)?:(\d+)")


def parse_cpus_per_gpu(partition_text: str, sinfo_text: str) -> Optional[tuple[int, str]]:
    """(CPUs per GPU, where from): the partition's DefCpuPerGPU (`scontrol show partition -o`), else its GPU nodes'
    CPUs over their GPUs (`sinfo -h -o '%c|%G'`, the smallest share over node types); None when neither says."""
    match = _DEF_CPU_PER_GPU.search(partition_text)
    if match and int(match.group(1)) > 0:
        return int(match.group(1)), "its DefCpuPerGPU"
    shares = []
    for line in sinfo_text.splitlines():
        cpus, _, gres = line.partition("|")
        gpus = sum(int(count) for count in _GRES_GPUS.findall(gres.strip()))
        if cpus.strip().isdigit() and gpus:
            shares.append((int(cpus) // gpus, f"{cpus.strip()} CPUs / {gpus} GPUs per node"))
    if not shares:
        return None
    share, why = min(shares)
    return (share, why) if share > 0 else None


def partition_cpus_per_gpu(partition: Optional[str], timeout_s: float = 15.0) -> Optional[tuple[int, str]]:
    """parse_cpus_per_gpu for `partition` (the default one when None), asked of Slurm; None when it cannot say."""
    which = [partition] if partition else []
    try:
        shown = run_command(["scontrol", "show", "partition", "-o", *which], timeout_s)
        nodes = run_command(["sinfo", "-h", "-o", "%c|%G|%P", *(["-p", partition] if partition else [])], timeout_s)
    except ClusterError:
        return None
    if shown.returncode != 0 or nodes.returncode != 0:
        return None
    lines = shown.stdout.splitlines()
    if not partition:  # the default partition's line, and sinfo's lines for it (marked with a *)
        lines = [line for line in lines if " Default=YES " in f" {line} "]
        rows = [row for row in nodes.stdout.splitlines() if row.endswith("*")]
    else:
        rows = nodes.stdout.splitlines()
    return parse_cpus_per_gpu("\n".join(lines), "\n".join(rows))


def default_cpus_per_task(slurm_section: dict, timeout_s: float = 15.0) -> Optional[str]:
    """With GPUs and no --cpus-per-task, take the partition's CPUs per GPU (set in `slurm_section`); returns the note
    to show, a warning where Slurm cannot say, or None when there is nothing to decide."""
    if not slurm_section["gpus_per_node"] or slurm_section["cpus_per_task"]:
        return None
    found = partition_cpus_per_gpu(slurm_section["partition"], timeout_s)
    where = f"partition {slurm_section['partition']}" if slurm_section["partition"] else "the default partition"
    if found is None:
        return (f"warning: no --cpus-per-task, and the CPUs per GPU of {where} could not be read from Slurm: each "
                f"rank gets the site's default (often 1 CPU); give --cpus-per-task N")
    slurm_section["cpus_per_task"] = found[0]
    return (f"note: --cpus-per-task {found[0]}, the CPUs per GPU of {where} ({found[1]}); give --cpus-per-task to "
            f"choose")
