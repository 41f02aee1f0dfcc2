"""No tracebacks for the world's errors (issue 18, item 6): filesystems that refuse, names too long, a `~user` that
does not exist, a full disk during a checkpoint, hand-edited run files. Each is one `stride: error:` line naming the
path and the OS's reason, through the real CLI; a broken run folder does not hide the others.

The tests run as root (as CI does): a read-only mount and a tiny tmpfs are mounted for real, and "no permission" is
real too, in a child whose capabilities to bypass file permissions were dropped. None of this is ever skipped: a
machine where it cannot be done fails these tests.
"""
from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_env, read_json, run_stride

TINY = ["model_kwargs.model_name=MLP", "model_kwargs.hidden=[16]", "training_kwargs.epochs=1"]
PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


def _drop_file_permission_bypass() -> None:
    """In the child, before exec: root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH obeys file modes like anyone."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def stride_as_plain_user(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stride", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=cli_env(), preexec_fn=_drop_file_permission_bypass)


def one_error_line(proc: subprocess.CompletedProcess, *needles: str, last: bool = False) -> str:
    """The command failed with exit 2 and one `stride: error:` line (the last of its output when the run had started
    and logged), containing every needle; no traceback anywhere."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = proc.stderr.strip().splitlines()
    if not last:
        assert len(lines) == 1, proc.stderr
    line = lines[-1]
    assert line.startswith("stride: error: "), proc.stderr
    assert sum(1 for other in lines if other.startswith("stride: error: ")) == 1, proc.stderr
    for needle in needles:
        assert needle in line, line
    return line


@pytest.fixture
def mount(tmp_path):
    """mount(name, options) -> a real tmpfs at tmp_path/name, unmounted afterwards."""
    mounted: list[Path] = []

    def make(name: str, options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True,
                                text=True, timeout=30)
        assert result.returncode == 0, f"these tests need root to mount a tmpfs: {result.stderr}"
        mounted.append(point)
        return point

    yield make
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("trained")
    run_stride("local", "work_dir=exp", *TINY, cwd=folder, check=True)
    return folder / "exp" / "0"


def test_a_read_only_or_forbidden_work_dir_is_one_line(tmp_path, stride, mount):
    read_only = mount("ro", "ro,size=1m")
    one_error_line(stride("local", f"work_dir={read_only}/exp", *TINY),
                   f"cannot create work_dir {read_only}/exp: Read-only file system", "mounted read-only")
    one_error_line(stride("local", f"work_dir={read_only}", *TINY),
                   f"cannot create a run folder in {read_only}: Read-only file system")

    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    one_error_line(stride_as_plain_user("local", f"work_dir={locked}", *TINY, cwd=tmp_path),
                   f"cannot create a run folder in {locked}: Permission denied", "check its permissions")
    assert not any(locked.iterdir())


def test_an_unreadable_work_dir_is_one_line(tmp_path, trained):
    shutil.copytree(trained, tmp_path / "exp" / "0")
    (tmp_path / "exp").chmod(0o000)
    try:
        one_error_line(stride_as_plain_user("status", "exp", cwd=tmp_path), "cannot list work_dir exp: Permission denied")
        one_error_line(stride_as_plain_user("local", "work_dir=exp", *TINY, cwd=tmp_path), "exp", "Permission denied")
        one_error_line(stride_as_plain_user("plot", "exp", cwd=tmp_path), "exp", "Permission denied")
    finally:
        (tmp_path / "exp").chmod(0o755)


def test_a_name_too_long_and_an_unknown_user_are_one_line(tmp_path, stride):
    too_long = tmp_path / ("x" * 300)
    one_error_line(stride("local", f"work_dir={too_long}", *TINY), str(too_long), "File name too long",
                   "shorten it")
    one_error_line(stride("status", str(too_long)), "File name too long")
    one_error_line(stride("local", "work_dir=~no_such_user_stride/exp", *TINY),
                   "cannot expand '~' in 'work_dir=~no_such_user_stride/exp': no such user")
    assert not any(tmp_path.iterdir())


def test_plot_out_naming_a_folder_is_one_line(tmp_path, stride, trained):
    shutil.copytree(trained, tmp_path / "exp" / "0")
    (tmp_path / "pictures").mkdir()
    one_error_line(stride("plot", "exp", "--out", "pictures"),
                   "--out pictures is a folder: give the file to write, e.g. --out pictures/curves.png")
    assert not any((tmp_path / "pictures").iterdir())


