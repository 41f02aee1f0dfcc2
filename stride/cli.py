"""The `stride` command line: thin wrappers that resolve configs and call launch/status code.

Fire is the only CLI dependency. Nothing here imports torch at module level: `stride --help`, `status`, `logs`,
`cancel` and `submit --dry-run` stay instant. A user error prints one `stride: error: ...` line and exits 2.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from stride import config as config_lib
from stride.errors import StrideError

EXIT_USER_ERROR = 2


# Switches: Fire would otherwise take the next word as their value (`--local epochs=3` -> local="epochs=3").
BOOLEAN_FLAGS = {"--local", "--dry-run", "--dry_run", "--exclusive", "--follow", "--skip-slurm-checks",
                 "--skip_slurm_checks"}


# Flags given once per value, every value kept in order (Fire alone keeps only the last of a repeated flag).
REPEATABLE_FLAGS = {"sbatch": "--sbatch mail-type=END", "setup": "--setup 'module load cuda'"}
# Flags whose value is text as typed: Fire would read `--account 0x10` as 16, `--partition 1e3` as 1000.0, `--qos
# 007` as 7 and `--partition a,b` as a tuple.
TEXT_FLAGS = {"partition", "account", "qos", "constraint", "mem", "time", "profile", "container", "work-dir", "sort",
              "slurm", "metric", "out"}


def _quoted(value: Any) -> str:
    """A Python literal that Fire's parser turns back into exactly `value` (a string or a list of strings)."""
    return repr(value)


def _text_positions(command: str, flags: set[str]) -> tuple[list[bool], bool]:
    """For `command`'s positional parameters not given as flags: whether each takes text; and whether its *args do."""
    import inspect

    method = getattr(StrideCLI, command, None)
    if method is None or command.startswith("_"):
        return [], False
    takes_text, var_text = [], False
    for name, param in inspect.signature(method).parameters.items():
        if name == "self" or name in flags:
            continue
        if param.kind is param.VAR_POSITIONAL:
            var_text = True  # overrides, config files, run names: always text
        elif param.kind is param.POSITIONAL_OR_KEYWORD:
            takes_text.append(str(param.annotation) in ("str", "Optional[str]"))
    return takes_text, var_text


def normalise_argv(argv: Sequence[str]) -> list[str]:
    """Accept the seed's `--config key=value` (repeatable) beside plain `key=value` words; pin switches to True;
    keep every value of a repeatable flag (--sbatch, --setup) and the text of names (--account 0x10, a run named
    1e3); refuse any other flag given twice."""
    from fire.parser import DefaultParseValue

    out: list[str] = []
    repeated: dict[str, list[str]] = {}
    given: dict[str, str] = {}
    positional: list[int] = []  # where in `out` the positional words are
    words = list(argv)
    index = 0
    while index < len(words):
        word = words[index]
        index += 1
        if word == "--":
            out.extend(words[index - 1:])  # what follows is for Fire itself (--completion, --help)
            break
        if word in BOOLEAN_FLAGS:
            out.append(f"{word}=True")
        elif word == "--config":
            if index >= len(words):
                raise StrideError("--config needs a value: --config key=value or --config file.yaml")
            positional.append(len(out))
            out.append(words[index])
            index += 1
        elif word.startswith("--config="):
            positional.append(len(out))
            out.append(word[len("--config="):])
        elif word.startswith("--") and len(word) > 2:
            flag, has_value, value = word.partition("=")
            name = flag[2:].replace("_", "-")
            takes_next = not has_value and index < len(words) and not _fire_flag(words[index])
            if name in REPEATABLE_FLAGS or name in TEXT_FLAGS:
                if not has_value and not takes_next:
                    example = REPEATABLE_FLAGS.get(name, f"{flag} VALUE")
                    raise StrideError(f"{flag} needs a value, e.g. {example} (write {flag}=VALUE for a value that "
                                      f"starts with '-')")
            if takes_next:
                value = words[index]
                index += 1
            if name in REPEATABLE_FLAGS:
                if name not in repeated:
                    repeated[name] = []
                    out.append(flag)  # the placeholder for every value, filled in below
                repeated[name].append(value)
                continue
            if name in given and name not in ("help", "h"):
                raise StrideError(f"--{name} is given twice ({given[name]!r} and {value!r}): give it once")
            given[name] = value
            if name in TEXT_FLAGS:
                out.append(f"{flag}={_quoted(value)}")
            else:
                out.extend([word, value] if takes_next else [word])
        else:
            positional.append(len(out))
            out.append(word)
    for name, values in repeated.items():
        slot = next(i for i, word in enumerate(out) if word.startswith("--") and
                    word[2:].replace("_", "-") == name)
        out[slot] = f"{out[slot]}={_quoted(values)}"
    # Positional words bound to text parameters keep their text: `stride cancel 0x10 --work-dir exp` names run
    # "0x10", not run 16. The first word is the command.
    if out and positional and positional[0] == 0:
        command = out[0]
        takes_text, var_text = _text_positions(command, {n.replace("-", "_") for n in (*given, *repeated)})
        for order, slot in enumerate(positional[1:]):
            text = takes_text[order] if order < len(takes_text) else var_text
            parsed = DefaultParseValue(out[slot])
            if text and not (isinstance(parsed, str) and parsed == out[slot]):
                out[slot] = _quoted(out[slot])
    return out


