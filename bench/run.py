"""stride against a plain PyTorch loop, side by side, in one run: training throughput, time to the first step, CLI
latency, peak memory and checkpoint cost. Prints a Markdown report (machine, date, medians, spread, stride/raw
ratios, targets).

    python bench/run.py                    # the full bench (~10 minutes on 2 CPU cores)
    python bench/run.py --quick            # a smoke run of the bench itself (~1 minute): numbers mean little
    python bench/run.py --device cuda --precision bf16
    python bench/run.py --update-docs      # also rewrite the table in docs/benchmarks.md

Every measurement runs in a fresh process, and the two sides alternate (raw, stride | stride, raw | ...), so drift
falls on both sides alike; ratios are taken within each pair, then summarised. On a shared machine the bench also
measures how busy other processes kept the cores during each pair (/proc/stat minus its own CPU time): before a pair it
waits a while for quiet, and it keeps running pairs until --repeats of them saw at most --max-foreign-load, or
--max-pairs ran. Every pair is reported; the verdicts use the quiet ones.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # `python bench/run.py`: make `bench` and `stride` importable as packages
    sys.path.insert(0, str(REPO))

from bench import workloads  # noqa: E402
from bench.worker import foreign_load, machine_busy_s  # noqa: E402

WORKER_TIMEOUT_S = 900
CLI_TIMEOUT_S = 60
DOCS = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
FIRST_STEP_ENV = "STRIDE_BENCH_FIRST_STEP"


# ------------------------------------------------------------------------------------------------------- processes
@dataclass
class Finished:
    argv: list[str]
    returncode: int
    wall_s: float
    peak_rss_mb: float
    stdout: str
    stderr: str
    foreign_load: float
    """The share of the machine's cores that other processes kept busy while this one ran."""

    def check(self) -> "Finished":
        if self.returncode != 0:
            tail = "\n".join(self.stderr.strip().splitlines()[-15:])
            raise SystemExit(f"bench: {' '.join(self.argv)} exited {self.returncode}\n{tail}")
        return self


def spawn(argv: Sequence[str], env: dict, cwd: Path, timeout_s: float) -> Finished:
    """Run a process to completion: exact wall time (blocking wait4, no polling) and its own peak RSS."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        busy = machine_busy_s()
        start = time.perf_counter()
        proc = subprocess.Popen(list(argv), stdout=out, stderr=err, env=env, cwd=cwd, start_new_session=True)
        watchdog = threading.Timer(timeout_s, lambda: os.killpg(proc.pid, signal.SIGKILL))
        watchdog.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            watchdog.cancel()
        wall = time.perf_counter() - start
        load = foreign_load(machine_busy_s() - busy, usage.ru_utime + usage.ru_stime, wall)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Finished(list(argv), proc.returncode, wall, usage.ru_maxrss / 1024,
                        out.read().decode(errors="replace"), err.read().decode(errors="replace"), load)


def child_env(threads: Optional[int], extra: Optional[dict] = None) -> dict:
    env = dict(os.environ)
    # After any PYTHONPATH of the caller's: `PYTHONPATH=../other-checkout python bench/run.py` measures that stride.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(REPO)]))
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env.update(extra or {})
    return env


def stride_command() -> list[str]:
    script = Path(sys.executable).parent / "stride"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "stride"]


def wait_for_quiet(args: argparse.Namespace) -> float:
    """Wait (at most --quiet-wait-s) until other processes leave the machine mostly idle; returns their load."""
    if args.quiet_wait_s <= 0:
        return float("nan")
    deadline = time.monotonic() + args.quiet_wait_s
    while True:
        busy, start = machine_busy_s(), time.perf_counter()
        time.sleep(1.0)
        load = foreign_load(machine_busy_s() - busy, 0.0, time.perf_counter() - start)
        if load <= args.max_foreign_load or time.monotonic() >= deadline:
            return load


def collect_pairs(label: str, args: argparse.Namespace, run_side: Callable[[str, int], dict],
                  describe: Callable[[dict], str], sides: Sequence[str] = ("raw", "stride")) -> list[dict]:
    """raw, stride | stride, raw | ...: each pair (or round of `sides`) back to back, first place rotating, until
    --repeats rounds ran with other processes' load under --max-foreign-load on every side (or --max-pairs ran)."""
    pairs: list[dict] = []
    limit = args.max_pairs or 3 * args.repeats
    while len(pairs) < limit and sum(p["clean"] for p in pairs) < args.repeats:
        rep = len(pairs)
        wait_for_quiet(args)
        pair: dict[str, Any] = {}
        shift = rep % len(sides)
        for side in (*sides[shift:], *sides[:shift]):
            pair[side] = run_side(side, rep)
        pair["foreign_load"] = max(pair[side]["foreign_load"] for side in sides)
        pair["clean"] = pair["foreign_load"] <= args.max_foreign_load
        note(f"{label} #{rep + 1}: {describe(pair)}; other processes' load {pair['foreign_load']:.0%}"
             + ("" if pair["clean"] else " (over the limit: shown, not counted)"))
        pairs.append(pair)
    return pairs


