"""The `stride` command line: thin wrappers that resolve configs and call launch/status code.

Fire is the only CLI dependency. Nothing here imports torch at module level: `stride --help`, `status`, `logs`,
`cancel` and `submit --dry-run` stay instant. A user error prints one `stride: error: ...` line and exits 2.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from stride import config as config_lib
from stride.errors import StrideError

EXIT_USER_ERROR = 2


def normalise_argv(argv: Sequence[str]) -> list[str]:
    """Accept the seed's `--config key=value` (repeatable) beside plain `key=value` words."""
    out: list[str] = []
    words = iter(argv)
    for word in words:
        if word == "--config":
            value = next(words, None)
            if value is None:
                raise StrideError("--config needs a value: --config key=value or --config file.yaml")
            out.append(value)
        elif word.startswith("--config="):
            out.append(word[len("--config="):])
        else:
            out.append(word)
    return out


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
            flags[key] = str(value)
    if exclusive:
        flags["exclusive"] = True
    if sbatch:
        extra = {}
        for item in sbatch if isinstance(sbatch, (list, tuple)) else [sbatch]:
            key, sep, value = str(item).lstrip("-").partition("=")
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
    """

    def local(self, *args: Any, nproc: int = 1, gpus: int = 0) -> str:
        """Train a new run on this machine.

        Args:
          args: key.sub=value overrides and YAML config files (work_dir=... is required).
          nproc: processes on this machine (torch.distributed with gloo on CPU).
          gpus: GPUs to use, one process each (nccl); overrides nproc.
        """
        from stride import launch
        from stride.provenance import create_run
        from stride.trainer import check_plugins

        config = _resolve(args)
        config_lib.require_work_dir(config)
        world = _positive("--gpus", gpus) if gpus else _positive("--nproc", nproc)
        if gpus:
            config["device"] = "cuda" if config["device"] in ("auto", "cpu") else config["device"]
        check_plugins(config)
        run = create_run(config)
        print(f"stride: run folder {run.path}", file=sys.stderr)
        if world == 1:
            results = launch.run_in_process(run)
        else:
            code = launch.run_local_ranks(run, world)
            if code != 0:
                raise SystemExit(f"stride: run {run.path} failed (rank exit code {code}); see {run.logs_dir}")
            results = run.read_status().get("results") or {}
        return _summary(run, results)

    def submit(self, *args: Any, nodes: Optional[int] = None, gpus: Optional[int] = None,
               tasks_per_node: Optional[int] = None, cpus_per_task: Optional[int] = None, mem: Any = None,
               time: Any = None, partition: Optional[str] = None, account: Optional[str] = None,
               qos: Optional[str] = None, constraint: Optional[str] = None, exclusive: bool = False,
               sbatch: Any = None, setup: Any = None, profile: Optional[str] = None, dry_run: bool = False) -> str:
        """Submit a new run to SLURM through submitit and return at once with the run folder and job id.

        Args:
          args: key.sub=value overrides and YAML config files (work_dir=... is required).
          nodes: nodes to use.
          gpus: GPUs per node, one task per GPU.
          tasks_per_node: tasks per node for CPU jobs.
          cpus_per_task: CPU cores per task.
          mem: memory per node, in GB or with a unit (16G, 500M).
          time: time limit, minutes or HH:MM:SS.
          partition: SLURM partition.
          account: SLURM account.
          qos: SLURM quality of service.
          constraint: node features (--constraint).
          exclusive: whole nodes only.
          sbatch: any other sbatch option as KEY=VALUE (repeatable), e.g. --sbatch mail-type=END.
          setup: a shell line run before the ranks start (repeatable), e.g. --setup 'module load cuda'.
          profile: a cluster profile: NAME.yaml in slurm/profiles or ~/.config/stride/profiles.
          dry_run: print the sbatch script and the resolved config; submit and write nothing.
        """
        from stride import slurm

        flags = _slurm_flags(nodes, gpus, tasks_per_node, cpus_per_task, mem, time, partition, account, qos,
                             constraint, exclusive, sbatch, setup)
        config = _resolve(args, profile=profile, final=flags)
        work_dir = config_lib.require_work_dir(config)
        warning = slurm.visibility_warning(work_dir)
        if dry_run:
            from stride.rundir import next_integer_name

            params = slurm.submitit_parameters(config["slurm"], job_name=f"stride-{work_dir.name}")
            run_name = config.get("run") or str(next_integer_name(work_dir))
            preview = dict(config, run=run_name)
            text = slurm.make_sbatch_text(params, work_dir / run_name / "slurm")
            note = f"# warning: {warning}\n" if warning else ""
            return (f"{note}# sbatch script (dry run: nothing written, nothing submitted)\n{text.rstrip()}\n\n"
                    f"# resolved config for run {work_dir / run_name}\n{config_lib.to_yaml(preview).rstrip()}")
        from stride import launch
        from stride.trainer import check_plugins

        check_plugins(config)
        params = launch.preflight_slurm(config)
        if warning:
            print(f"stride: warning: {warning}", file=sys.stderr)
        run, job_id = launch.submit_run(config, params)
        return f"submitted job {job_id}\nrun folder: {run.path}"

    def status(self, target: str = ".", work_dir: Optional[str] = None) -> str:
        """Show runs: state, SLURM job, nodes, progress, latest metrics, elapsed time.

        Args:
          target: a work_dir (lists its runs) or a run folder (shows it in detail, with any failure).
          work_dir: with target as a run name: the work_dir holding it.
        """
        from stride import status as status_lib
        from stride.rundir import RunDir, find_run, list_runs

        path = Path(target)
        if work_dir is not None or RunDir(path).exists():
            run = find_run(target, work_dir)
            return status_lib.format_detail(status_lib.describe_runs([run])[0])
        runs = list_runs(path)
        if not runs:
            return f"no runs in {path.absolute()}"
        return status_lib.format_table(status_lib.describe_runs(runs))

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
        """Cancel a run's SLURM job (scancel) and mark the run cancelled."""
        from stride import status as status_lib
        from stride.proc import run_command
        from stride.rundir import find_run, now_iso

        run_dir = find_run(run, work_dir)
        job_id = status_lib.job_id_of(run_dir)
        if not job_id:
            raise StrideError(f"run {run_dir.path} has no SLURM job: a `stride local` run is stopped with Ctrl-C")
        result = run_command(["scancel", job_id])
        if result.returncode != 0:
            raise StrideError(f"scancel {job_id} failed: {(result.stderr or result.stdout).strip()}")
        run_dir.update_status(state="cancelled", ended_at=now_iso(), cancelled_at=now_iso())
        return f"cancelled job {job_id} ({run_dir.path})"

    def config(self, *args: Any, profile: Optional[str] = None) -> str:
        """Print the resolved config as YAML without running anything.

        Args:
          args: key.sub=value overrides and YAML config files.
          profile: a cluster profile to layer under them, as `stride submit --profile` would.
        """
        return config_lib.to_yaml(_resolve(args, profile=profile)).rstrip()


def _positive(flag: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise StrideError(f"{flag} must be a positive integer, got {value!r}")
    return value


def _non_negative(flag: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StrideError(f"{flag} must be zero or a positive integer, got {value!r}")
    return value


def _summary(run: Any, results: dict) -> str:
    if results.get("stopped"):
        return f"stopped at step {results['step']} ({results['reason']}); resume with: stride resume {run.path}"
    metrics = " ".join(f"{k}={v:.4f}" for k, v in results.items() if k.startswith("test_") and isinstance(v, float))
    return f"{metrics}\nrun folder: {run.path}".strip()


def main(argv: Optional[Sequence[str]] = None) -> None:
    import fire

    try:
        words = normalise_argv(sys.argv[1:] if argv is None else argv)
        fire.Fire(StrideCLI, command=words, name="stride")
    except StrideError as exc:
        print(f"stride: error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
    except fire.core.FireExit as exc:
        raise SystemExit(exc.code) from None
