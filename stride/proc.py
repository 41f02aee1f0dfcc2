"""The one way stride runs a subprocess: an argv list (never a shell string), a timeout, a clear error."""
from __future__ import annotations

import shutil
import subprocess
from typing import Optional, Sequence

from stride.errors import ClusterError

DEFAULT_TIMEOUT_S = 30.0


def run_command(argv: Sequence[str], timeout_s: float = DEFAULT_TIMEOUT_S, input_text: Optional[str] = None
                ) -> subprocess.CompletedProcess:
    """Run `argv`; a missing program or a timeout becomes a ClusterError naming it."""
    program = argv[0]
    if shutil.which(program) is None:
        raise ClusterError(f"'{program}' is not on PATH: run this on a SLURM login node, or load Slurm's module "
                           f"(e.g. `module load slurm`)")
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s, input=input_text)
    except subprocess.TimeoutExpired:
        raise ClusterError(f"'{' '.join(argv)}' did not answer within {timeout_s:.0f}s: is slurmctld up?") from None


def have(program: str) -> bool:
    return shutil.which(program) is not None
