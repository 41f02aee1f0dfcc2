"""Secrets stay out of run records; the local rendezvous is local; another user's folder is flagged.

A secret is a unique random string in an environment variable listed in `container.secret_env`: every rank must see
it (a dataset plug-in writes its sha256), and it must appear in no file of the run folder, no `--dry-run` output and
no process's command line (/proc/*/cmdline, scanned while the job runs), for a real `stride local --nproc 2` run, a
real two-node SLURM job on the local cluster and real container runtimes.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, cli_env, read_json, run_stride
from slurm_helpers import needs_slurm, submitted, wait_for, wait_gone

from stride import config as config_lib
from stride import container, container_check
from stride.errors import ContainerError

NAME = "STRIDE_TEST_SECRET"
TINY = ["model_kwargs.model_name=MLP", "training_kwargs.epochs=1", "load_data_kwargs.batch_size=16"]
# Rank processes sleep this long inside the data plug-in, so the test can look at their sockets and command lines.
RANK_PAUSE_S = 4
PROBE_DATA = f'''
import hashlib, os, time
from pathlib import Path

import torch

from stride import DataSplits


def make(out_dir: str, n: int = 96) -> DataSplits:
    """Tiny blobs; on every rank, writes the sha256 of ${NAME} (never the value) where the test finds it."""
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "cli"
    value = os.environ.get("{NAME}")
    seen = hashlib.sha256(value.encode()).hexdigest() if value is not None else "unset"
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / f"seen_{{rank}}_{{os.getpid()}}.txt").write_text(seen)
    if rank != "cli":
        time.sleep({RANK_PAUSE_S})
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 4, generator=g) + 3 * y[:, None]
    data = torch.utils.data.TensorDataset(x, y)
    train, val, test = torch.utils.data.random_split(data, [0.6, 0.2, 0.2], generator=g)
    return DataSplits(train, val, test, input_shape=(4,), num_outputs=2)
'''


def new_secret() -> str:
    return "stride-secret-" + secrets.token_hex(16)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def write_plugin(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "probe_data.py").write_text(PROBE_DATA)
    return folder


def files_holding(root: Path, needle: str) -> list[str]:
    """Every file under root whose bytes contain needle (symlinks followed once, e.g. a sweep's slurm folder)."""
    found = []
    for folder, _, names in os.walk(root, followlinks=True):
        for name in names:
            path = Path(folder) / name
            try:
                if needle.encode() in path.read_bytes():
                    found.append(str(path))
            except OSError:
                pass
    return found


class CmdlineWatch:
    """Scans every process's /proc/PID/cmdline in the background for a string, until stopped."""

    def __init__(self, needle: str):
        self.needle, self.hits, self.scans = needle.encode(), [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    cmdline = (entry / "cmdline").read_bytes()
                except OSError:
                    continue
                if self.needle in cmdline:
                    self.hits.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
            self.scans += 1
            time.sleep(0.05)

    def __enter__(self) -> "CmdlineWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def listening_addresses(port: int) -> set[str]:
    """Local addresses that listen on TCP `port`, from /proc/net/tcp and tcp6 (state 0A = LISTEN)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            addr, _, port_hex = fields[1].rpartition(":")
            if fields[3] != "0A" or int(port_hex, 16) != port:
                continue
            if len(addr) == 8:  # IPv4, little-endian hex
                found.add(".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0)))
            else:
                found.add("::" if set(addr) == {"0"} else addr)
    return found


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def seen_hashes(folder: Path) -> dict[str, str]:
    return {path.name.split("_")[1]: path.read_text() for path in folder.glob("seen_*.txt")}


# ------------------------------------------------------------------------------------------------- stride local
def test_a_secret_reaches_every_local_rank_and_nothing_else_and_the_rendezvous_is_private(tmp_path):
    secret, code, seen = new_secret(), write_plugin(tmp_path / "code"), tmp_path / "seen"
    args = ["work_dir=exp", *TINY, f"container.secret_env=[{NAME}]", "dataset_kwargs.dataset_name=probe_data:make",
            f"dataset_kwargs.out_dir={seen}"]
    env = {"PYTHONPATH": str(code), NAME: secret}
    proc = subprocess.Popen([sys.executable, "-m", "stride", "local", *args, "--nproc", "2"], cwd=tmp_path,
                            env=cli_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with CmdlineWatch(secret) as watch:
        try:
            wait_for(lambda: {"0", "1"} <= set(seen_hashes(seen)), 180, 0.1, what="both ranks to load their data")
            run = tmp_path / "exp" / "0"
            published = json.loads(next((run / "rendezvous").glob("*.json")).read_text())
            listening = listening_addresses(published["port"])  # the ranks still sleep in the plug-in
            out, err = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, out + err
    # The ranks saw the value ...
    assert seen_hashes(seen)["0"] == seen_hashes(seen)["1"] == sha(secret)
    # ... which is nowhere else: no file of the run, no output, no command line.
    assert files_holding(tmp_path / "exp", secret) == []
    assert secret not in out + err
    assert watch.scans > 10 and watch.hits == []
    config = read_json(run / "config.json")
    assert config["container"]["secret_env"] == [NAME]
    # Rendezvous: loopback only, published privately.
    assert published["addr"] == "127.0.0.1" and listening == {"127.0.0.1"}, listening
    assert mode(run) == 0o700 and mode(run / "rendezvous") == 0o700
    for private in (run / "config.json", run / "metadata.json", *(run / "rendezvous").glob("*.json")):
        assert mode(private) == 0o600, private


def test_a_missing_secret_is_one_line_and_writes_nothing(tmp_path):
    assert NAME not in os.environ
    proc = run_stride("local", "work_dir=exp", *TINY, f"container.secret_env=[{NAME}]", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"stride: error: container.secret_env names {NAME}, not set in this environment: "
                                   f"export {NAME}=... in the shell that runs stride (the ranks get it by name from "
                                   f"there; its value is never written down)")
    assert not (tmp_path / "exp").exists()


@pytest.mark.parametrize("args, message", [
    ([f"container.secret_env=[{NAME}, {NAME}]"], f"lists {NAME} twice"),
    (["container.secret_env=['A=b']"], "holds 'A=b', which is not an environment variable name"),
    ([f"container.secret_env=[{NAME}]", f"container.env.{NAME}=x"],
     f"{NAME} is in both container.env (a value written into config.json and command lines) and container.secret_env"),
])
def test_bad_secret_env_settings_are_refused(tmp_path, args, message):
    proc = run_stride("config", "work_dir=exp", *args, cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_secret_looking_container_env_is_warned_about():
    config = config_lib.resolve(overrides=["container.env.HF_TOKEN=abc", "container.env.TOKENIZERS_PARALLELISM=false",
                                           "container.env.AWS_SECRET_ACCESS_KEY=k"])
    warnings = container_check.check_secret_env(config)
    assert sorted(w.split(" ", 1)[0] for w in warnings) == ["container.env.AWS_SECRET_ACCESS_KEY",
                                                           "container.env.HF_TOKEN"]
    assert "move it to container.secret_env" in warnings[0]


def test_an_sbatch_export_list_that_drops_a_secret_is_refused(monkeypatch):
    monkeypatch.setenv(NAME, "x")
    config = config_lib.resolve(overrides=[f"container.secret_env=[{NAME}]", "slurm.sbatch_args.export=NONE"])
    with pytest.raises(ContainerError, match=f"export=NONE keeps container.secret_env's {NAME}"):
        container_check.check_secret_env(config)
    ok = config_lib.resolve(overrides=[f"container.secret_env=[{NAME}]", f"slurm.sbatch_args.export=PATH,{NAME}"])
    assert container_check.check_secret_env(ok) == []


# ------------------------------------------------------------------------------------------ container commands
@pytest.mark.parametrize("runtime", ["apptainer", "docker", "podman", "charliecloud"])
def test_container_commands_name_secrets_but_never_hold_their_values(runtime, monkeypatch):
    secret = new_secret()
    monkeypatch.setenv(NAME, secret)
    section = dict(config_lib.defaults()["container"], image="/i.sif" if runtime == "apptainer" else "/img",
                   secret_env=[NAME])
    spec = container.make_spec(section, runtime, gpus=False)
    argv = container.build_command(spec, "/work")
    assert not any(secret in word for word in argv)
    env = container_check.runtime_env(spec)
    if runtime in ("docker", "podman"):
        assert argv[argv.index(NAME) - 1] == "-e"  # by name: the runtime copies the value from its environment
    if runtime == "apptainer":
        assert env == {f"APPTAINERENV_{NAME}": secret}  # in the environment, never in argv
        singularity = container.make_spec(dict(section, executable="/usr/bin/singularity"), runtime, gpus=False)
        assert container_check.runtime_env(singularity) == {f"SINGULARITYENV_{NAME}": secret}
    else:
        assert f"APPTAINERENV_{NAME}" not in env


IMAGE_DIR = os.environ.get("STRIDE_TEST_IMAGE_DIR")
IMAGE_STRIDE = "/usr/local/lib/python3.11/dist-packages/stride"  # where containers/ installs stride in the test images
SIF = os.environ.get("STRIDE_TEST_SIF")
DOCKER_IMAGE = os.environ.get("STRIDE_TEST_DOCKER_IMAGE")
needs_images = pytest.mark.skipif(not IMAGE_DIR, reason="container images not built: run `eval \"$(bash "
                                                        "containers/setup.sh)\"` first (tests/run.sh always does)")


@pytest.mark.container
@needs_images
@pytest.mark.parametrize("runtime", ["charliecloud", "apptainer", "docker", "podman"])
def test_every_runtime_hands_the_rank_the_secret_by_name(tmp_path, runtime, monkeypatch):
    """The real runtime, the real image: the rank's Python sees the value; the runtime's argv never holds it.
    Apptainer runs with --cleanenv, so the value can only have come through APPTAINERENV_NAME."""
    secret = new_secret()
    monkeypatch.setenv(NAME, secret)
    image = {"apptainer": SIF, "docker": DOCKER_IMAGE}.get(runtime, IMAGE_DIR)
    section = dict(config_lib.defaults()["container"], image=image, secret_env=[NAME],
                   runtime_args=["--cleanenv"] if runtime == "apptainer" else [])
    work = tmp_path / "work"
    work.mkdir()
    spec = container.make_spec(section, runtime, gpus=False)
    env = dict(os.environ, **container_check.runtime_env(spec))  # what the launcher exports
    argv = container.build_command(spec, str(work), os.getuid(), os.getgid())
    probe = f"import hashlib, os; print(hashlib.sha256(os.environ['{NAME}'].encode()).hexdigest())"
    command = [*argv, "-c", probe]
    assert not any(secret in word for word in command)
    proc = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=work, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == sha(secret)


@pytest.mark.container
@needs_images
@pytest.mark.parametrize("runtime", ["docker", "charliecloud"])
def test_stride_local_in_a_container_passes_the_secret_by_name_only(tmp_path, runtime):
    secret, seen = new_secret(), tmp_path / "exp" / "seen"
    code = write_plugin(tmp_path / "exp" / "code")  # inside work_dir, which every runtime mounts at its own path
    image = DOCKER_IMAGE if runtime == "docker" else IMAGE_DIR
    # This tree's stride over the image's, so the ranks run the code under test even before the images are rebuilt.
    this_stride = f"{REPO / 'stride'}:{IMAGE_STRIDE}" + (":ro" if runtime == "docker" else "")
    args = ["work_dir=exp", *TINY, "--nproc", "2", "--container", image, f"container.runtime={runtime}",
            f"container.secret_env=[{NAME}]", f"container.env.PYTHONPATH={code}", f"container.binds=[{this_stride}]",
            "dataset_kwargs.dataset_name=probe_data:make", f"dataset_kwargs.out_dir={seen}"]
    with CmdlineWatch(secret) as watch:
        proc = run_stride("local", *args, cwd=tmp_path, env={NAME: secret})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {"0", "1"} <= set(seen_hashes(seen)) and set(seen_hashes(seen).values()) == {sha(secret)}
    assert files_holding(tmp_path / "exp", secret) == [] and secret not in proc.stdout + proc.stderr
    assert watch.hits == []
    recorded = read_json(tmp_path / "exp" / "0" / "metadata.json")["container"]["command"]
    assert (f" -e {NAME} " in recorded) == (runtime == "docker")


# ------------------------------------------------------------------------------------------------- SLURM
@pytest.mark.slurm
@needs_slurm
def test_a_secret_reaches_every_rank_of_a_two_node_job_and_nothing_else(tmp_path):
    secret, code, seen = new_secret(), write_plugin(tmp_path / "code"), tmp_path / "seen"
    args = ["work_dir=exp", "--profile", "local", "--nodes", "2", "--tasks-per-node", "1", *TINY,
            f"container.secret_env=[{NAME}]", "dataset_kwargs.dataset_name=probe_data:make",
            f"dataset_kwargs.out_dir={seen}"]
    env = {"PYTHONPATH": str(code), NAME: secret}
    dry = run_stride("submit", *args, "--dry-run", cwd=tmp_path, env=env, check=True)
    assert secret not in dry.stdout + dry.stderr and f"- {NAME}" in dry.stdout
    with CmdlineWatch(secret) as watch:
        run, job_id = submitted(run_stride("submit", *args, cwd=tmp_path, env=env))
        wait_for(lambda: {"0", "1"} <= set(seen_hashes(seen)), 240, 0.1, what="both ranks to load their data")
        published = json.loads(next((run / "rendezvous").glob("*.json")).read_text())
        listening = listening_addresses(published["port"])
        wait_gone(job_id, timeout_s=300)
    assert read_json(run / "status.json")["state"] == "completed"
    assert seen_hashes(seen)["0"] == seen_hashes(seen)["1"] == sha(secret)
    assert files_holding(run, secret) == [] and files_holding(tmp_path / "exp", secret) == []
    assert (run / "slurm" / f"{job_id}_submission.sh").is_file()
    assert watch.scans > 10 and watch.hits == []
    # Multi-node: the store listens on the first node's own address (reachable by the other node), not on all.
    assert published["addr"] in ("127.0.0.11", "127.0.0.12") and listening == {published["addr"]}, listening
    assert mode(run) == 0o700


# ------------------------------------------------------------------------------------------------ provenance
def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=30,
                          env=dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
                                   GIT_COMMITTER_EMAIL="t@t")).stdout


@pytest.fixture
def checkout(tmp_path) -> tuple[Path, str]:
    """A git checkout with a committed file, a modified one, an untracked plug-in and an untracked .env."""
    secret = new_secret()
    git(tmp_path, "init", "-q")
    (tmp_path / "train.py").write_text("print('v1')\n")
    git(tmp_path, "add", "train.py")
    git(tmp_path, "commit", "-q", "-m", "first")
    (tmp_path / "train.py").write_text("print('v2')\n")
    (tmp_path / "plugin.py").write_text("NEW_PLUGIN = 1\n")
    (tmp_path / ".env").write_text(f"CLOUD_KEY={secret}\n")
    return tmp_path, secret


def test_untracked_files_are_recorded_by_name_and_hash_only(checkout):
    cwd, secret = checkout
    run_stride("local", "work_dir=exp", *TINY, cwd=cwd, check=True)
    run = cwd / "exp" / "0"
    assert files_holding(run, secret) == []
    recorded = read_json(run / "metadata.json")["git"]
    by_path = {entry["path"]: entry for entry in recorded["untracked"]}
    assert by_path["plugin.py"]["sha256"] == sha("NEW_PLUGIN = 1\n") and not by_path["plugin.py"].get("copied")
    # A secret-looking name is not even hashed: a hash of a short password can be tested against guesses.
    assert by_path[".env"]["sha256"] is None and by_path[".env"]["bytes"] == len(f"CLOUD_KEY={secret}\n")
    assert not by_path[".env"].get("copied")
    diff = (run / "git.diff").read_text()
    assert "print('v2')" in diff and "NEW_PLUGIN" not in diff
    assert mode(run / "git.diff") == 0o600


def test_copied_untracked_content_is_opt_in_capped_and_never_a_secret_file(checkout):
    cwd, secret = checkout
    (cwd / "big.py").write_text("#" * 4000 + "\n")
    run_stride("local", "work_dir=exp", *TINY, "provenance.copy_untracked=true", "provenance.max_untracked_bytes=1000",
               cwd=cwd, check=True)
    run = cwd / "exp" / "0"
    diff = (run / "git.diff").read_text()
    assert "NEW_PLUGIN = 1" in diff and "#" * 4000 not in diff and secret not in diff
    by_path = {entry["path"]: entry for entry in read_json(run / "metadata.json")["git"]["untracked"]}
    assert by_path["plugin.py"]["copied"] is True
    assert "neither hashed nor copied" in by_path[".env"]["why"] and "max_untracked_bytes" in by_path["big.py"]["why"]
    assert files_holding(run, secret) == []


def test_a_sweep_shares_one_git_record(checkout):
    cwd, secret = checkout
    run_stride("local", "work_dir=exp", *TINY, "training_kwargs.seed=0,1", cwd=cwd, check=True)
    metas = [read_json(cwd / "exp" / str(i) / "metadata.json") for i in range(2)]
    sweep_id = metas[0]["sweep"]["id"]
    assert [m["git"]["diff_file"] for m in metas] == [f"../sweeps/{sweep_id}/git.diff"] * 2
    shared = cwd / "exp" / "sweeps" / sweep_id
    assert (shared / "git.diff").is_file() and "print('v2')" in (shared / "git.diff").read_text()
    assert not any((cwd / "exp" / str(i) / "git.diff").exists() for i in range(2))
    assert mode(shared) == 0o700 and mode(shared / "git.diff") == 0o600
    assert files_holding(cwd / "exp", secret) == []


# ----------------------------------------------------------------------------------------------- trust
OTHER_UID = 65534  # nobody


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to hand a folder to another user")
def test_another_users_work_dir_or_run_folder_is_warned_about(tmp_path):
    run_stride("local", "work_dir=exp", *TINY, cwd=tmp_path, check=True)
    for path in [tmp_path / "exp", *(tmp_path / "exp").rglob("*")]:
        os.chown(path, OTHER_UID, OTHER_UID, follow_symlinks=False)
    proc = run_stride("config", "work_dir=exp", cwd=tmp_path, check=True)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("stride: warning: ")]
    assert len(warnings) == 1 and f"work_dir {tmp_path / 'exp'} belongs to nobody, not to you" in warnings[0]
    assert "its config can name any import path, which runs as you" in warnings[0]
    status = run_stride("status", str(tmp_path / "exp" / "0"), cwd=tmp_path, check=True)
    assert f"stride: warning: run folder {tmp_path / 'exp' / '0'} belongs to nobody" in status.stderr
    mine = run_stride("config", "work_dir=mine", cwd=tmp_path, check=True)
    assert "warning" not in mine.stderr