def _fire_flag(word: str) -> bool:
    """Whether Fire reads `word` as a flag (so the flag before it is a switch), as fire.core._IsFlag does."""
    import re

    return word.startswith("--") or bool(re.match(r"-[a-zA-Z]", word))


FIRE_FLAGS = {"help", "h"}


def _default_command(words: list[str]) -> list[str]:
    """The seed's command line names no command (`python -m stride --config work_dir=X ...`): it trains here."""
    if words and not words[0].startswith("-") and ("=" in words[0] or words[0].endswith((".yaml", ".yml"))):
        return ["local", *words]
    return words


def check_words(words: Sequence[str]) -> None:
    """Refuse an unknown command or option before anything runs.

    Fire calls the command first and only then complains about words it could not use, so a typo such as
    `--nodse 2` would otherwise train or submit with the wrong settings.
    """
    import inspect

    from stride.errors import did_you_mean

    if not words or words[0].startswith("-"):
        return
    commands = [name for name in dir(StrideCLI) if not name.startswith("_")]
    if words[0] not in commands:
        raise StrideError(f"unknown command '{words[0]}'{did_you_mean(words[0], commands)}; commands: "
                          f"{', '.join(commands)} (stride --help explains them)")
    params = inspect.signature(getattr(StrideCLI, words[0])).parameters
    options = [name for name, p in params.items() if name != "self" and p.kind is not p.VAR_POSITIONAL]
    for word in words[1:]:
        if word == "--":
            return  # what follows is for Fire itself (--completion, --help)
        if not word.startswith("--"):
            continue
        name = word[2:].partition("=")[0].replace("-", "_")
        if name not in options and name not in FIRE_FLAGS:
            spelled = [f"--{o.replace('_', '-')}" for o in options]
            settings = [key for key in config_lib.known_keys() if key.endswith("." + name)]
            hint = (f" (did you mean the setting {' or '.join(f'{k}=...' for k in settings)}?)" if settings
                    else did_you_mean('--' + name.replace('_', '-'), spelled))
            raise StrideError(f"unknown option --{word[2:].partition('=')[0]} for `stride {words[0]}`{hint}; "
                              f"its options: "
                              f"{', '.join(spelled) or '(none)'}; a config setting is key=value, without dashes")


def _resolve(args: Sequence[Any], profile: Optional[str] = None, final: Optional[dict] = None) -> dict:
    files, overrides = config_lib.split_cli_args(args)
    return config_lib.resolve(overrides=overrides, files=files, profile=profile, final=final)


def _slurm_flags(nodes: Any, gpus: Any, tasks_per_node: Any, cpus_per_task: Any, mem: Any, time: Any,
                 partition: Any, account: Any, qos: Any, constraint: Any, exclusive: Any, sbatch: Any,
                 setup: Any) -> dict:
    """CLI flags -> the config's `slurm` section (flags win over every config layer)."""
    from stride import slurm

    flags: dict[str, Any] = {}
    for name, key, value in (("--nodes", "nodes", nodes), ("--gpus", "gpus_per_node", gpus),
                             ("--tasks-per-node", "tasks_per_node", tasks_per_node),
                             ("--cpus-per-task", "cpus_per_task", cpus_per_task)):
        if value is not None:
            flags[key] = _positive(name, value) if key != "gpus_per_node" else _non_negative(name, value)
    if mem is not None:
        flags["mem_gb"] = slurm.parse_mem_gb(mem)
    if time is not None:
        flags["time_min"] = slurm.parse_time_min(time)
    for key, value in (("partition", partition), ("account", account), ("qos", qos), ("constraint", constraint)):
        if value is not None:
            # Fire reads `--partition debug,long` as a tuple; Slurm wants the comma list back.
            flags[key] = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)
    if exclusive:
        flags["exclusive"] = True
    if sbatch:
        extra = {}
        for item in sbatch if isinstance(sbatch, (list, tuple)) else [sbatch]:
            key, sep, value = str(item).lstrip("-").partition("=")
            if key in extra:
                raise StrideError(f"--sbatch {key} is given twice ({extra[key]!r} and {value if sep else True!r}): "
                                  f"give it once")
            extra[key] = value if sep else True
        flags["sbatch_args"] = extra
    if setup:
        flags["setup"] = [str(line) for line in (setup if isinstance(setup, (list, tuple)) else [setup])]
    return {"slurm": flags} if flags else {}


