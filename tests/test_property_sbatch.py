"""Property: whatever a config holds, stride either refuses it with one ConfigError line, or the sbatch script it
writes holds exactly the intended `#SBATCH` directives (read back the way sbatch reads them), parses as bash, and
runs the setup lines and the srun command as given. And text flags reach the command exactly as typed."""
from __future__ import annotations

import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import fire
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sbatch_parse import directives
from stride import cli, config, slurm
from stride.errors import ConfigError, StrideError

BASE = Path(tempfile.gettempdir()) / "stride-property"  # never created: nothing here writes
FRAGMENTS = ["\n", "\r", "\t", "\x00", "\x1b[31m", "\x85", "\u2028", "\u202e", "'", '"', "$(touch PWNED)", "`id`",
             "${HOME}", "\\", ";", "#", " #", "%j", " ", "=", ",", "--", "-", "é", "中文", "🙂", "\udcff",
             "#SBATCH --array=1-9", "a", "debug", "0x10", "1e3", "007", "..", "/", ":", "~"]
TEXT = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=6).map("".join)
NUMBER = st.one_of(st.integers(min_value=-2**80, max_value=2**80), st.floats(allow_nan=True, allow_infinity=True))
VALUE = st.one_of(TEXT, NUMBER, st.booleans(), st.none())
SBATCH_KEY = st.one_of(st.sampled_from(["comment", "mail-type", "mail_user", "gres", "begin", "hold", "wckey",
                                        "nodelist", "exclude", "dependency", "no-requeue", "time-min"]), TEXT)
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def layers(draw) -> dict:
    layer: dict = {"work_dir": f"{BASE}/{draw(TEXT)}"}
    if draw(st.booleans()):
        layer["run"] = draw(st.one_of(TEXT, NUMBER))
    section: dict = {}
    for key in ("partition", "account", "qos", "constraint", "job_name"):
        if draw(st.booleans()):
            section[key] = draw(VALUE)
    section["sbatch_args"] = draw(st.dictionaries(SBATCH_KEY, VALUE, max_size=3))
    section["setup"] = draw(st.lists(TEXT, max_size=3))
    layer["slurm"] = section
    layer["container"] = {"env": draw(st.dictionaries(st.sampled_from(["A", "PYTHONPATH", "X_1"]), VALUE, max_size=2))}
    return layer


def intended(cfg: dict, folder: Path) -> list[tuple[str, object]]:
    """The directives stride means to write: its own, then the user's options (a switch has no value)."""
    section = cfg["slurm"]
    work_dir = Path(cfg["work_dir"])
    params: dict = {"job_name": section["job_name"] or f"stride-{work_dir.name}", "nodes": "1",
                    "ntasks_per_node": "1", "signal": "USR2@90", "wckey": "submitit", "open-mode": "append",
                    "output": f"{folder}/%j_0_log.out", "error": f"{folder}/%j_0_log.err"}
    for key in ("partition", "account", "qos", "constraint"):
        if section[key]:
            params[key] = section[key]
    args = section["sbatch_args"]
    if not {"no-requeue", "no_requeue"} & set(args):
        params["requeue"] = None
    params.update({key: None if value is True else str(value) for key, value in args.items()})
    return sorted((key.replace("_", "-"), value) for key, value in params.items())


@SETTINGS
@given(layers())
def test_config_values_are_refused_in_one_line_or_reach_sbatch_intact(layer):
    try:
        cfg = config.resolve(layers=[layer], experiment_config=False)
    except ConfigError as exc:
        message = str(exc)
        assert message and message == config.one_line(message), repr(message)
        return
    work_dir = Path(cfg["work_dir"])
    folder = work_dir / (cfg["run"] or "0") / "slurm"
    text = slurm.make_sbatch_text(slurm.submitit_parameters(cfg["slurm"], f"stride-{work_dir.name}"), folder)
    assert sorted(directives(text)) == intended(cfg, folder)
    subprocess.run(["bash", "-n"], input=text.encode("utf-8", "surrogateescape"), check=True, timeout=30)
    body = text.split("\n# setup\n", 1)[1]
    assert body.startswith("".join(line + "\n" for line in cfg["slurm"]["setup"]))
    command = body.rstrip("\n").split("\n")[-1]
    assert shlex.split(command) == ["srun", "--unbuffered", "--output", f"{folder}/%j_%t_log.out", "--error",
                                    f"{folder}/%j_%t_log.err", "--kill-on-bad-exit=1", *restated_cpus(cfg),
                                    sys.executable, "-u", "-m", "submitit.core._submit", str(folder)]


def restated_cpus(cfg: dict) -> list[str]:
    """srun restates the CPUs per task (Slurm >= 22.05 does not pass the allocation's on)."""
    cpus = cfg["slurm"]["cpus_per_task"]
    return [f"--cpus-per-task={cpus}"] if cpus else []


class _Recorder:
    def submit(self, *args, account=None, partition=None, qos=None, constraint=None, sbatch=None, setup=None):
        return {"args": args, "account": account, "partition": partition, "qos": qos, "constraint": constraint,
                "sbatch": sbatch, "setup": setup}


FLAG_TEXT = TEXT.filter(lambda t: not t.startswith("-"))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["account", "partition", "qos", "constraint"]), FLAG_TEXT, max_size=4),
       st.lists(FLAG_TEXT, max_size=4), st.lists(FLAG_TEXT, max_size=4), st.lists(FLAG_TEXT, max_size=2))
def test_text_and_repeated_flags_reach_the_command_as_typed(texts, setups, sbatches, positional):
    argv = ["submit", *positional]
    for name, value in texts.items():
        argv += [f"--{name}", value]
    for setup, sbatch in zip(setups, sbatches):
        argv += ["--setup", setup, "--sbatch", sbatch]
    try:
        words = cli.normalise_argv(argv)
    except StrideError as exc:
        assert "needs a value" in str(exc)  # an empty word after a flag
        return
    got = fire.Fire(_Recorder(), command=words, name="stride")
    for name, value in texts.items():
        assert got[name] == value
    pairs = list(zip(setups, sbatches))
    assert list(got["setup"] or []) == [s for s, _ in pairs]
    assert list(got["sbatch"] or []) == [b for _, b in pairs]
    assert [str(word) for word in got["args"]] == positional
