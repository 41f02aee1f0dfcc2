"""The `stride` command line: thin wrappers that resolve configs and call launch/status code.

Fire is the only CLI dependency. Nothing here imports torch at module level: `stride --help`, `status`, `logs`,
`cancel` and `submit --dry-run` stay instant. A user error prints one `stride: error: ...` line and exits 2.
"""
from __future__ import annotations

import sys
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


def _resolve(args: Sequence[Any]) -> dict:
    files, overrides = config_lib.split_cli_args(args)
    return config_lib.resolve(overrides=overrides, files=files)


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

    def config(self, *args: Any) -> str:
        """Print the resolved config as YAML without running anything."""
        return config_lib.to_yaml(_resolve(args)).rstrip()


def _positive(flag: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise StrideError(f"{flag} must be a positive integer, got {value!r}")
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
