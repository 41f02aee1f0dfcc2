"""Issue 18, input hardening: what reaches the sbatch script, a command line, a file name or a status table is checked
once, in config.validate; sbatch options stride owns are refused; repeated and text flags keep what was typed; ranges
are checked before a run folder exists; YAML cannot hang stride. Through the real CLI wherever a user would hit it."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sbatch_parse import directives, sbatch_arguments
from stride import cli, config, slurm
from stride.errors import ConfigError
from stride.rundir import validate_run_name

DRY = "# sbatch script (dry run: nothing written, nothing submitted)\n"
DRY_RUN = ("--dry-run", "--skip-slurm-checks")  # the script as text: these tests are about what it says


def refused(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """The CLI refused with one `stride: error:` line, exit 2, no traceback; returns that line."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stride: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def script_of(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split(DRY, 1)[1].split("\n\n# resolved config for run ", 1)[0] + "\n"


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# 1. Values that reach the script or a command line ---------------------------------------------------------------

@pytest.mark.parametrize("override, key", [
    ('work_dir="exp\\ntouch PWNED\\n#"', "work_dir"),
    ('run="r1\\n"', "run"),
    ('dataset_kwargs.note="a\\x1b[31mred"', "dataset_kwargs.note"),   # ESC: a status table would run it
    ('model_kwargs.label="a\\tb"', "model_kwargs.label"),
    ('model_kwargs.hidden=["ok", "x\\u2028y"]', "model_kwargs.hidden[1]"),
    ('training_kwargs.best_metric="val\\rloss"', "training_kwargs.best_metric"),
    ('slurm.partition="debug\\x00"', "slurm.partition"),
    ('slurm.job_name="a\\u202eb"', "slurm.job_name"),               # a bidirectional override
    ('dataset_kwargs={"dataset_name": "digits", "bad\\nkey": 1}', "dataset_kwargs (a key)"),
    ('container.env={"A": "x\\ny"}', "container.env.A"),
])
def test_control_characters_anywhere_are_refused_naming_the_key(stride, tmp_path, override, key):
    line = refused(stride("submit", "work_dir=exp", override, *DRY_RUN), f"config key '{key}' holds")
    assert "\\" in line  # the character is shown escaped, the message stays one line
    assert tree(tmp_path) == set()


def test_run_name_with_a_trailing_newline_is_not_a_run_name():
    with pytest.raises(ConfigError, match="not allowed"):
        validate_run_name("r1\n")
    with pytest.raises(ConfigError, match="run name"):
        config.resolve(overrides=['run="r1\\n"', "work_dir=x"])


AWKWARD = "a b 'q' \"d\" $(touch PWNED) `touch PWNED2` ; #x é%"


def run_under_stub_srun(script: str, folder: Path) -> list[str]:
    """Run the sbatch script with bash, `srun` a stub that records its argv; returns that argv."""
    stub_dir = folder / "stub"
    stub_dir.mkdir()
    record = folder / "srun.argv"
    (stub_dir / "srun").write_text(f"#!/bin/sh\nfor a in \"$@\"; do printf '%s\\0' \"$a\"; done "
                                   f"> {shlex.quote(str(record))}\n")
    (stub_dir / "srun").chmod(0o755)
    path = folder / "job.sh"
    path.write_text(script)
    env = dict(os.environ, PATH=f"{stub_dir}{os.pathsep}{os.environ['PATH']}")
    subprocess.run(["bash", str(path)], cwd=folder, env=env, check=True, timeout=30, capture_output=True)
    return record.read_bytes().decode().split("\0")[:-1]


def test_awkward_values_stay_data_in_the_script_bash_runs(stride, tmp_path):
    work_dir = tmp_path / "exp $(touch PWNED) `touch PWNED2` 'q' \"d\" ; é"
    settings = tmp_path / "settings.yaml"  # (an override would read ` #x` as a YAML comment)
    settings.write_text(f"slurm:\n  job_name: {json.dumps(AWKWARD)}\n")
    proc = stride("submit", f"work_dir={work_dir}", "--partition", "debug$(touch PWNED)", "--account", "`touch PWNED`",
                  "--sbatch", f"comment={AWKWARD}", "--sbatch", "mail-type=END", "--sbatch", "hold",
                  "--setup", "echo setup-1 > setup.out", "--setup", "echo 'setup 2; $HOME' >> setup.out",
                  str(settings), *DRY_RUN)
    script = script_of(proc)
    assert tree(tmp_path) == {"settings.yaml"}
    folder = f"{work_dir}/0/slurm"
    assert dict(directives(script)) == {
        "account": "`touch PWNED`", "comment": AWKWARD, "error": f"{folder}/%j_0_log.err", "hold": None,
        "job-name": AWKWARD, "mail-type": "END", "nodes": "1", "ntasks-per-node": "1", "open-mode": "append",
        "output": f"{folder}/%j_0_log.out", "partition": "debug$(touch PWNED)", "requeue": None,
        "signal": "USR2@90", "wckey": "submitit"}
    assert len(directives(script)) == 14  # nothing twice
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    run_dir = tmp_path / "bash"
    run_dir.mkdir()
    argv = run_under_stub_srun(script, run_dir)
    assert argv == ["--unbuffered", "--output", f"{folder}/%j_%t_log.out", "--error", f"{folder}/%j_%t_log.err",
                    "--kill-on-bad-exit=1", sys.executable, "-u", "-m", "submitit.core._submit", folder]
    assert (run_dir / "setup.out").read_text() == "setup-1\nsetup 2; $HOME\n"  # setup lines are shell, in order
    assert not list(tmp_path.rglob("PWNED*"))  # nothing else ran


