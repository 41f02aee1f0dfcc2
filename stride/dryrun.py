"""`--dry-run`: every check a real submission makes before it submits, run to the end so one dry run lists every
problem at once; nothing is written and nothing is submitted.

The checks are the real ones (the plug-in and data preflight, the container image's preflight, `sbatch
--test-only`, the cluster's MaxArraySize), so a dry run that passes is one the real command would pass too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from stride.errors import StrideError


@dataclass
class Check:
    what: str
    problem: Optional[str] = None


class DryRun:
    """Collects the outcome of each check; `report` is what the user reads, `raise_if_failed` the exit code."""

    def __init__(self) -> None:
        self.checks: list[Check] = []

    def check(self, what: str, attempt: Callable[[], object]) -> None:
        from stride.config import one_line

        try:
            attempt()
        except StrideError as exc:
            self.checks.append(Check(what, one_line(str(exc))))
        else:
            self.checks.append(Check(what))

    @property
    def failed(self) -> list[Check]:
        return [check for check in self.checks if check.problem]

    def report(self) -> str:
        lines = ["# checks (what the real command would check before it submits)"]
        for check in self.checks:
            lines.append(f"#   ok    {check.what}" if not check.problem else
                         f"#   FAIL  {check.what}: {check.problem}")
        return "\n".join(lines)

    def finish(self, shown: str) -> str:
        """`shown` (the script, config and report) to return; printed first when a check failed, then the error."""
        if self.failed:
            print(shown)
            self.raise_if_failed()
        return shown

    def raise_if_failed(self) -> None:
        failed = self.failed
        if failed:
            more = f" (and {len(failed) - 1} more, listed above)" if len(failed) > 1 else ""
            raise StrideError(f"dry run: {failed[0].what} would fail: {failed[0].problem}{more}")


def launch_checks(dry: DryRun, configs: Sequence[dict], gpus: int, for_submit: bool) -> Optional[str]:
    """The image (with the plug-ins inside it) or, without one, the plug-ins, data and model here. Returns the
    container command the ranks would start with, when the image passed."""
    from stride import start

    config = configs[0]
    if config["container"]["image"]:
        plans: list = []
        dry.check(f"container image {config['container']['image']}: runtime, Python, packages, plug-ins",
                  lambda: plans.append(start.container_plan(config, gpus, for_submit=for_submit)))
        return plans[0].shell if plans and plans[0] else None
    from stride.training import preflight

    dry.check("plug-ins, data, model and one batch", lambda: preflight.check(configs))
    return None


def slurm_checks(dry: DryRun, sbatch_text: str, array_size: Optional[int] = None) -> None:
    """sbatch on PATH, the array within MaxArraySize, and Slurm's own verdict on the script (`--test-only`)."""
    from stride import slurm
    from stride.errors import ClusterError
    from stride.proc import have

    if not have("sbatch"):
        dry.check("sbatch on PATH", lambda: _raise(ClusterError(
            "'sbatch' is not on PATH: run on a SLURM login node (or `module load slurm`), or add "
            "--skip-slurm-checks to check the rest on a machine without Slurm")))
        return
    if array_size is not None:
        dry.check(f"a job array of {array_size} tasks within the cluster's MaxArraySize",
                  lambda: check_array_size(array_size))
    dry.check("Slurm would accept the request (sbatch --test-only)", lambda: slurm.test_only(sbatch_text))


def check_array_size(size: int) -> None:
    from stride import slurm

    limit = slurm.max_array_size()
    if limit is not None and size > limit:
        raise StrideError(f"this sweep has {size} points but the cluster's MaxArraySize is {limit}: split it into "
                          f"several submissions (fewer values per key)")


def _raise(exc: Exception) -> None:
    raise exc