def test_a_full_disk_during_a_checkpoint_records_the_real_cause(tmp_path, stride, mount):
    """8 MiB: the config, logs and best.pt (4.5 MB) fit; the first checkpoint (weights and AdamW state) does not."""
    disk = mount("disk", "size=8m")
    proc = stride("local", f"work_dir={disk}/exp", "model_kwargs.model_name=MLP", "model_kwargs.hidden=[1024,1024]",
                  "training_kwargs.epochs=1")
    run = disk / "exp" / "0"
    line = one_error_line(proc, f"cannot write {run}/checkpoints/step_", "No space left on device", last=True)
    status = read_json(run / "status.json")
    assert status["state"] == "failed" and status["ended_at"]
    assert "No space left on device" in status["error"] and f"{run}/checkpoints/step_" in status["error"], status
    assert "unexpected pos" not in status["error"] and line.endswith(status["error"].split(": ", 1)[1])
    assert "No space left on device" in read_json(run / "failures" / "rank_0.json")["error"]
    assert not list((run / "checkpoints").glob("*.pt"))  # nothing half-written is left to resume from


EDITS = {"status_list": ("status.json", "[1, 2]"), "status_string": ("status.json", '"running"'),
         "status_cut": ("status.json", '{"state": "runn'), "metadata_list": ("metadata.json", "[]"),
         "config_cut": ("config.json", '{"run": "config_cut", "training_')}


def edits_text(name: str) -> str:
    return EDITS[name][1]


def break_runs(trained: Path, work_dir: Path) -> dict[str, str]:
    """Copies of a good run, each with one file hand-edited into something stride cannot use."""
    edits = EDITS
    shutil.copytree(trained, work_dir / "0")
    for name, (file, text) in edits.items():
        shutil.copytree(trained, work_dir / name)
        (work_dir / name / file).write_text(text)
    return {name: file for name, (file, _) in edits.items()}


def test_hand_edited_run_files_are_one_line_and_do_not_hide_the_other_runs(tmp_path, stride, trained):
    broken = break_runs(trained, tmp_path / "exp")
    shutil.copytree(trained, tmp_path / "exp" / "unreadable")
    (tmp_path / "exp" / "unreadable").chmod(0o000)
    try:
        listing = stride_as_plain_user("status", "exp", cwd=tmp_path)
    finally:
        (tmp_path / "exp" / "unreadable").chmod(0o700)
    assert listing.returncode == 0 and "Traceback" not in listing.stderr, listing.stderr
    rows = {line.split()[0]: line.split()[1] for line in listing.stdout.splitlines()[1:] if line and line[0] != " "
            and not line.startswith("run ")}
    assert rows["0"] == "completed"
    for name in [*broken, "unreadable"]:
        assert rows[name] == "broken", listing.stdout
    notes = [line for line in listing.stdout.splitlines() if line.startswith("run ") and " is broken: " in line]
    assert len(notes) == len(broken) + 1
    assert any(note.startswith("run unreadable is broken: cannot read ") and "Permission denied" in note
               for note in notes), notes

    reasons = {"status_list": "holds a list where stride keeps a JSON object",
               "status_string": "holds a string where stride keeps a JSON object",
               "status_cut": "is not valid JSON", "metadata_list": "holds a list where stride keeps a JSON object",
               "config_cut": "is not valid JSON"}
    for name, file in broken.items():
        path = tmp_path / "exp" / name / file
        one_error_line(stride("status", f"exp/{name}"), f"{path.absolute()} {reasons[name]}")
        config_before = (tmp_path / "exp" / name / "config.json").read_text()
        one_error_line(stride("resume", f"exp/{name}", "--local", "training_kwargs.epochs=2"),
                       f"{path.absolute()} {reasons[name]}")
        assert (tmp_path / "exp" / name / "config.json").read_text() == config_before  # nothing written
        assert path.read_text() == edits_text(name)  # left as the user left it: never silently replaced
    assert "; cut short?)" in stride("status", "exp/status_cut").stderr

    # The plot draws the runs it can read; the one whose config cannot be read is named and left out.
    plot = stride("plot", "exp", "--out", "curves.png")
    assert plot.returncode == 0 and "Traceback" not in plot.stderr, plot.stderr
    assert (tmp_path / "curves.png").stat().st_size > 0
    warnings = plot.stderr.strip().splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("stride: warning: a broken run is left out of the plot: ")
    assert f"{tmp_path}/exp/config_cut/config.json is not valid JSON" in warnings[0]
    json.loads((tmp_path / "exp" / "0" / "status.json").read_text())  # the good run was not touched