class StrideCLI:
    """stride: reproducible PyTorch training, from a laptop run to multi-node SLURM jobs.

    Configs are built-in defaults < WORK_DIR/config.yaml < YAML files < key.sub=value overrides, e.g.
      stride local work_dir=experiments/digits
      stride local work_dir=exp model_kwargs.model_name=ResNet training_kwargs.lr=1e-3 --nproc 2
      stride config work_dir=exp my_settings.yaml training_kwargs.epochs=5
    Then follow and compare runs:
      stride status exp;  stride diff exp/0 exp/1;  stride plot exp
    `stride COMMAND --help` explains each command.
    """

    def local(self, *args: Any, nproc: int = 1, gpus: int = 0, container: Optional[str] = None) -> str:
        """Train a new run on this machine.

        Args:
          args: key.sub=value overrides and YAML config files (work_dir=... is required).
          nproc: processes on this machine (torch.distributed with gloo on CPU).
          gpus: GPUs to use, one process each (nccl); overrides nproc.
          container: run every process inside this image (a .sif file, an image folder or an image name).
        """
        from stride import start

        _refuse_inside_srun()
        world = _positive("--gpus", gpus) if gpus else _positive("--nproc", nproc)
        sweep, configs = _resolve_sweep(args, final=_container_flag(container))
        if sweep.axes:
            return _local_sweep(sweep, configs, world, gpus)
        config = configs[0]
        config_lib.require_work_dir(config)
        if gpus:
            config["device"] = "cuda" if config["device"] in ("auto", "cpu") else config["device"]
        prepared = start.prepare([config], slurm=False, gpus=gpus, world=world)
        run = start.create_runs([config], prepared)[0]
        return start.train_here(run, world, prepared)

    def submit(self, *args: Any, nodes: Optional[int] = None, gpus: Optional[int] = None,
               tasks_per_node: Optional[int] = None, cpus_per_task: Optional[int] = None, mem: Any = None,
               time: Any = None, partition: Optional[str] = None, account: Optional[str] = None,
               qos: Optional[str] = None, constraint: Optional[str] = None, exclusive: bool = False,
               sbatch: Any = None, setup: Any = None, profile: Optional[str] = None, dry_run: bool = False,
               skip_slurm_checks: bool = False, container: Optional[str] = None,
               max_parallel: Optional[int] = None) -> str:
        """Submit a new run to SLURM through submitit and return at once with the run folder and job id.

        A sweep (`training_kwargs.lr=1e-3,3e-4 'training_kwargs.seed=range(0,3)'`, quoted for the shell) is
        submitted as ONE job array, one run folder per point.

        Args:
          args: key.sub=value overrides and YAML config files (work_dir=... is required).
          nodes: nodes to use.
          gpus: GPUs per node, one task per GPU.
          tasks_per_node: tasks per node for CPU jobs.
          cpus_per_task: CPU cores per task.
          mem: memory per node, in GB or with a unit (16G, 500M).
          time: time limit: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS.
          partition: SLURM partition.
          account: SLURM account.
          qos: SLURM quality of service.
          constraint: node features (--constraint).
          exclusive: whole nodes only.
          sbatch: any other sbatch option as KEY=VALUE (repeatable), e.g. --sbatch mail-type=END.
          setup: a shell line run before the ranks start (repeatable), e.g. --setup 'module load cuda'.
          profile: a cluster profile: NAME.yaml in slurm/profiles or ~/.config/stride/profiles.
          dry_run: print the sbatch script and the resolved config and run every check a submission makes (the
            plug-ins, the image, sbatch --test-only, the array size); submit and write nothing; exit 2 if one fails.
          skip_slurm_checks: with --dry-run on a machine without Slurm: check everything but what Slurm would say.
          container: run every rank inside this image (a .sif file, an image folder or an image name).
          max_parallel: for a sweep: at most this many of its runs at once (the job array's %N throttle).
        """
        from stride import slurm

        flags = _slurm_flags(nodes, gpus, tasks_per_node, cpus_per_task, mem, time, partition, account, qos,
                             constraint, exclusive, sbatch, setup)
        sweep, configs = _resolve_sweep(args, profile=profile, final={**flags, **_container_flag(container)})
        cpus_note = None if (dry_run and skip_slurm_checks) else slurm.default_cpus_per_task(configs[0]["slurm"])
        for point in configs[1:]:  # (slurm keys cannot be swept: every point asks for the same)
            point["slurm"]["cpus_per_task"] = configs[0]["slurm"]["cpus_per_task"]
        if cpus_note and not dry_run:
            print(f"stride: {cpus_note}", file=sys.stderr)
        if sweep.axes:
            return _submit_sweep(sweep, configs, dry_run, max_parallel, skip_slurm_checks,
                                 note=f"# {cpus_note}\n" if cpus_note else "")
        config = configs[0]
        work_dir = config_lib.require_work_dir(config)
        warning = None if config["slurm"]["work_dir_shared"] else slurm.visibility_warning(work_dir)
        if dry_run:
            from stride.rundir import next_integer_name

            run_name = config.get("run") or str(next_integer_name(work_dir))
            notes = "".join(f"# {line}\n" for line in (cpus_note, f"warning: {warning}" if warning else None) if line)
            return _dry_run(configs, work_dir / run_name, dict(config, run=run_name), skip_slurm_checks, note=notes)
        from stride import start

        prepared = start.prepare([config], slurm=True)
        if warning:
            print(f"stride: warning: {warning}", file=sys.stderr)
        run = start.create_runs([config], prepared)[0]
        job_id = start.submit([run], [config], prepared)
        return f"submitted job {job_id}\nrun folder: {run.path}"

    def resume(self, run: str, *amendments: Any, work_dir: Optional[str] = None, local: bool = False,
               nproc: Optional[int] = None, gpus: Optional[int] = None, nodes: Optional[int] = None,
               tasks_per_node: Optional[int] = None, cpus_per_task: Optional[int] = None, mem: Any = None,
               time: Any = None, partition: Optional[str] = None, account: Optional[str] = None,
               qos: Optional[str] = None, constraint: Optional[str] = None, exclusive: bool = False,
               sbatch: Any = None, setup: Any = None, profile: Optional[str] = None, dry_run: bool = False,
               skip_slurm_checks: bool = False, container: Optional[str] = None) -> str:
        """Continue a stopped, failed or cancelled run from its latest checkpoint, with its own config.

        On SLURM by default, with the resources the run used unless flags say otherwise; --local trains here with
        as many processes as the run had. A few keys may be amended, e.g. training_kwargs.epochs=40 to train a
        completed run longer; every amendment is recorded in the run's metadata.json.

        Args:
          run: a run folder (or a run name with --work-dir).
          amendments: key.sub=value changes: epochs, checkpoint cadence, data-loader workers, timeouts, slurm.*.
          work_dir: the work_dir holding `run`, when run is a name.
          local: resume on this machine instead of submitting to SLURM.
          nproc: with --local: processes on this machine (default: the run's own number of ranks).
          gpus: with --local: GPUs on this machine; on SLURM: GPUs per node.
          nodes: SLURM nodes (default: as before).
          tasks_per_node: SLURM tasks per node for CPU jobs.
          cpus_per_task: CPU cores per task.
          mem: memory per node (16G, 500M).
          time: time limit: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS.
          partition: SLURM partition.
          account: SLURM account.
          qos: SLURM quality of service.
          constraint: node features.
          exclusive: whole nodes only.
          sbatch: any other sbatch option as KEY=VALUE (repeatable).
          setup: a shell line run before the ranks start (repeatable).
          profile: a cluster profile whose slurm and container settings replace the run's (NAME.yaml in
            slurm/profiles or ~/.config/stride/profiles).
          dry_run: print the sbatch script and the amended config and run every check the resume makes; write
            and submit nothing; exit 2 if one fails.
          skip_slurm_checks: with --dry-run on a machine without Slurm: check everything but what Slurm would say.
          container: run every rank inside this image (a .sif file, an image folder or an image name).
        """
        from stride import resume as resume_lib
        from stride import status as status_lib
        from stride.rundir import find_run

        run_dir = find_run(run, work_dir)
        overrides = config_lib.split_cli_args(amendments)[1] if amendments else []
        if amendments and config_lib.split_cli_args(amendments)[0]:
            raise StrideError("stride resume takes key=value amendments only, not config files: a resumed run keeps "
                              "its own config")
        flags = {} if local else _slurm_flags(nodes, gpus, tasks_per_node, cpus_per_task, mem, time, partition,
                                              account, qos, constraint, exclusive, sbatch, setup)
        flags = _by_section(_profile_sections(profile), _container_flag(container), flags)
        original = run_dir.read_config()
        from stride.registry import import_from_launch_folder

        import_from_launch_folder(run_dir)
        config, changes = resume_lib.amend_config(run_dir, overrides, flags)
        live_state = status_lib.describe_runs([run_dir])[0]["state"]
        if dry_run:
            from stride import dryrun

            dry = dryrun.DryRun()
            said: list = []
            dry.check(f"run {run_dir.path} can be resumed",
                      lambda: said.append(resume_lib.check_resumable(run_dir, live_state, config, original,
                                                                     claim=False)))
            if said and said[0]:
                return said[0]
            note = f"# amended: {', '.join(sorted(changes))}\n" if changes else ""
            return _dry_run([config], run_dir.path, config, skip_slurm_checks, note=note, checks=dry,
                            on_slurm=not local, gpus=gpus or 0)
        nothing_to_do = resume_lib.check_resumable(run_dir, live_state, config, original)
        if nothing_to_do:
            return nothing_to_do
        from stride import start

        if local:
            previous = run_dir.read_status().get("world_size") or 1
            world = _positive("--gpus", gpus) if gpus else _positive("--nproc", nproc) if nproc is not None else previous
            if gpus:
                config["device"] = "cuda" if config["device"] in ("auto", "cpu") else config["device"]
            prepared = start.prepare([config], slurm=False, gpus=gpus, world=world, check=False)
            start.reopen(run_dir, config, changes, "local", prepared)
            print(f"stride: resuming {run_dir.path} on this machine ({world} process(es))", file=sys.stderr)
            return start.train_here(run_dir, world, prepared)
        prepared = start.prepare([config], slurm=True, check=False)
        start.reopen(run_dir, config, changes, "slurm", prepared)
        job_id = start.submit([run_dir], [config], prepared)
        return f"submitted job {job_id}\nresuming run folder: {run_dir.path}"

    def status(self, target: str = ".", work_dir: Optional[str] = None, sort: Optional[str] = None) -> str:
        """Show runs: state, SLURM job, nodes, progress, latest metrics, elapsed time; sweeps grouped.

        Args:
          target: a work_dir (lists its runs) or a run folder (shows it in detail, with any failure).
          work_dir: with target as a run name: the work_dir holding it.
          sort: order runs by this metric, best first (e.g. test_accuracy, val_loss).
        """
        from stride import status as status_lib
        from stride.rundir import RunDir, find_run, list_runs

        if sort is not None and not isinstance(sort, str):
            raise StrideError("--sort needs a metric name, e.g. --sort test_accuracy")
        path = Path(target)
        if work_dir is not None or RunDir(path).exists():
            run = find_run(target, work_dir)
            row = status_lib.describe_runs([run], keep_broken=False)[0]
            return status_lib.format_detail({**row, "placement": status_lib.read_placement(run)})
        runs = list_runs(path)
        if not runs:
            return f"no runs in {path.absolute()}"
        rows = status_lib.describe_runs(runs)
        if sort and not any(sort in row["metrics"] for row in rows):
            known = sorted({k for row in rows for k in row["metrics"]})
            raise StrideError(f"no run has the metric '{sort}' to sort by; metrics: {', '.join(known) or '(none yet)'}")
        return status_lib.format_table(rows, sort=sort)

    def logs(self, run: str, rank: int = 0, follow: bool = False, slurm: Optional[str] = None,
             work_dir: Optional[str] = None) -> None:
        """Print a run's log: the rank's own log, or with --slurm out|err that task's SLURM stdout/stderr.

        Args:
          run: a run folder (or a run name with --work-dir).
          rank: which rank's log.
          follow: keep printing as the log grows, until the run ends.
          slurm: out or err: submitit's stdout/stderr of that task in the latest job.
          work_dir: the work_dir holding `run`, when run is a name.
        """
        from stride import status as status_lib
        from stride.rundir import find_run

        if slurm not in (None, "out", "err"):
            raise StrideError(f"--slurm takes out or err, not {slurm!r}")
        run_dir = find_run(run, work_dir)
        path = status_lib.log_path(run_dir, _non_negative("--rank", rank), slurm)
        if not path.exists() and not follow:
            raise StrideError(f"no log at {path} yet: the run has not started rank {rank}"
                              + (" (is the job still pending? see `stride status`)" if slurm else ""))
        if follow:
            status_lib.follow(run_dir, path, lambda text: (sys.stdout.write(text), sys.stdout.flush()))
        else:
            sys.stdout.write(path.read_text(errors="replace"))

    def cancel(self, run: str, work_dir: Optional[str] = None) -> str:
        """Cancel a run's SLURM job (scancel) and mark the run cancelled.

        Args:
          run: a run folder (or a run name with --work-dir).
          work_dir: the work_dir holding `run`, when run is a name.
        """
        from stride import status as status_lib
        from stride.proc import run_command
        from stride.rundir import find_run, now_iso

        run_dir = find_run(run, work_dir)
        job_id = status_lib.job_id_of(run_dir)
        if not job_id:
            raise StrideError(f"run {run_dir.path} has no SLURM job: a `stride local` run is stopped with Ctrl-C")
        state = status_lib.describe_runs([run_dir])[0]["state"]
        if state in status_lib.FINAL_STATES:
            raise StrideError(f"run {run_dir.path} is already {state} (job {job_id}): nothing to cancel")
        result = run_command(["scancel", job_id])
        if result.returncode != 0:
            raise StrideError(f"scancel {job_id} failed: {(result.stderr or result.stdout).strip()}")
        from stride import runstate

        runstate.move(run_dir, "cancelled", cancelled_at=now_iso())
        return f"cancelled job {job_id} ({run_dir.path})"

    def config(self, *args: Any, profile: Optional[str] = None) -> str:
        """Print the resolved config as YAML without running anything, once it passes the checks local and submit
        make of the config (every key, type and plug-in with its keyword arguments).

        Args:
          args: key.sub=value overrides and YAML config files.
          profile: a cluster profile to layer under them, as `stride submit --profile` would.
        """
        config = _resolve(args, profile=profile)
        if not config["container"]["image"]:  # an image's plug-ins are checked inside it, by local and submit
            from stride.training.trainer import check_plugins

            check_plugins(config)  # what local/submit refuse, this refuses too: plug-ins and their kwargs
        return config_lib.to_yaml(config).rstrip()

    def diff(self, run_a: str, run_b: str, work_dir: Optional[str] = None) -> str:
        """Show the config settings that differ between two runs, one `key: A -> B` line each.

        Keys are dotted (training_kwargs.lr); a key that only one run has shows (not set) on the other side. The
        run name and work_dir say where a run lives, not how it trains, and are left out.

        Args:
          run_a: a run folder (or a run name with --work-dir).
          run_b: the run to compare it with, given the same way.
          work_dir: the work_dir holding both runs, when they are given by name.
        """
        from stride import compare
        from stride.rundir import find_run

        a, b = find_run(str(run_a), work_dir), find_run(str(run_b), work_dir)
        return compare.format_diff(compare.diff_configs(a.read_config(), b.read_config()), str(a.path), str(b.path))

    def plot(self, work_dir: str, *runs: Any, metric: Any = None, out: Optional[str] = None) -> str:
        """Draw the runs' training and validation curves (x = step) into a PNG and print its path.

        One panel per metric, one line per run, labelled by the config settings that differ between the plotted
        runs (e.g. lr=0.001 seed=1). Needs matplotlib: pip install 'stride[plot]'.

        Args:
          work_dir: the experiment folder whose runs to plot (or one run folder).
          runs: run names inside work_dir (default: every run).
          metric: metric(s) to plot, comma-separated, e.g. val_loss or train_loss,val_loss (default: train_loss
            and val_accuracy, or val_loss).
          out: the file to write: .png, .svg or .pdf (default: WORK_DIR/plots/<metrics>.png).
        """
        from stride import plot as plot_lib
        from stride.rundir import RunDir, find_run, list_runs

        folder = Path(str(work_dir))
        if RunDir(folder).exists() and not runs:
            selected = [RunDir(folder)]
        else:
            selected = [find_run(str(run), folder) for run in runs] if runs else list_runs(folder)
        if not selected:
            raise StrideError(f"no runs in {folder.absolute()}: train one first, e.g. `stride local "
                              f"work_dir={work_dir}`")
        panels = plot_lib.build_panels(selected, plot_lib.parse_metrics(metric))
        target = Path(out) if out else plot_lib.default_output(folder, list(panels))
        return str(plot_lib.render(panels, target, title=str(folder)).absolute())


