"""Help in the README's spelling, one meaning per option across commands, and Slurm refusals that name the flag."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from conftest import one_line_error

COMMANDS = ["cancel", "config", "diff", "local", "logs", "plot", "resume", "status", "submit"]


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_has_no_banner_no_type_reprs_and_dashed_flags(stride, command):
    proc = stride(*filter(None, [command]), "--help", check=True)
    assert proc.stderr == "", proc.stderr  # no "INFO: Showing help with the command ..."
    assert "Optional[" not in proc.stdout and "_" not in " ".join(re.findall(r"--[\w-]+", proc.stdout))
    if command:
        assert proc.stdout.startswith(f"stride {command} - ")


def test_submit_help_spells_flags_as_the_readme_does(stride):
    text = stride("submit", "--help", check=True).stdout
    for flag in ("--tasks-per-node N", "--cpus-per-task N", "--dry-run", "--skip-slurm-checks", "--max-parallel N",
                 "--partition VALUE"):
        assert f"\n  {flag}\n" in text, flag
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "--tasks-per-node" in readme and "--tasks_per_node" not in readme


def test_resume_takes_every_submit_flag_that_makes_sense_for_a_resume():
    from stride.cli import StrideCLI

    def flags(method) -> set[str]:
        return {name for name, p in inspect.signature(method).parameters.items()
                if name != "self" and p.default is not p.empty}

    sweep_only = {"max_parallel"}  # a resume continues one run, never a sweep
    assert flags(StrideCLI.submit) - sweep_only <= flags(StrideCLI.resume)


@pytest.mark.parametrize("words, meant", [
    (["local", "-n", "2"], "--nproc"),
    (["submit", "work_dir=exp", "-n", "2"], "--nodes"),
    (["status", "-s", "lr"], "--sort"),
])
def test_short_options_are_refused_with_the_long_ones_they_could_mean(tmp_path, stride, words, meant):
    line = one_line_error(stride(*words), f"short option {words[-2]} is not used", meant)
    assert "only -h is" in line and not (tmp_path / "exp").exists()


def test_minus_h_is_help(stride):
    assert stride("local", "-h", check=True).stdout.startswith("stride local - ")


@pytest.mark.parametrize("reason, flag", [
    ("allocation failure: Requested time limit is invalid (missing or exceeds some limit)", "--time"),
    ("allocation failure: Invalid partition name specified", "--partition"),
    ("allocation failure: Invalid account or account/partition combination specified", "--account"),
    ("allocation failure: More processors requested than permitted", "--nodes"),
    ("Requested node configuration is not available", "--nodes"),
    ("Invalid generic resource (gres) specification", "--gpus"),
    ("Invalid qos specification", "--qos"),
    ("Invalid feature specification", "--constraint"),
    ("Invalid job array specification", "the sweep's size"),
])
def test_a_slurm_refusal_names_the_flag_it_objected_to(reason, flag):
    from stride.slurm import refusal_hint

    assert refusal_hint(reason).startswith(f"check {flag}")
