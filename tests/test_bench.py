"""The bench runs from its one command and reports every row. A smoke test of the bench itself: nothing here is
timed, and no figure it prints is checked (those belong in docs/benchmarks.md, measured on a quiet machine)."""
from __future__ import annotations

import json
import math
import subprocess
import sys

from conftest import REPO

BENCH_TIMEOUT_S = 600


def test_quick_bench_reports_every_row(tmp_path):
    out_json = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--json", str(out_json),
                           "--work-dir", str(tmp_path / "scratch")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout
    for row in ("MLP, overhead-sensitive: training steps/s (raw: the careful loop",
                "MLP, overhead-sensitive: training steps/s against the usual loop", "CNN, the default: training steps/s",
                "char-LM, a stride.Task on dict batches: training steps/s", "how much slower those steps ran",
                "process start → first training step", "peak memory", "`stride --help`", "`stride status`",
                "`stride submit --dry-run --skip-slurm-checks`", "training stall",
                "checkpoint write (serialise, CRC32", "same write in the background"):
        assert row in table, f"row {row!r} missing from:\n{table}"
    assert "| measure | raw PyTorch | stride | stride/raw | target | met |" in table

    results = json.loads(out_json.read_text())
    for name in ("mlp", "cnn", "lm"):
        (round_,) = results["throughput"][name]
        careful, usual, mine = round_["careful"], round_["usual"], round_["stride"]
        assert careful["steps"] == usual["steps"] == mine["steps"] > 0
        # Same data, model, seeds and step order in all three loops, however they fetch: the same numbers come out.
        assert careful["final"] == usual["final"] == mine["final"]
        assert math.isfinite(mine["steps_per_s"] / careful["steps_per_s"])
    assert results["cli"]["imports_torch"] == {"stride --help": False, "stride status": False,
                                              "stride submit --dry-run": True}  # its checks build the model
    (pair,) = results["checkpoint"]["pairs"]
    assert pair["stride"]["checkpoint"]["stall_ms"] and pair["raw"]["checkpoint"]["stall_ms"]
    assert pair["stride"]["reference"]["bytes"] > 0
