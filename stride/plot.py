"""`stride plot`: curves of a work_dir's runs from their metrics.jsonl, one line per run, one panel per metric.

Reading the metrics and building the series is pure (no matplotlib, no torch); only `render` imports matplotlib,
drawing on the Agg canvas so it works without a display (a login node, CI). matplotlib is an optional extra.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from stride import compare
from stride.errors import StrideError, did_you_mean, os_error
from stride.rundir import RunDir, atomic_write

NOT_METRICS = frozenset({"time", "epoch", "step", "split"})
# The validation metric shown by default, first one found: what classification and regression runs report.
DEFAULT_VAL_METRICS = ("val_accuracy", "val_loss")
INSTALL_HINT = "pip install 'stride[plot]'"


@dataclass
class Series:
    """One run's curve for one metric."""

    run: str
    label: str
    steps: list[int]
    values: list[float]


def read_metrics(run: RunDir) -> list[dict]:
    """The run's metrics records; a missing file is no records, a line cut short by a kill is skipped."""
    try:
        text = run.metrics_file.read_text(errors="replace")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise os_error(exc, "read", run.metrics_file) from None
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metric_names(records: Iterable[dict]) -> set[str]:
    return {key for record in records for key, value in record.items() if key not in NOT_METRICS
            and _is_number(value)}


def metric_series(records: Iterable[dict], metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `metric` in step order, from every record that has it.

    A step seen twice keeps its later value: what a resumed run wrote last is what it trained.
    """
    by_step: dict[int, float] = {}
    for record in records:
        value = record.get(metric)
        if _is_number(value):
            by_step[record["step"]] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[step] for step in steps]


def default_metrics(available: set[str]) -> list[str]:
    """train_loss beside the main validation metric (val_accuracy, else val_loss)."""
    chosen = ["train_loss"] if "train_loss" in available else []
    val = next((m for m in DEFAULT_VAL_METRICS if m in available),
               next((m for m in sorted(available) if m.startswith("val_")), None))
    return chosen + ([val] if val else [])


def parse_metrics(metric: Any) -> Optional[list[str]]:
    """--metric as given to Fire: `val_loss`, `train_loss,val_loss` (a tuple once Fire parsed it) or a list."""
    if metric is None:
        return None
    items = metric if isinstance(metric, (list, tuple)) else str(metric).split(",")
    names = [str(item).strip() for item in items if str(item).strip()]
    if not names:
        raise StrideError("--metric needs a metric name, e.g. --metric val_loss or --metric train_loss,val_loss")
    return names


def build_panels(runs: Sequence[RunDir], metrics: Optional[Sequence[str]] = None) -> dict[str, list[Series]]:
    """{metric: one Series per run that has it}, labelled by the settings that differ between `runs`."""
    if not runs:
        raise StrideError("no runs to plot: train one first, e.g. `stride local work_dir=WORK_DIR`")
    runs, configs, records = _readable(runs)
    available = metric_names(r for recs in records.values() for r in recs)
    if not available:
        raise StrideError(f"no metrics yet in {', '.join(str(run.path) for run in runs)}: a run writes metrics.jsonl "
                          f"as it trains (see `stride status {runs[0].work_dir}`)")
    metrics = list(metrics) if metrics else default_metrics(available)
    for name in metrics:
        if name not in available:
            raise StrideError(f"no run has the metric '{name}'{did_you_mean(name, available)}; metrics found: "
                              f"{', '.join(sorted(available))}")
    swept = [key for run in runs for key in _swept_keys(run)]
    labels = compare.run_labels(configs, [run.name for run in runs], first=list(dict.fromkeys(swept)))
    panels: dict[str, list[Series]] = {}
    for name in metrics:
        panels[name] = []
        for run, label in zip(runs, labels):
            steps, values = metric_series(records[run.name], name)
            if steps:
                panels[name].append(Series(run.name, label, steps, values))
    return panels


def _swept_keys(run: RunDir) -> list[str]:
    """The keys of the sweep the run belongs to (they lead its label); none when its metadata cannot say."""
    try:
        sweep = run.read_metadata().get("sweep")
    except StrideError:  # a hand-edited metadata.json costs the label its order, not the plot
        return []
    keys = sweep.get("keys") if isinstance(sweep, dict) else None
    return [str(key) for key in keys] if isinstance(keys, list) else []


def _readable(runs: Sequence[RunDir]) -> tuple[list[RunDir], list[dict], dict[str, list[dict]]]:
    """The runs whose config and metrics can be read, with them; each broken one is named on stderr and left out,
    so one bad folder does not hide the others. Only broken runs: the first one's error."""
    kept, configs, records, broken = [], [], {}, []
    for run in runs:
        try:
            config, recs = run.read_config(), read_metrics(run)
        except StrideError as exc:
            broken.append(str(exc))
            continue
        kept.append(run)
        configs.append(config)
        records[run.name] = recs
    if not kept:
        raise StrideError(broken[0])
    for reason in broken:
        print(f"stride: warning: a broken run is left out of the plot: {reason}", file=sys.stderr)
    return kept, configs, records


def default_output(work_dir: Path, metrics: Sequence[str]) -> Path:
    return Path(work_dir) / "plots" / f"{'-'.join(metrics)}.png"


def render(panels: dict[str, list[Series]], out: Path, title: str = "") -> Path:
    """Draw the panels side by side into `out` (its suffix picks the format; written atomically)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise StrideError(f"stride plot needs matplotlib, which is not installed here: {INSTALL_HINT}") from None
    import warnings

    with warnings.catch_warnings():  # matplotlib's layout and font notes are not the user's business
        warnings.simplefilter("ignore")
        return _render(panels, Path(out), title, FigureCanvasAgg, Figure, MaxNLocator)


def _render(panels: dict[str, list[Series]], out: Path, title: str, FigureCanvasAgg: Any, Figure: Any,
            MaxNLocator: Any) -> Path:
    if out.is_dir():
        raise StrideError(f"--out {out} is a folder: give the file to write, e.g. --out {out / 'curves.png'}")
    fmt = out.suffix.lstrip(".").lower() or "png"
    figure = Figure(figsize=(6 * len(panels), 4.5), layout="constrained")
    canvas = FigureCanvasAgg(figure)  # Agg: no display, no pyplot state
    if fmt not in canvas.get_supported_filetypes():
        raise StrideError(f"cannot write a plot as '.{fmt}' ({out}): use .png, .svg or .pdf")
    runs = list(dict.fromkeys(series.run for panel in panels.values() for series in panel))
    colors = {run: f"C{i % 10}" for i, run in enumerate(runs)}  # one colour per run across all panels
    for index, (metric, panel) in enumerate(panels.items()):
        axes = figure.add_subplot(1, len(panels), index + 1)
        for series in panel:
            # Few points (a val metric over a couple of epochs) would be invisible as a bare line.
            marker = "o" if len(series.steps) <= 20 else None
            axes.plot(series.steps, series.values, label=series.label, color=colors[series.run], marker=marker,
                      markersize=3)
        axes.set_title(metric)
        axes.set_xlabel("step")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(True, alpha=0.3)
        if panel:  # below the curves, never over them; the constrained layout makes room for it
            axes.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=1 if len(panel) < 4
                        else 2, frameon=False)
    if title:
        figure.suptitle(title)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(exc, "create the folder for", out) from None
    atomic_write(out, lambda handle: figure.savefig(handle, format=fmt), mode="wb")
    return out