def counted(pairs: list[dict]) -> list[dict]:
    """The pairs the verdicts use: those run on a quiet enough machine, or all of them if none was."""
    return [p for p in pairs if p["clean"]] or pairs


def note(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------ statistics
def med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float], fmt: str) -> str:
    """`median [min-max]` of the repetitions."""
    if not values:
        return "n/a"
    text = format(med(values), fmt)
    return text if len(values) == 1 else f"{text} [{format(min(values), fmt)}–{format(max(values), fmt)}]"


# ----------------------------------------------------------------------------------------------------------- parts
def run_worker(side: str, workload: str, args: argparse.Namespace, work_dir: Path) -> dict:
    """One measurement; side "raw" is the careful plain loop."""
    argv = [sys.executable, "-m", "bench.worker", "careful" if side == "raw" else side, workload,
            "--device", args.device,
            "--precision", args.precision, "--work-dir", str(work_dir)]
    argv += ["--quick"] if args.quick else []
    argv += ["--compile"] if args.compile else []
    argv += ["--checkpoint-every", str(args.checkpoint_every)] if args.checkpoint_every else []
    done = spawn(argv, child_env(args.threads), REPO, WORKER_TIMEOUT_S).check()
    line = next(line for line in done.stdout.splitlines() if line.startswith("BENCH "))
    result = json.loads(line[len("BENCH "):])
    result["process_peak_rss_mb"] = done.peak_rss_mb
    if "foreign_load" not in result:
        result["foreign_load"] = done.foreign_load
    return result


THROUGHPUT = ("mlp", "cnn", "lm")
LABELS = {"mlp": "MLP, overhead-sensitive", "cnn": "CNN, the default", "lm": "char-LM, a stride.Task on dict batches"}
TARGETS = {"mlp": 0.97, "cnn": 0.99, "lm": 0.99}
"""stride's steps/s as a share of the careful plain loop's (batches gathered in one call)."""
USUAL_TARGETS = {"mlp": 1.3}
"""stride's steps/s against the usual plain loop's (a per-sample DataLoader), where the issue sets one."""
LOOPS = ("careful", "usual", "stride")


def bench_throughput(args: argparse.Namespace, root: Path) -> dict:
    """Rounds of three fresh processes: the careful plain loop, the usual one, stride (first place rotating)."""
    out: dict[str, Any] = {}
    for name in args.workloads:
        out[name] = collect_pairs(
            name, args, lambda side, rep: run_worker(side, name, args, root / f"{name}-{rep}"),
            lambda p: f"careful {p['careful']['steps_per_s']:.1f} steps/s, usual {p['usual']['steps_per_s']:.1f}, "
                      f"stride {p['stride']['steps_per_s']:.1f}; stride/careful "
                      f"{p['stride']['steps_per_s'] / p['careful']['steps_per_s']:.3f}, stride/usual "
                      f"{p['stride']['steps_per_s'] / p['usual']['steps_per_s']:.3f}", sides=LOOPS)
    return out


