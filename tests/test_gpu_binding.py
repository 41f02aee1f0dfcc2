"""slurm.gpu_binding: the exact sbatch/srun lines per mode (golden files), and on the real test cluster (fake GPUs:
Slurm assigns them, no CUDA) the GPU variables each rank sees and the GPU it picks, from its placement record."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import read_json
from slurm_helpers import needs_slurm, submitted, wait_gone
from stride import config, slurm

GOLDEN = Path(__file__).parent / "golden"
MODES = ("node", "task", "closest")


def sbatch_text(mode: str) -> str:
    resolved = config.resolve(overrides=[f"slurm.gpu_binding={mode}", "slurm.gpus_per_node=4", "slurm.nodes=2",
                                         "slurm.cpus_per_task=8"], experiment_config=False)
    params = slurm.submitit_parameters(resolved["slurm"], "exp")
    return slurm.make_sbatch_text(params, Path("/scratch/exp/0/slurm"), python="python3")


@pytest.mark.parametrize("mode", MODES)
def test_sbatch_lines_match_golden_files(mode):
    text = sbatch_text(mode)
    path = GOLDEN / f"sbatch_gpu_binding_{mode}.txt"
    if os.environ.get("STRIDE_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    assert ("#SBATCH --gpus-per-task=1" in text) == (mode == "task")
    assert ("#SBATCH --gpus-per-node=4" in text) == (mode != "task")
    assert ("--gpu-bind=closest" in srun) == (mode == "closest")
    assert " --cpus-per-task=8 " in srun


@pytest.mark.slurm
@needs_slurm
def test_each_rank_sees_and_picks_the_gpus_its_binding_gives(tmp_path, stride):
    jobs = {mode: submitted(stride("submit", f"work_dir={mode}", "--profile", "local", "--nodes", "1", "--gpus", "2",
                                   f"slurm.gpu_binding={mode}", "training_kwargs.epochs=1"))
            for mode in MODES}
    seen = {}
    for mode, (run, job_id) in jobs.items():
        wait_gone(job_id)
        assert read_json(run / "status.json")["state"] == "completed", mode
        records = [read_json(run / "placement" / f"rank_{rank}.json") for rank in range(2)]
        assert {r["gpu_binding"] for r in records} == {mode}
        seen[mode] = [(r["cuda_visible_devices"], r["gpu_choice"]) for r in records]
        assert "placement: 2 ranks on node" in stride("status", str(run), check=True).stdout
    assert seen["node"] == [("0,1", "0"), ("0,1", "1")]      # all the node's GPUs for each rank; rank i takes GPU i
    assert seen["task"] == [("0", "0"), ("1", "1")]          # one each, Slurm's pick
    assert sorted(choice for _, choice in seen["closest"]) == ["0", "1"]  # whatever each sees, no two share one
