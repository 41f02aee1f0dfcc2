"""The one launch recipe behind `stride local`, `stride submit`, `stride resume` and sweeps:

1. `prepare`: the container plan and every check that needs no run folder (plug-ins, data, model and one batch;
   GPUs here; or what Slurm would accept);
2. `create_runs` (new runs, a sweep's points sharing one code record) or `reopen` (a resumed run): folders and records;
3. a launcher: `train_here` (one process, or N ranks) or `submit` (one job, or one job array).

Each command fills in only what differs, as submitit's executors share one submission flow.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from stride.errors import StrideError

STOP_EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143, "SIGUSR2": 140}


@dataclass
class Prepared:
    """What `prepare` learnt: the container plan (None on the host) and, for SLURM, submitit's parameters."""

    plan: Any = None
    params: Optional[dict] = None

    @property
    def argv(self) -> Optional[list]:
        """How each local rank's Python starts (the container command), or None for this interpreter."""
        return self.plan.argv if self.plan else None

    @property
    def shell(self) -> Optional[str]:
        """The same as one shell string, for submitit's `python`."""
        return self.plan.shell if self.plan else None


def prepare(configs: Sequence[dict], slurm: bool, gpus: int = 0, world: int = 1, check: bool = True) -> Prepared:
    """Everything checked before a run folder exists. With a container, the image's preflight checks the plug-ins
    inside it; without one, they are checked here (`check=False` for a run that already exists)."""
    config = configs[0]
    requested = config["slurm"]["gpus_per_node"] if slurm else (world if gpus else 0)
    prepared = Prepared(plan=container_plan(config, requested, for_submit=slurm))
    if prepared.plan is None:
        if check:
            from stride.training import preflight

            preflight.check(configs)
        if not slurm:
            check_visible_gpus(config, gpus)
    if slurm:
        from stride import launch

        prepared.params = launch.preflight_slurm(config, prepared.shell)
    return prepared


def create_runs(configs: Sequence[dict], prepared: Prepared, sweep: Any = None) -> list:
    """A run folder per config, each with its complete config, records and container; a sweep's points share one
    git record (work_dir/sweeps/<id>/) and name their sweep in metadata.json."""
    from stride.provenance import create_run, share_git_record

    if sweep is None or not sweep.axes:
        runs = [create_run(config) for config in configs]
    else:
        from stride.sweep import new_sweep_id

        sweep_id = new_sweep_id()
        git = share_git_record(configs[0], sweep_id)
        runs = []
        for index, (point, config) in enumerate(zip(sweep.points(), configs)):
            run = create_run(config, git=git)
            info = {"id": sweep_id, "index": index, "size": sweep.size, "keys": sweep.keys,
                    "values": {key: leaf(config, key) for key in point}}
            run.update_metadata(lambda m, info=info: m.update(sweep=info))
            runs.append(run)
    for run in runs:
        record_container(run, prepared)
    return runs


def reopen(run: Any, config: dict, changes: dict, where: str, prepared: Prepared) -> Any:
    """A resumed run: its amendments and this start recorded (metadata.json), its container too."""
    from stride import resume as resume_lib
    from stride.provenance import launch_command

    resume_lib.record_resume(run, config, changes, where, launch_command())
    record_container(run, prepared)
    return run


def train_here(run: Any, world: int, prepared: Prepared) -> str:
    """Train `run` on this machine with `world` processes; a run stopped by a signal exits 128+signal."""
    from stride import launch

    if world == 1 and prepared.argv is None:
        results = launch.run_in_process(run)
    else:
        code = launch.run_local_ranks(run, world, prepared.argv)
        status = run.read_status()
        if code != 0:
            raise SystemExit(f"stride: run {run.path} failed (rank exit code {code}); see {run.logs_dir}")
        results = status.get("results") or {}
        if status.get("state") == "stopped":
            results = {"stopped": True, "step": status.get("step"), "reason": status.get("stop_reason")}
    if results.get("stopped"):
        print(f"stopped at step {results['step']} ({results['reason']}): checkpoint written; continue with: "
              f"stride resume {run.path} --local")
        raise SystemExit(STOP_EXIT_CODES.get(results["reason"], 1))
    return summary(run, results)


def submit(runs: Sequence[Any], configs: Sequence[dict], prepared: Prepared,
           max_parallel: Optional[int] = None) -> str:
    """One job (one run) or one job array (a sweep) through submitit; returns the job (array) id."""
    from stride import launch

    if len(runs) == 1 and max_parallel is None:
        _, job_id = launch.submit_run(configs[0], prepared.params, prepared.shell, run=runs[0])
        return job_id
    return launch.submit_array(list(configs), list(runs), prepared.params, prepared.shell, max_parallel)


def container_plan(config: dict, gpus_requested: int, for_submit: bool) -> Any:
    """With container.image set: the preflight (runtime, image, its Python and packages, plug-ins, digest) and the
    command every rank starts with; None without one. First, with or without an image: container.secret_env's
    variables must be set here (the ranks get them by name from this environment)."""
    from stride import container_check

    for warning in container_check.check_secret_env(config):
        print(f"stride: warning: {warning}", file=sys.stderr)
    if not config["container"]["image"]:
        return None
    plan = container_check.prepare(config, gpus_requested, for_submit)
    os.environ.update(plan.env)  # the ranks inherit it: locally as children, on SLURM through sbatch's --export=ALL
    return plan


def check_visible_gpus(config: dict, gpus: int) -> None:
    """A local run that asks for a device this machine does not have fails here, before its folder exists."""
    if config["device"] == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise StrideError("device=mps but this machine has no Apple GPU (MPS): use device=auto or device=cpu")
        return
    if not gpus and not str(config["device"]).startswith("cuda"):
        return
    import torch

    visible = torch.cuda.device_count()
    wanted = max(gpus, 1)
    if visible < wanted:
        shown = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise StrideError(f"{f'--gpus {gpus}' if gpus else 'device=' + config['device']} asks for {wanted} GPU(s) but "
                          f"this machine shows {visible}"
                          + (f" (CUDA_VISIBLE_DEVICES={shown})" if shown is not None else "")
                          + ": use fewer, or --nproc N for processes on the CPU")


def record_container(run: Any, prepared: Prepared) -> None:
    """metadata.json's `container`: the image, its digest and the software the preflight found in it."""
    if prepared.plan is not None:
        run.update_metadata(lambda m: m.update(container=prepared.plan.metadata()))


def leaf(config: dict, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node[part]
    return node


def summary(run: Any, results: dict) -> str:
    metrics = " ".join(f"{k}={v:.4f}" for k, v in results.items() if k.startswith("test_") and isinstance(v, float))
    return f"{metrics}\nrun folder: {run.path}".strip()