def bench_startup(args: argparse.Namespace, root: Path) -> dict:
    """The default run from a shell: `stride local` against `python -m bench.raw`, process start to first step."""
    work_dir = root / "cli-runs"
    quick = ["training_kwargs.epochs=2"] if args.quick else []

    def run_side(side: str, rep: int) -> dict:
        stamp = root / f"first-step-{side}-{rep}.txt"
        env = child_env(args.threads, {FIRST_STEP_ENV: str(stamp)})
        if side == "stride":
            argv = [*stride_command(), "local", f"work_dir={work_dir}", "dataset_kwargs.dataset_name=bench.probe:digits",
                    f"device={args.device}", f"training_kwargs.precision={args.precision}",
                    f"training_kwargs.compile={str(args.compile).lower()}", *quick]
        else:
            argv = [sys.executable, "-m", "bench.raw", "--workload", "cnn", "--dataset", "bench.probe:digits",
                    "--fetch", "usual",
                    "--device", args.device, "--precision", args.precision, "--out-dir", str(root / f"raw-{rep}")]
            argv += (["--quick"] if args.quick else []) + (["--compile"] if args.compile else [])
        started = time.time()
        done = spawn(argv, env, REPO, WORKER_TIMEOUT_S).check()
        return {"first_step_s": float(stamp.read_text()) - started, "wall_s": done.wall_s,
                "peak_rss_mb": done.peak_rss_mb, "foreign_load": done.foreign_load}

    rows = collect_pairs("first step", args, run_side,
                         lambda p: f"raw {p['raw']['first_step_s']:.2f} s, stride {p['stride']['first_step_s']:.2f} s")
    return {"rows": rows, "work_dir": str(work_dir)}


def torch_imported(argv: Sequence[str], env: dict) -> bool:
    done = spawn(argv, dict(env, PYTHONPROFILEIMPORTTIME="1"), REPO, CLI_TIMEOUT_S).check()
    return any(re.search(r"\|\s+torch$", line) for line in done.stderr.splitlines())


def bench_cli(args: argparse.Namespace, work_dir: Path) -> dict:
    """Wall time of the commands that must not import torch (and of a dry run, whose checks must), with `python -c
    pass` and `import torch` for scale."""
    stride = stride_command()
    commands = {
        "stride --help": [*stride, "--help"],
        "stride status": [*stride, "status", str(work_dir)],
        "stride submit --dry-run": [*stride, "submit", f"work_dir={work_dir}", "--nodes", "2", "--dry-run",
                                    "--skip-slurm-checks"],
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    }
    env = child_env(args.threads)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.cli_repeats):
        wait_for_quiet(args)
        for name, argv in commands.items():  # round-robin, so noise is shared
            times[name].append(spawn(argv, env, REPO, CLI_TIMEOUT_S).check().wall_s)
    imports = {name: torch_imported(argv, env) for name, argv in commands.items() if name.startswith("stride")}
    note("cli: " + ", ".join(f"{name} {med(t):.3f} s" for name, t in times.items()))
    return {"times": times, "imports_torch": imports}


def bench_checkpoint(args: argparse.Namespace, root: Path) -> dict:
    wanted = argparse.Namespace(**{**vars(args), "repeats": args.checkpoint_repeats})
    pairs = collect_pairs(
        "checkpoint", wanted, lambda side, rep: run_worker(side, "ckpt", args, root / f"ckpt-{rep}"),
        lambda p: f"raw stall {[round(x) for x in p['raw']['checkpoint']['stall_ms']]} ms, stride stall "
                  f"{[round(x) for x in p['stride']['checkpoint']['stall_ms']]} ms")
    return {"pairs": pairs}