def _positive(flag: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise StrideError(f"{flag} must be a positive integer, got {value!r}")
    return value


def _non_negative(flag: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StrideError(f"{flag} must be zero or a positive integer, got {value!r}")
    return value


def _resolve_sweep(args: Sequence[Any], profile: Optional[str] = None,
                   final: Optional[dict] = None) -> tuple[Any, list[dict]]:
    """(sweep, one resolved config per point); a plain command line is a sweep of one point with no axes.

    Every point is resolved and validated here, before anything is written (the plug-ins and data are checked by
    `start.prepare`).
    """
    from stride import sweep as sweep_lib

    files, overrides = config_lib.split_cli_args(args)
    sweep = sweep_lib.parse(overrides)
    configs = [config_lib.resolve(overrides=sweep.overrides(point), files=files, profile=profile, final=final)
               for point in sweep.points()]
    if sweep.axes:
        config_lib.require_work_dir(configs[0])
        swept_container = [key for key in sweep.keys if key.startswith("container.")]
        if swept_container:
            raise StrideError(f"{swept_container[0]} cannot be swept: every point of a sweep runs in the same image; "
                              f"submit one sweep per image")
        if configs[0].get("run"):
            raise StrideError(f"run={configs[0]['run']} names one run, but this sweep makes {sweep.size}: leave run "
                              f"unset and every point gets the next free number")
    return sweep, configs


def _describe_points(sweep: Any, configs: list[dict]) -> str:
    from stride import start

    header = ["#", *sweep.keys]
    rows = [[str(i), *(str(start.leaf(c, k)) for k in sweep.keys)] for i, c in enumerate(configs)]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in [header, *rows])


def _local_sweep(sweep: Any, configs: list[dict], world: int, gpus: int) -> str:
    """The points one after another on this machine; a failed point does not stop the others."""
    from stride import start

    if gpus:
        for config in configs:
            config["device"] = "cuda" if config["device"] in ("auto", "cpu") else config["device"]
    prepared = start.prepare(configs, slurm=False, gpus=gpus, world=world)
    runs = start.create_runs(configs, prepared, sweep)
    print(f"stride: sweep of {sweep.size} runs in {runs[0].path.parent}:\n{_describe_points(sweep, configs)}",
          file=sys.stderr)
    failed = []
    for run in runs:
        print(f"stride: run folder {run.path}", file=sys.stderr)
        try:
            start.train_here(run, world, prepared)
        except SystemExit as exc:
            if exc.code in start.STOP_EXIT_CODES.values():
                raise
            failed.append(run.name)
        except StrideError as exc:
            print(f"stride: error: run {run.path}: {exc}", file=sys.stderr)
            failed.append(run.name)
    from stride import status as status_lib

    table = status_lib.format_table(status_lib.describe_runs(runs))
    if failed:
        print(table)
        raise SystemExit(f"stride: {len(failed)} of {sweep.size} sweep runs failed: {', '.join(failed)}")
    return table


def _submit_sweep(sweep: Any, configs: list[dict], dry_run: bool, max_parallel: Optional[int],
                  skip_slurm_checks: bool = False, note: str = "") -> str:
    """The whole sweep as one job array, refused when it cannot be one (per-point resources, MaxArraySize)."""
    from stride import slurm

    if max_parallel is not None:
        max_parallel = _positive("--max-parallel", max_parallel)
    swept_slurm = [key for key in sweep.keys if key.startswith("slurm.")]
    if swept_slurm:
        raise StrideError(f"{swept_slurm[0]} cannot be swept in one job array (every task gets the same "
                          f"allocation): submit one sweep per resource shape")
    config = configs[0]
    work_dir = config_lib.require_work_dir(config)
    params = slurm.submitit_parameters(config["slurm"], job_name=f"stride-{work_dir.name}")
    python = _container_command(config)
    if dry_run:
        from stride import dryrun

        dry = dryrun.DryRun()
        python = dryrun.launch_checks(dry, configs, config["slurm"]["gpus_per_node"], for_submit=True) or python
        preview = dict(params, array_parallelism=max_parallel or sweep.size)
        text = slurm.make_sbatch_text(preview, work_dir / "sweeps" / "<id>" / "slurm", python, array=sweep.size)
        if not skip_slurm_checks:
            dryrun.slurm_checks(dry, text, array_size=sweep.size)
        shown = (f"{note}# sweep of {sweep.size} runs as one job array (dry run: nothing written, nothing submitted)\n"
                 f"{_describe_points(sweep, configs)}\n\n# sbatch script\n{text.rstrip()}\n\n{dry.report()}")
        return dry.finish(shown)
    from stride import dryrun, start

    dryrun.check_array_size(sweep.size)
    prepared = start.prepare(configs, slurm=True)
    warning = None if config["slurm"]["work_dir_shared"] else slurm.visibility_warning(work_dir)
    if warning:
        print(f"stride: warning: {warning}", file=sys.stderr)
    runs = start.create_runs(configs, prepared, sweep)
    array_id = start.submit(runs, configs, prepared, max_parallel or sweep.size)
    lines = [f"submitted job array {array_id} ({sweep.size} runs, at most {max_parallel or sweep.size} at once)"]
    lines += [f"run folder: {run.path}  {' '.join(f'{k}={start.leaf(c, k)}' for k in sweep.keys)}"
              for run, c in zip(runs, configs)]
    return "\n".join(lines)


def _dry_run(configs: list[dict], run_path: Path, preview: dict, skip_slurm_checks: bool, note: str = "",
             checks: Any = None, on_slurm: bool = True, gpus: int = 0) -> str:
    """The sbatch script, the config and every check's outcome; exit non-zero when one would fail."""
    from stride import dryrun, slurm

    dry = checks or dryrun.DryRun()
    config = configs[0]
    python = dryrun.launch_checks(dry, configs, config["slurm"]["gpus_per_node"] if on_slurm else gpus,
                                  for_submit=on_slurm) or _container_command(config, on_slurm)
    script = ""
    if on_slurm:
        params = slurm.submitit_parameters(config["slurm"], job_name=f"stride-{Path(config['work_dir']).name}")
        text = slurm.make_sbatch_text(params, run_path / "slurm", python)
        if not skip_slurm_checks:
            dryrun.slurm_checks(dry, text)
        script = f"# sbatch script (dry run: nothing written, nothing submitted)\n{text.rstrip()}\n\n"
    else:
        script = "# dry run: nothing written, nothing started\n"
    text = (f"{note}{script}# resolved config for run {run_path}\n{config_lib.to_yaml(preview).rstrip()}\n\n"
            f"{dry.report()}")
    return dry.finish(text)


def _refuse_inside_srun() -> None:
    """`srun stride local` in a multi-task allocation would train one unrelated copy per task."""
    from stride.distenv import srun_task_count

    tasks = srun_task_count()
    if tasks > 1:
        raise StrideError(f"stride local is running as one of {tasks} tasks of an srun job step: each task would "
                          f"train its own unrelated copy; submit with `stride submit` (it starts and connects the "
                          f"ranks itself), or run `stride local --nproc N` once per node")


def _by_section(*layers: dict) -> dict:
    """Layers of {section: {key: value}}, later ones winning key by key."""
    merged: dict = {}
    for layer in layers:
        for section, values in layer.items():
            merged.setdefault(section, {}).update(values)
    return merged


def _profile_sections(profile: Optional[str]) -> dict:
    """A cluster profile's slurm and container sections, for a resumed run (its other keys are the run's own)."""
    if profile is None:
        return {}
    layer = config_lib.load_yaml_file(config_lib.find_profile(profile)) or {}
    return {key: layer[key] for key in ("slurm", "container") if isinstance(layer.get(key), dict)}


def _container_flag(image: Any) -> dict:
    """--container IMAGE -> the config's container.image (the flag wins over every config layer)."""
    return {} if image is None else {"container": {"image": str(image)}}


def _container_command(config: dict, for_submit: bool = True) -> Optional[str]:
    """The per-rank container command for --dry-run (nothing is run), or None without a container."""
    if not config["container"]["image"]:
        return None
    from stride import container_check

    return container_check.describe(config, config["slurm"]["gpus_per_node"], for_submit).shell


def _print_help(raw: list[str]) -> bool:
    """Help for `stride [COMMAND] --help`, in the README's flag spelling; refuses short options but -h."""
    from stride import cli_help

    named = _default_command([word for word in raw if not word.startswith("-")][:1] or [""])[0]
    command = getattr(StrideCLI, named, None) if named and not named.startswith("_") else None
    if not cli_help.wants_help(raw):
        cli_help.refuse_short_options(raw, command, named)
        return False
    if command is None and named and not cli_help.wants_help(raw[:1]):
        check_words([named])  # an unknown command: the usual one-line refusal
    print(cli_help.command_help(named, command) if command else cli_help.top_help(StrideCLI()))
    return True


def main(argv: Optional[Sequence[str]] = None) -> None:
    import signal

    import fire

    # SIGTERM ends the command through its finalisers (its default would kill it on the spot, and a run it had just
    # created would say pending forever); a launcher replaces this with its own graceful stop.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        from stride.registry import import_from

        try:
            import_from(os.getcwd())  # plug-ins by import path from the project folder, as under `python -m stride`
        except OSError:
            pass  # the folder was deleted under the shell: nothing there to import from
        raw = list(sys.argv[1:] if argv is None else argv)
        if _print_help(raw):
            return
        words = _default_command(normalise_argv(raw))
        check_words(words)
        # An instance, not the class: Fire's completion script would otherwise offer a `--self` flag everywhere.
        fire.Fire(StrideCLI(), command=words, name="stride")
    except StrideError as exc:
        # One line, whatever the message quotes (a name with a line break or an ESC stays visible, not live).
        print(f"stride: error: {config_lib.one_line(str(exc))}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
    except fire.core.FireExit as exc:
        raise SystemExit(exc.code) from None
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside training (the first one checkpoints and stops)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # one more must not cut short the exit, nor what atexit records
        print("stride: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except BrokenPipeError:  # `stride status | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0) from None
    except (OSError, RuntimeError) as exc:  # the world's errors (no permission, a full disk, `~nobody`): one line
        from stride.errors import world_error

        error = world_error(exc, sys.argv[1:] if argv is None else argv)
        if error is None:
            raise
        print(f"stride: error: {config_lib.one_line(str(error))}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
