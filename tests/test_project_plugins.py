"""Plug-ins by import path from the folder stride is started in: the console script, its ranks, and a resume started
from elsewhere all import them, as `python -m stride` would, with no PYTHONPATH."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import CLI_TIMEOUT_S, read_json

CONSOLE_SCRIPT = Path(sys.executable).with_name("stride")
MODEL = """import math

import torch

class ProjectNet(torch.nn.Module):
    def __init__(self, input_shape, num_outputs):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(math.prod(input_shape), num_outputs))

    def forward(self, x):
        return self.body(x)
"""


def console(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The installed `stride` command, with neither the repository nor the project folder on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(CONSOLE_SCRIPT), *args], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=CLI_TIMEOUT_S)


def test_console_script_and_its_ranks_import_plugins_from_the_project_folder(tmp_path):
    project = tmp_path / "project"
    (project / "my_project").mkdir(parents=True)
    (project / "my_project" / "__init__.py").write_text("")
    (project / "my_project" / "nets.py").write_text(MODEL)
    args = ["work_dir=exp", "model_kwargs.model_name=my_project.nets:ProjectNet", "training_kwargs.epochs=1"]
    proc = console("local", *args, "--nproc", "2", cwd=project)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = project / "exp" / "0"
    assert read_json(run / "status.json")["state"] == "completed"
    assert read_json(run / "metadata.json")["cwd"] == str(project)

    # Resumed from another folder, on two ranks started there: the run's launch folder is what they import from.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = console("resume", str(run), "--local", "training_kwargs.epochs=2", cwd=elsewhere)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert read_json(run / "status.json")["state"] == "completed"
    assert read_json(run / "results.json")["epochs"] == 2


def test_a_missing_plugin_names_the_folder_it_was_looked_for_in(tmp_path):
    proc = console("local", "work_dir=exp", "model_kwargs.model_name=not_here.nets:Net", cwd=tmp_path)
    assert proc.returncode == 2 and "No module named 'not_here'" in proc.stderr, proc.stderr
    assert "under the folder stride was started from" in proc.stderr
    assert not (tmp_path / "exp").exists()