@pytest.mark.skipif(not os.environ.get("SLURM_CONF"), reason="needs the local cluster's sbatch (SLURM_CONF)")
def test_the_directive_reader_agrees_with_real_sbatch(tmp_path):
    """sbatch --test-only -vvv prints every argument it found in the script: the reader used above must agree."""
    section = {**config.defaults()["slurm"], "partition": "debug", "time_min": 1, "job_name": AWKWARD,
               "sbatch_args": {"comment": "it's \"quoted\" # not a comment $(id) `id` é", "hold": True}}
    text = slurm.make_sbatch_text(slurm.submitit_parameters(section, "x"), tmp_path / "a b 'c'" / "slurm")
    script = tmp_path / "job.sh"
    script.write_text(text)
    out = subprocess.run(["sbatch", "--test-only", "-vvv", str(script)], capture_output=True, text=True, timeout=60)
    prefix = 'sbatch: debug2: Found in script, argument "'
    found = [line[len(prefix):-1] for line in out.stderr.splitlines() if line.startswith(prefix)]
    assert found == sbatch_arguments(text), out.stderr


def test_sbatch_lines_refuse_backslashes_and_log_paths_refuse_patterns(stride):
    refused(stride("submit", "work_dir=exp", "--sbatch", "comment=a\\b", *DRY_RUN), "backslash", "comment")
    refused(stride("submit", "work_dir=exp", "--partition", "a\\b", *DRY_RUN), "slurm.partition", "backslash")
    refused(stride("submit", "work_dir=exp%u", *DRY_RUN), "work_dir", "'%'")
    refused(stride("submit", "--setup", "#SBATCH --array=0-9", "work_dir=exp", *DRY_RUN), "slurm.setup[0]",
            "#SBATCH directive")


# 2. sbatch options stride owns ----------------------------------------------------------------------------------

@pytest.mark.parametrize("option, hint", [
    ("nodes=2", "use --nodes 2"),
    ("array=0-3", "a sweep"),
    ("signal=USR1@60", "slurm.signal_delay_s"),
    ("output=/tmp/x.out", "stride logs RUN --slurm out"),
    ("error=/tmp/x.err", "--slurm err"),
    ("open-mode=truncate", "appends"),
    ("requeue", "always submits with --requeue"),
    ("ntasks=4", "--tasks-per-node"),
    ("ntasks-per-node=4", "use --tasks-per-node 4"),
    ("gpus-per-node=2", "use --gpus 2"),
    ("cpus-per-task=8", "use --cpus-per-task 8"),
    ("mem=4G", "use --mem 4G"),
    ("time=60", "use --time 60"),
    ("partition=long", "use --partition long"),
    ("account=a", "use --account a"),
    ("qos=high", "use --qos high"),
    ("constraint=v100", "use --constraint v100"),
    ("exclusive", "use --exclusive"),
    ("job-name=x", "slurm.job_name=x"),
    ("job_name=x", "slurm.job_name=x"),
    ("wrap=hostname", "--setup"),
    ("parsable", "job id"),
    ("wait", "returns at once"),
    ("nod=2", "abbreviates sbatch's --nodes"),       # sbatch takes unambiguous abbreviations
    ("arr=0-3", "abbreviates sbatch's --array"),
    ("N=2", "--nodes"),
])
def test_owned_sbatch_options_are_refused_with_the_flag_to_use(stride, tmp_path, option, hint):
    refused(stride("submit", "work_dir=exp", "--sbatch", option, *DRY_RUN), "stride sets itself", hint)
    key, sep, value = option.partition("=")
    settings = tmp_path / "settings.yaml"
    settings.write_text(f"slurm:\n  sbatch_args:\n    {key}: {json.dumps(value) if sep else 'true'}\n")
    refused(stride("submit", "work_dir=exp", str(settings), *DRY_RUN), "stride sets itself", hint)
    assert tree(tmp_path) == {"settings.yaml"}