# ---------------------------------------------------------------------------------------------------------- report
def machine() -> dict:
    info: dict[str, Any] = {"date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
                            "cores": os.cpu_count(), "python": platform.python_version()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        info["cpu"] = re.search(r"Model name:\s*(.+)", lscpu).group(1).strip()
    except (OSError, subprocess.TimeoutExpired, AttributeError):
        info["cpu"] = platform.processor() or "unknown"
    try:
        kib = int(re.search(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text()).group(1))
        info["ram_gib"] = round(kib / 2**20, 1)
    except (OSError, AttributeError):
        info["ram_gib"] = None
    probe = ("import json, torch; print(json.dumps({'torch': torch.__version__, 'threads': torch.get_num_threads(), "
             "'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))")
    info.update(json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                                          env=child_env(None)).stdout))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        info["commit"] = commit + (" (uncommitted changes)" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        info["commit"] = None
    return info


@dataclass
class Row:
    measure: str
    raw: str
    stride: str
    ratio: str
    target: str = ""
    met: Optional[bool] = None


def _verdict(met: Optional[bool]) -> str:
    return "" if met is None else ("**yes**" if met else "**no**")


def build_rows(results: dict, args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    throughput = results.get("throughput", {})
    for name in THROUGHPUT:
        if not throughput.get(name):
            continue
        minimum = TARGETS[name]
        pairs = counted(throughput[name])
        raw = [p["careful"]["steps_per_s"] for p in pairs]
        mine = [p["stride"]["steps_per_s"] for p in pairs]
        ratios = [p["stride"]["steps_per_s"] / p["careful"]["steps_per_s"] for p in pairs]
        label = LABELS[name]
        rows.append(Row(f"{label}: training steps/s (raw: the careful loop, one gather per batch)",
                        spread(raw, ",.0f"), spread(mine, ",.0f"), spread(ratios, ".3f"), f"≥ {minimum}",
                        med(ratios) >= minimum))
        usual = [p["usual"]["steps_per_s"] for p in pairs]
        against_usual = [p["stride"]["steps_per_s"] / p["usual"]["steps_per_s"] for p in pairs]
        wanted = USUAL_TARGETS.get(name)
        rows.append(Row(f"{label}: training steps/s against the usual loop (raw: a per-sample DataLoader)",
                        spread(usual, ",.0f"), spread(mine, ",.0f"), spread(against_usual, ".3f"),
                        f"≥ {wanted}" if wanted else "", med(against_usual) >= wanted if wanted else None))
        # The same loop twice, neighbours in time: what a ratio of two runs on this machine looks like by chance.
        noise = [b / a for a, b in zip(raw, raw[1:])]
        if noise:
            rows.append(Row(f"{label}: for scale, careful/careful of neighbouring repetitions", "", "",
                            spread(noise, ".3f")))
        # The fast steps: what a step costs when nothing else on the machine interferes. The 10th percentile of
        # thousands of step durations per process barely moves with the noise that swings whole-run throughput.
        fast = [p["careful"]["p10_step_ms"] / p["stride"]["p10_step_ms"] for p in pairs]
        rows.append(Row(f"{label}: fast step (10th percentile of step durations), ms",
                        spread([p["careful"]["p10_step_ms"] for p in pairs], ".3f"),
                        spread([p["stride"]["p10_step_ms"] for p in pairs], ".3f"), spread(fast, ".3f") + " (speed)"))
        unit, per_sample = {"cnn": ("images", 1), "lm": ("tokens", workloads.LM.dataset_kwargs["block_size"])}.get(
            name, ("samples", 1))
        rows.append(Row(f"{label}: training {unit}/s",
                        spread([p["careful"]["samples_per_s"] * per_sample for p in pairs], ",.0f"),
                        spread([p["stride"]["samples_per_s"] * per_sample for p in pairs], ",.0f"), ""))
        fit_ratios = [p["careful"]["fit_s"] / p["stride"]["fit_s"] for p in pairs]
        rows.append(Row(f"{label}: whole fit() incl. setup and test, s",
                        spread([p["careful"]["fit_s"] for p in pairs], ".2f"),
                        spread([p["stride"]["fit_s"] for p in pairs], ".2f"), spread(fit_ratios, ".3f") + " (speed)"))
        same = all(p["careful"]["final"] == p["usual"]["final"] == p["stride"]["final"] for p in throughput[name])
        rows.append(Row(f"{label}: final val/test metrics (all three loops)", "", "",
                        "identical" if same else "differ"))
    startup = results.get("startup")
    if startup:
        data = counted(startup["rows"])
        raw = [r["raw"]["first_step_s"] for r in data]
        mine = [r["stride"]["first_step_s"] for r in data]
        deltas = [r["stride"]["first_step_s"] - r["raw"]["first_step_s"] for r in data]
        rows.append(Row("process start → first training step, s (`stride local` vs `python -m bench.raw`)",
                        spread(raw, ".2f"), spread(mine, ".2f"), "+" + spread(deltas, ".2f") + " s",
                        "≤ raw + 1 s", med(deltas) <= 1.0))
        rows.append(Row("whole default run from the shell, s", spread([r["raw"]["wall_s"] for r in data], ".2f"),
                        spread([r["stride"]["wall_s"] for r in data], ".2f"),
                        spread([r["stride"]["wall_s"] / r["raw"]["wall_s"] for r in data], ".3f")))
        rss_ratio = [r["stride"]["peak_rss_mb"] / r["raw"]["peak_rss_mb"] for r in data]
        rows.append(Row("peak memory (RSS) of that run, MB", spread([r["raw"]["peak_rss_mb"] for r in data], ".0f"),
                        spread([r["stride"]["peak_rss_mb"] for r in data], ".0f"), spread(rss_ratio, ".3f")))
    cli = results.get("cli")
    if cli:
        for name in ("stride --help", "stride status"):
            t = cli["times"][name]
            imports = cli["imports_torch"][name]
            rows.append(Row(f"`{name}`, s", "", spread(t, ".3f"), "imports torch" if imports else "no torch",
                            "< 0.5 s, no torch", med(t) < 0.5 and not imports))
        t = cli["times"]["stride submit --dry-run"]  # its checks build the model and one batch: torch by design
        rows.append(Row("`stride submit --dry-run --skip-slurm-checks` (checks plug-ins, data, model, one batch), s",
                        "", spread(t, ".3f"), "", "", None))
        for name in ("python -c pass", "python -c 'import torch'"):
            rows.append(Row(f"for scale: `{name}`, s", spread(cli["times"][name], ".3f"), "", ""))
    ckpt = results.get("checkpoint")
    if ckpt:
        pairs = counted(ckpt["pairs"])
        raw_stall = [s for p in pairs for s in p["raw"]["checkpoint"]["stall_ms"]]
        first = [p["stride"]["checkpoint"]["stall_ms"][0] for p in pairs]
        later = [s for p in pairs for s in p["stride"]["checkpoint"]["stall_ms"][1:]]
        ratio = med(later) / med(raw_stall)
        mb = med([b for p in pairs for b in p["stride"]["checkpoint"]["write_bytes"]]) / 1e6
        rows.append(Row(f"checkpoint of {mb:.0f} MB: training stall, ms (raw: its synchronous torch.save)",
                        spread(raw_stall, ".0f"), spread(later, ".0f"), spread([s / med(raw_stall) for s in later], ".3f"),
                        "≤ 0.10", ratio <= 0.10))
        rows.append(Row("same, the run's first checkpoint (allocates the host buffers), ms", "",
                        spread(first, ".0f"), spread([s / med(raw_stall) for s in first], ".3f")))
        blocked = [s for p in pairs for s in p["stride"]["checkpoint"].get("save_stall_ms", [])[1:]]
        if blocked:
            rows.append(Row("same, by stride's own record: the training thread blocked (buffers' copy, and the wait "
                            "before the next optimizer step for the weights' copy), ms", "", spread(blocked, ".1f"),
                            spread([s / med(raw_stall) for s in blocked], ".3f")))
        slow = [s for p in pairs for s in p["stride"]["checkpoint"]["slowdown_during_write_ms"][1:]]
        rows.append(Row("steps slowed while the background write runs (sum), ms", "", spread(slow, ".0f"),
                        spread([s / med(raw_stall) for s in slow], ".3f")))
        slower = [s for p in pairs for s in p["stride"]["checkpoint"].get("overlap_slowdown", [])[1:]]
        if slower:
            rows.append(Row("same, as how much slower those steps ran than normal steps", "",
                            spread([s * 100 for s in slower], ".1f") + " %", "", "≤ 3 %", med(slower) <= 0.03))
        ref = [p["stride"]["reference"] for p in pairs]
        disk = [r["bytes"] / s / 1e6 for r in ref for s in r["disk_s"]]
        idle = [r["bytes"] / s / 1e6 for r in ref for s in r.get("stride_write_s", r["stride_sync_s"])]
        plain = [r["bytes"] / s / 1e6 for r in ref for s in r["torch_save_fsync_s"]]
        rows.append(Row("checkpoint write (serialise, CRC32, write, fsync, rename), MB/s; raw: the disk's os.write + "
                        "fsync of as many bytes, same process", spread(disk, ",.0f"), spread(idle, ",.0f"),
                        f"{med(idle) / med(disk):.3f}", "≥ 0.80", med(idle) / med(disk) >= 0.80))
        bg = [b / s / 1e6 for p in pairs for b, s in zip(p["stride"]["checkpoint"]["write_bytes"],
                                                          p["stride"]["checkpoint"]["write_s"])]
        rows.append(Row("same write in the background while training uses every core, MB/s", "", spread(bg, ",.0f"),
                        f"{med(bg) / med(disk):.3f} of disk"))
        rows.append(Row("for scale: torch.save + fsync of that state, MB/s", spread(plain, ",.0f"), "", ""))
        rows.append(Row("for scale: plain torch.save of that state (no fsync), ms",
                        spread([s * 1e3 for r in ref for s in r["torch_save_s"]], ".0f"), "", ""))
    return rows


def render(results: dict, args: argparse.Namespace, command: str) -> str:
    m = results["machine"]
    lines = [f"Measured {m['date']} on {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM"
             + (f", {m['gpu']}" if m.get("gpu") else "") + f"; torch {m['torch']} ({m['threads']} threads), "
             f"Python {m['python']}, stride at {m['commit']}.",
             f"Device `{args.device}`, precision `{args.precision}`" + (", torch.compile" if args.compile else "")
             + f"; {args.repeats} alternating raw/stride repetitions ({args.checkpoint_repeats} for checkpoints, "
             f"{args.cli_repeats} for CLI commands); load average {results['load_before']} before, "
             f"{results['load_after']} after.",
             f"Command: `{command}`. Cells: median [min–max] over repetitions; ratios are taken within each "
             f"raw/stride pair.", ""]
    if args.quick:
        lines += ["**--quick run: a smoke test of the bench, shortened workloads, one repetition; not a measurement.**",
                  ""]
    parts = [(name, results.get("throughput", {}).get(key) if key else results.get(part, {}).get(field))
             for name, part, key, field in (("MLP", "throughput", "mlp", None), ("CNN", "throughput", "cnn", None),
                                             ("char-LM", "throughput", "lm", None),
                                             ("first step", "startup", None, "rows"),
                                             ("checkpoint", "checkpoint", None, "pairs"))]
    used = ", ".join(f"{name} {sum(p['clean'] for p in pairs)} of {len(pairs)}" for name, pairs in parts if pairs)
    loads = [p["foreign_load"] for _, pairs in parts if pairs for p in pairs]
    if loads:
        lines += [f"Other processes kept {spread(loads, '.0%')} of the cores busy during the pairs; pairs counted "
                  f"(that load at most {args.max_foreign_load:.0%} on both sides; all pairs if none was): {used}.", ""]
    lines += ["| measure | raw PyTorch | stride | stride/raw | target | met |", "|---|---|---|---|---|---|"]
    for row in build_rows(results, args):
        lines.append(f"| {row.measure} | {row.raw} | {row.stride} | {row.ratio} | {row.target} | {_verdict(row.met)} |")
    return "\n".join(lines) + "\n"


def update_docs(table: str) -> None:
    text = DOCS.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"bench: {DOCS} has no {BEGIN} ... {END} block to replace")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOCS.write_text(f"{head}{BEGIN}\n{table}{END}{tail}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/run.py", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shortened workloads, one repetition (smoke run)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (both sides)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--compile", action="store_true", help="torch.compile on both sides")
    parser.add_argument("--repeats", type=int, default=None, help="raw/stride pairs per workload (default 9)")
    parser.add_argument("--checkpoint-repeats", type=int, default=None, help="default 3")
    parser.add_argument("--cli-repeats", type=int, default=None, help="default 9")
    parser.add_argument("--checkpoint-every", type=int, default=None,
                        help="steps between the checkpoint part's saves (default: its workload's, 72)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both sides (default: torch's)")
    parser.add_argument("--max-foreign-load", type=float, default=0.10,
                        help="count a pair only if other processes kept at most this share of the cores busy")
    parser.add_argument("--max-pairs", type=int, default=None,
                        help="stop a part after this many pairs, counted or not (default: 3 x the repetitions)")
    parser.add_argument("--quiet-wait-s", type=float, default=None,
                        help="before each pair, wait up to this long for the machine to quieten (default 60)")
    parser.add_argument("--only", default="throughput,startup,cli,checkpoint",
                        help="comma-separated parts: throughput, startup, cli, checkpoint")
    parser.add_argument("--workloads", default=",".join(THROUGHPUT),
                        help=f"the throughput part's workloads, comma-separated (default {','.join(THROUGHPUT)})")
    parser.add_argument("--work-dir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write every measurement here")
    parser.add_argument("--update-docs", action="store_true", help=f"rewrite the table in {DOCS.relative_to(REPO)}")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 9)
    args.checkpoint_repeats = args.checkpoint_repeats or (1 if args.quick else 3)
    args.cli_repeats = args.cli_repeats or (3 if args.quick else 9)
    if args.quick:
        args.max_pairs = args.max_pairs or 1
    args.quiet_wait_s = (0.0 if args.quick else 60.0) if args.quiet_wait_s is None else args.quiet_wait_s
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if set(args.workloads) - set(THROUGHPUT):
        parser.error(f"unknown workload(s) {', '.join(sorted(set(args.workloads) - set(THROUGHPUT)))}; choose from "
                     f"{', '.join(THROUGHPUT)}")
    unknown = parts - {"throughput", "startup", "cli", "checkpoint"}
    if unknown:
        parser.error(f"unknown part(s) {', '.join(sorted(unknown))}")
    command = "python bench/run.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))

    root = args.work_dir or Path(tempfile.mkdtemp(prefix="stride-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine(), "load_before": _load()}
    try:
        if "throughput" in parts:
            results["throughput"] = bench_throughput(args, root)
        if "startup" in parts or "cli" in parts:
            results["startup"] = bench_startup(args, root)
        if "cli" in parts:
            results["cli"] = bench_cli(args, Path(results["startup"]["work_dir"]))
        if "startup" not in parts:
            results.pop("startup", None)
        if "checkpoint" in parts:
            results["checkpoint"] = bench_checkpoint(args, root)
    finally:
        if args.work_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    results["load_after"] = _load()
    table = render(results, args, command)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args), **results}, indent=1, default=str) + "\n")
    if args.update_docs:
        update_docs(table)
    return 0


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


if __name__ == "__main__":
    sys.exit(main())