def test_other_sbatch_options_pass_once(stride):
    script = script_of(stride("submit", "work_dir=exp", "--sbatch", "wckey=mine", "--sbatch", "no-requeue",
                              "--sbatch", "gres=gpu:1", "--sbatch", "time-min=5", *DRY_RUN))
    found = directives(script)
    assert ("wckey", "mine") in found and [n for n, _ in found].count("wckey") == 1
    assert ("no-requeue", None) in found and ("requeue", None) not in found
    assert ("gres", "gpu:1") in found and ("time-min", "5") in found


@pytest.mark.parametrize("value, needle", [
    ("", "empty value"), (" ", "empty value"), (None, "got null"), (False, "got false"), ([1, 2], "got [1, 2]"),
    ({"a": 1}, "got {"), (2**70, "a 71-bit integer"),
])
def test_sbatch_values_must_be_text_numbers_or_switches(value, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("{", r"\{")):
        config.resolve(layers=[{"work_dir": "x", "slurm": {"sbatch_args": {"comment": value}}}])


# 3. Repeated flags and text flags ---------------------------------------------------------------------------------

def test_repeated_setup_and_sbatch_flags_are_all_kept_in_order(stride):
    script = script_of(stride("submit", "work_dir=exp", "--setup", "module load cuda", "--sbatch", "mail-type=END",
                              "--setup", "x", "--sbatch=comment=x", "--setup=echo 'a; b'", *DRY_RUN))
    assert "\n# setup\nmodule load cuda\nx\necho 'a; b'\n" in script
    assert ("mail-type", "END") in directives(script) and ("comment", "x") in directives(script)


def test_names_that_look_like_numbers_keep_their_text(stride):
    script = script_of(stride("submit", "work_dir=exp", "--account", "0x10", "--partition", "1e3", "--qos", "007",
                              "--constraint", "1_000", *DRY_RUN))
    found = dict(directives(script))
    assert (found["account"], found["partition"], found["qos"], found["constraint"]) == ("0x10", "1e3", "007", "1_000")
    refused(stride("submit", "work_dir=exp", "--time", "0x10", *DRY_RUN), "--time '0x10' is not a time")


def test_a_run_named_like_a_number_is_that_run(stride, tmp_path):
    (tmp_path / "exp").mkdir()
    refused(stride("cancel", "0x10", "--work-dir", "exp"), "'0x10'")
    refused(stride("resume", "1e3", "--work-dir", "exp"), "'1e3'")


def test_resume_keeps_repeated_and_text_flags(monkeypatch, tmp_path):
    """resume hands its flags to the same _slurm_flags as submit; capture what it gets."""
    import stride.rundir

    seen = {}

    def capture(*args):
        seen["args"] = args
        raise cli.StrideError("captured")

    monkeypatch.setattr(stride.rundir, "find_run", lambda run, work_dir=None: (run, work_dir))
    monkeypatch.setattr(cli, "_slurm_flags", capture)
    with pytest.raises(SystemExit):
        cli.main(["resume", "0x10", "--work-dir", "007", "--account", "0x10", "--qos", "007", "--setup", "a",
                  "--setup", "b", "--sbatch", "mail-type=END", "--sbatch", "comment=x"])
    nodes, gpus, tasks, cpus, mem, time, partition, account, qos, constraint, exclusive, sbatch, setup = seen["args"]
    assert (account, qos) == ("0x10", "007")
    assert list(setup) == ["a", "b"] and list(sbatch) == ["mail-type=END", "comment=x"]


def test_a_flag_given_twice_or_without_a_value_is_refused(stride):
    refused(stride("submit", "work_dir=exp", "--nodes", "2", "--nodes", "3", *DRY_RUN), "--nodes is given twice")
    refused(stride("submit", "work_dir=exp", "--account", *DRY_RUN), "--account needs a value")
    refused(stride("submit", "work_dir=exp", "--sbatch", "comment=a", "--sbatch", "comment=b", *DRY_RUN),
            "--sbatch comment is given twice")


def test_normalise_argv_leaves_other_words_alone():
    assert cli.normalise_argv(["local", "--config", "work_dir=x", "--config=run=a", "--nproc", "2"]) == \
        ["local", "work_dir=x", "run=a", "--nproc", "2"]
    assert cli.normalise_argv(["logs", "1e3", "1"]) == ["logs", "'1e3'", "1"]  # the rank stays a number


# 5. Ranges, before any run folder exists ----------------------------------------------------------------------------

@pytest.mark.parametrize("override, needle", [
    ("training_kwargs.grad_clip_norm=-1", "training_kwargs.grad_clip_norm' got -1.0; expected 0 < value"),
    ("training_kwargs.grad_clip_norm=0", "training_kwargs.grad_clip_norm' got 0.0"),
    ("training_kwargs.momentum=-0.5", "training_kwargs.momentum' got -0.5; expected 0 <= value"),
    ("training_kwargs.weight_decay=-1", "training_kwargs.weight_decay' got -1.0"),
    ("training_kwargs.seed=-1", "training_kwargs.seed' got -1; expected 0 <= value < 2**63"),
    ("training_kwargs.seed=9223372036854775808", "training_kwargs.seed' got 9223372036854775808"),
    ("training_kwargs.model_seed=-3", "training_kwargs.model_seed' got -3"),
    ("training_kwargs.epochs=100000000000000000000000", "expected an integer from -2**63 to 2**63 - 1"),
    ("load_data_kwargs.eval_batch_size=0", "load_data_kwargs.eval_batch_size' got 0"),
    ("load_data_kwargs.eval_batch_size=-8", "load_data_kwargs.eval_batch_size' got -8"),
    ("slurm.signal_delay_s=70000", "slurm.signal_delay_s' got 70000; expected 0 <= value < 65536"),
    ("distributed_kwargs.timeout_s=1e12", "distributed_kwargs.timeout_s' got 1000000000000.0"),
])
def test_out_of_range_values_fail_before_the_run_folder_exists(stride, tmp_path, override, needle):
    refused(stride("local", "work_dir=exp", override), needle)
    assert not (tmp_path / "exp").exists()


def test_every_range_names_a_known_numeric_key():
    for key in config.RANGES:
        assert key in config.known_keys(), key


# 7. YAML cannot hang stride -------------------------------------------------------------------------------------

def billion_laughs() -> str:
    lines = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_a_yaml_alias_bomb_is_refused_at_once(stride, tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(billion_laughs())
    assert len(bomb.read_bytes()) < 600
    refused(stride("config", "work_dir=exp", str(bomb), timeout=20), "bomb.yaml", "expands to more than")
    inline = "[&a [x,x,x,x,x,x,x,x,x], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b], " \
             "&d [*c,*c,*c,*c,*c,*c,*c,*c,*c], [*d,*d,*d,*d,*d,*d,*d,*d,*d]]"
    refused(stride("config", "work_dir=exp", f"model_kwargs.layers={inline}", timeout=20), "expands to more than")


@pytest.mark.parametrize("text, needle", [
    ("[" * 200 + "]" * 200 + "\n", "nests deeper than"),
    ("a: &a [1, *a]\n", "inside its own anchor"),
    ("dataset_kwargs:\n  x: " + "1" * 5000 + "\n", "Python cannot read"),
    ("dataset_kwargs:\n  day: 2024-13-45\n", "Python cannot read"),
])
def test_yaml_that_would_crash_or_recurse_is_one_line(stride, tmp_path, text, needle):
    (tmp_path / "bad.yaml").write_text(text)
    refused(stride("config", "work_dir=exp", "bad.yaml", timeout=20), "bad.yaml", needle)


def test_a_duplicate_key_is_an_error_naming_it_and_its_lines(stride, tmp_path):
    (tmp_path / "dup.yaml").write_text(textwrap.dedent("""\
        slurm:
          nodes: 2
          partition: long
        training_kwargs:
          epochs: 3
        slurm:
          time_min: 10
        """))
    refused(stride("config", "work_dir=exp", "dup.yaml"), "dup.yaml", "gives the key \"slurm\" twice",
            "lines 1 and 6")
    (tmp_path / "nested.yaml").write_text("training_kwargs:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n")
    refused(stride("config", "work_dir=exp", "nested.yaml"), "\"lr\" twice", "lines 2 and 4")
    refused(stride("config", "work_dir=exp", "model_kwargs.extra={a: 1, a: 2}"), "\"a\" twice")


def test_merge_keys_may_still_override(tmp_path):
    (tmp_path / "merge.yaml").write_text("dataset_kwargs:\n  <<: {dataset_name: digits, n: 1}\n  n: 2\n")
    assert config.load_yaml_file(tmp_path / "merge.yaml") == {"dataset_kwargs": {"dataset_name": "digits", "n": 2}}


def test_profiles_and_the_experiment_config_are_bounded_too(stride, tmp_path):
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "site.yaml").write_text("slurm:\n  partition: a\n  partition: b\n")
    refused(stride("config", "work_dir=exp", "--profile", "site", env={"STRIDE_PROFILE_PATH": str(profiles)}),
            "site.yaml", "\"partition\" twice")
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "config.yaml").write_text(billion_laughs())
    refused(stride("config", "work_dir=exp", timeout=20), "config.yaml", "expands to more than")


def test_a_huge_config_file_is_refused_before_parsing(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("a: " + "x" * (config.MAX_YAML_BYTES + 1) + "\n")
    with pytest.raises(ConfigError, match="is it really a config file"):
        config.load_yaml_file(big)
