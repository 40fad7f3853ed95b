"""Paper-style figures and Markdown tables for evaluation results.

Figures are drawn on a bare ``matplotlib.figure.Figure`` with the Agg canvas, so nothing
touches pyplot's global state and the module works headless. Every run label keeps one
colour (Okabe-Ito, colour-blind safe) for the whole process, so "VI" and "VI + AS" look
the same in every figure of a report.

Inputs are plain numbers, lists, numpy arrays or torch tensors. Percentage-valued inputs
(accuracy, risk, coverage) may be fractions or percent: values that all lie in [0, 1] are
read as fractions, anything larger as percent already; figures always show percent.
"""

from __future__ import annotations

import functools
import io
import math
import numbers
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import matplotlib
import matplotlib.ticker
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from asbnn.fileio import atomic_write_bytes
from asbnn.errors import ConfigError

DPI = 150
# Okabe & Ito (2008), without its yellow, which is too faint for lines on white.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
IN_COLOUR, OUT_COLOUR, REFERENCE_COLOUR, GAP_COLOUR = "#56B4E9", "#E69F00", "#7F7F7F", "#404040"
TITLES = {"test_acc": "test accuracy at the posterior mean", "test_acc_sample": "test accuracy of one sampled model"}

_STYLE = {
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.5,
    "legend.frameon": False,
    "lines.linewidth": 1.5,
}
#: Marker shapes, in turn, for series once the palette's colours are used up.
MARKERS = ("o", "s", "^", "D", "v")
LEGEND_INSIDE_MAX = 6  # labels a legend may have inside a panel of plot_scatter_panels
_registry: dict[str, str] = {}  # label -> colour, for the whole process
_NUMERIC_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?( ?± ?\d+\.?\d*)? ?%?$", re.IGNORECASE)

P = ParamSpec("P")
R = TypeVar("R")


# ---------------------------------------------------------------- helpers


def _styled(plot: Callable[P, R]) -> Callable[P, R]:
    """Apply the paper style only while one figure is drawn, leaving global rcParams alone."""

    @functools.wraps(plot)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with matplotlib.rc_context(_STYLE):
            return plot(*args, **kwargs)

    return wrapper


def _colours(labels: Sequence[str]) -> dict[str, str]:
    """Colours for one figure's labels: each label keeps the colour it first got in this process,
    unless that would repeat a colour within the figure; new labels prefer colours no label has yet."""
    result: dict[str, str] = {}
    for label in labels:
        known = _registry.get(label)
        if known is not None and known not in result.values():
            result[label] = known
    for label in labels:
        if label in result:
            continue
        free = [c for c in PALETTE if c not in result.values()]
        unused = [c for c in free if c not in _registry.values()]
        result[label] = (unused or free or [PALETTE[len(result) % len(PALETTE)]])[0]
        _registry.setdefault(label, result[label])
    return result


def _numpy(values: Any) -> np.ndarray:
    """1-D float array from a list, numpy array or torch tensor (even on GPU or requiring grad)."""
    if hasattr(values, "detach"):
        values = values.detach().cpu()
    return np.asarray(values, dtype=float).reshape(-1)


def _array(values: Any, what: str) -> np.ndarray:
    """A finite, non-empty 1-D float array; a clear error beats a silently empty or NaN plot."""
    arr = _numpy(values)
    if arr.size == 0:
        raise ConfigError(f"{what}: no values to plot")
    if not np.isfinite(arr).all():
        raise ConfigError(f"{what}: {int((~np.isfinite(arr)).sum())} of {arr.size} values are NaN or infinite")
    return arr


def _percent_scale(*reference: np.ndarray) -> float:
    """100 if the values look like fractions (all within [0, 1]), else 1 (already percent)."""
    return 100.0 if max(np.abs(r).max() for r in reference) <= 1.0 else 1.0


def _require(mapping: dict, what: str) -> None:
    if not mapping:
        raise ConfigError(f"{what}: nothing to plot")


def _figure(ncols: int = 1, width: float = 4.2, height: float = 3.0) -> Figure:
    fig = Figure(figsize=(width * ncols, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    """Write the PNG atomically: a killed run never leaves a half-written plot behind."""
    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=DPI, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _shared_bins(*arrays: np.ndarray, max_bins: int = 30) -> np.ndarray:
    """One set of edges for overlaid histograms, so bar heights are comparable; copes with zero spread."""
    values = np.concatenate(arrays)
    n_bins = int(np.clip(round(math.sqrt(values.size)), 10, max_bins))
    lo, hi = values.min(), values.max()
    if hi - lo < 1e-9 * max(1.0, abs(hi)):
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, n_bins + 1)


def _overlaid_hist(ax: Axes, values: np.ndarray, bins: np.ndarray, colour: str, label: str, density: bool) -> None:
    """Translucent fill plus a solid outline: overlaps stay readable, edges stay crisp."""
    ax.hist(values, bins=bins, density=density, color=colour, alpha=0.35, label=label)
    ax.hist(values, bins=bins, density=density, color=colour, histtype="step", linewidth=1.2)


# ---------------------------------------------------------------- figures


@_styled
def plot_sample_accuracies(runs: dict[str, Sequence[float]], path: str | Path) -> Path:
    """Spread of the K sampled models' accuracies per run: AS should narrow it and lift the worst model."""
    _require(runs, "plot_sample_accuracies")
    arrays = {label: _array(acc, f"accuracies of {label!r}") for label, acc in runs.items()}
    scale = _percent_scale(*arrays.values())
    arrays = {label: acc * scale for label, acc in arrays.items()}
    bins = _shared_bins(*arrays.values())
    colours = _colours(list(arrays))
    fig = _figure()
    ax = fig.add_subplot()
    for label, acc in arrays.items():
        colour = colours[label]
        _overlaid_hist(ax, acc, bins, colour, f"{label} ({acc.min():.2f}–{acc.max():.2f} %)", density=False)
        ax.axvline(acc.mean(), color=colour, linestyle="--", linewidth=1.2)
    handles, labels = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], color=REFERENCE_COLOUR, linestyle="--", linewidth=1.2))
    labels.append("mean")
    ax.legend(handles, labels, title="run (min–max)", loc="upper left")
    ax.set_xlabel("test accuracy of a sampled model (%)")
    ax.set_ylabel("sampled models")
    ax.yaxis.get_major_locator().set_params(integer=True)
    return _save(fig, path)


@_styled
def plot_reliability(runs: dict[str, dict], path: str | Path) -> Path:
    """Reliability diagram per run, with bin counts below so sparse bins are not over-read.

    Each dict holds per-bin "confidence", "accuracy" and "count" (as from
    metrics.calibration_bins); optional "edges" (n_bins + 1, default equal width) and
    "ece" (a fraction, shown in % in the legend). Bins with count 0 are skipped.
    """
    _require(runs, "plot_reliability")
    colours = _colours(list(runs))
    fig = _figure(ncols=len(runs), width=3.4, height=3.8)
    grid = fig.add_gridspec(2, len(runs), height_ratios=(3, 1))
    for col, (label, bins) in enumerate(runs.items()):
        count = _array(bins["count"], f"bin counts of {label!r}")
        keep = count > 0
        if not keep.any():
            raise ConfigError(f"reliability of {label!r}: every bin is empty")
        n_bins = count.size
        edges = _array(bins["edges"], f"bin edges of {label!r}") if "edges" in bins else np.linspace(0, 1, n_bins + 1)
        if edges.size != n_bins + 1:
            raise ConfigError(f"reliability of {label!r}: {edges.size} edges for {n_bins} bins")
        conf, acc = _numpy(bins["confidence"]), _numpy(bins["accuracy"])
        if not conf.size == acc.size == n_bins:
            raise ConfigError(
                f"reliability of {label!r}: {conf.size} confidences, {acc.size} accuracies, {n_bins} counts"
            )
        # Empty bins may hold 0 or NaN; only the kept ones must be finite.
        conf, acc = _array(conf[keep], f"confidence of {label!r}"), _array(acc[keep], f"accuracy of {label!r}")
        scale = _percent_scale(edges)
        lo, width = edges[:-1][keep] * scale, np.diff(edges)[keep] * scale
        conf, acc, count = conf * scale, acc * scale, count[keep]
        colour = colours[label]

        ax = fig.add_subplot(grid[0, col])
        ax.plot([0, 100], [0, 100], color=REFERENCE_COLOUR, linestyle="--", linewidth=1, label="perfect calibration")
        ece = f", ECE {100 * float(bins['ece']):.2f} %" if "ece" in bins else ""
        ax.bar(lo, acc, width=width, align="edge", color=colour, alpha=0.8, edgecolor="white", linewidth=0.5,
               label=f"accuracy{ece}")
        ax.bar(lo, conf - acc, bottom=acc, width=width, align="edge", fill=False, edgecolor=GAP_COLOUR,
               hatch="///", linewidth=0.5, label="gap")
        ax.set(xlim=(0, 100), ylim=(0, 100), ylabel="accuracy (%)", title=label)
        ax.tick_params(labelbottom=False)
        ax.legend(loc="upper left")

        hist = fig.add_subplot(grid[1, col], sharex=ax)
        hist.bar(lo, count, width=width, align="edge", color=colour, alpha=0.8, edgecolor="white", linewidth=0.5)
        hist.set_yscale("log")
        hist.set_ylim(bottom=0.5)  # keeps single-input bins visible on the log axis
        hist.set(xlabel="confidence (%)", ylabel="inputs")
    return _save(fig, path)


@_styled
def plot_risk_coverage(
    curves: dict[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    marks: Sequence[float] = (0.2, 0.4, 0.6, 0.8),
) -> Path:
    """Error among the most confident inputs as coverage grows; a better uncertainty stays low for longer.

    curves: label -> (coverage, risk), as from metrics.risk_coverage. marks are coverages
    as fractions, drawn as dotted verticals (the paper's selective-accuracy points).
    """
    _require(curves, "plot_risk_coverage")
    colours = _colours(list(curves))
    fig = _figure(width=4.6, height=3.2)
    ax = fig.add_subplot()
    for label, (coverage, risk) in curves.items():
        cov = _array(coverage, f"coverage of {label!r}")
        err = _array(risk, f"risk of {label!r}")
        if cov.size != err.size:
            raise ConfigError(f"{label!r}: {cov.size} coverages but {err.size} risks")
        scale = _percent_scale(cov)  # coverage reaches 1 or 100, while risk may stay below 1 % either way
        ax.plot(cov * scale, err * scale, color=colours[label], label=label)
    for mark in marks:
        ax.axvline(100 * mark, color=REFERENCE_COLOUR, linestyle=":", linewidth=1)
    ax.set(xlim=(0, 100), xlabel="coverage (%)", ylabel="risk: error on covered inputs (%)")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left")
    return _save(fig, path)


@_styled
def plot_ood_scores(
    scores: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, unit: str = "nats"
) -> Path:
    """Per score name, densities of in-distribution vs OOD scores: good detectors barely overlap.

    scores: name (e.g. "total", "epistemic") -> (in-distribution scores, OOD scores).
    """
    _require(scores, "plot_ood_scores")
    fig = _figure(ncols=len(scores), width=3.6, height=2.9)
    axes = fig.subplots(1, len(scores), squeeze=False)[0]
    for ax, (name, (score_in, score_out)) in zip(axes, scores.items()):
        s_in = _array(score_in, f"in-distribution {name} scores")
        s_out = _array(score_out, f"OOD {name} scores")
        bins = _shared_bins(s_in, s_out, max_bins=40)
        _overlaid_hist(ax, s_in, bins, IN_COLOUR, f"in-distribution (n={s_in.size})", density=True)
        _overlaid_hist(ax, s_out, bins, OUT_COLOUR, f"OOD (n={s_out.size})", density=True)
        ax.set(title=f"{name} uncertainty", xlabel=f"{name} uncertainty ({unit})", ylabel=f"density (1/{unit})")
        ax.legend(loc="upper right")
    return _save(fig, path)


@_styled
def plot_training_curves(
    logs: dict[str, list[dict]], path: str | Path, keys: Sequence[str] = ("test_acc", "test_acc_sample")
) -> Path:
    """One panel per logged key, one line per run (seeds are separate labels).

    logs: label -> records of a JSON-lines training log, each with "epoch"; records that
    lack a key (or hold None for it) are skipped for that key. Keys containing "acc" are
    accuracies and are shown in %.
    """
    _require(logs, "plot_training_curves")
    present = [key for key in keys if any(rec.get(key) is not None for log in logs.values() for rec in log)]
    if not present:
        raise ConfigError(f"plot_training_curves: no record has any of the keys {list(keys)}")
    colours = _colours(list(logs))
    fig = _figure(ncols=len(present), width=3.8, height=3.0)
    axes = fig.subplots(1, len(present), squeeze=False)[0]
    for ax, key in zip(axes, present):
        series = {}
        for label, log in logs.items():
            points = sorted((rec["epoch"], rec[key]) for rec in log if rec.get(key) is not None)
            if points:
                epochs, values = zip(*points)
                series[label] = (_array(epochs, f"epochs of {label!r}"), _array(values, f"{key} of {label!r}"))
        is_accuracy = "acc" in key
        scale = _percent_scale(*(v for _, v in series.values())) if is_accuracy else 1.0
        for label, (epochs, values) in series.items():
            ax.plot(epochs, values * scale, color=colours[label], label=label, marker="o" if epochs.size == 1 else None)
        ax.set(title=TITLES.get(key, key), xlabel="epoch", ylabel="accuracy (%)" if is_accuracy else key)
        ax.xaxis.get_major_locator().set_params(integer=True)
    handles: dict[str, Any] = {}  # one figure legend: a run missing from a panel still appears once
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=min(len(handles), 4))
    return _save(fig, path)


@_styled
def plot_lambda_sweep(
    lams: Sequence[float], series: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | Path
) -> Path:
    """Accuracy (mean ± std over seeds) against the AS weight λ, one line per series.

    series: name (e.g. "lowest", "highest", "ensemble") -> (means, stds), one per λ.
    λ is drawn on a log axis when it is positive and spans two decades or more.
    """
    _require(series, "plot_lambda_sweep")
    x = _array(lams, "lambdas")
    arrays = {}
    for name, (means, stds) in series.items():
        m, s = _array(means, f"means of {name!r}"), _array(stds, f"stds of {name!r}")
        if not m.size == s.size == x.size:
            raise ConfigError(f"{name!r}: {m.size} means and {s.size} stds for {x.size} lambdas")
        arrays[name] = (m, s)
    scale = _percent_scale(*(m for m, _ in arrays.values()))
    colours = _colours(list(arrays))
    fig = _figure(width=4.4, height=3.1)
    ax = fig.add_subplot()
    for name, (m, s) in arrays.items():
        ax.errorbar(x, m * scale, yerr=s * scale, color=colours[name], label=name, marker="o", markersize=4,
                    capsize=3, linewidth=1.2)
    if x.min() > 0 and x.max() / x.min() >= 100:
        ax.set_xscale("log")
    ax.set(xlabel="λ (weight of the adversarial-sampling term)", ylabel="test accuracy (%)")
    ax.legend(loc="best")
    return _save(fig, path)


@_styled
def plot_scatter_panels(
    panels: dict[str, dict[str, tuple[Sequence[float], Sequence[float]]]], xlabel: str, ylabel: str,
    path: str | Path, *, zero_line: bool = False, connect: bool = False, log_x: bool = False,
    companions: dict[str, str] | None = None,
) -> Path:
    """One panel per title (e.g. per evaluation protocol), one series per label.

    panels: title -> label -> (xs, ys). `zero_line` draws y = 0, for "gain against a predictor"
    plots where the sign of y (does the method help?) is what a reader looks for first;
    `connect` joins each series' points in x order, for cost curves. `companions` maps a label to
    the label whose colour it takes, drawn dashed: a second line of the same subject (e.g. one
    cell's VI trained longer beside that cell's methods), so related lines read as one colour.
    """
    _require(panels, "plot_scatter_panels")
    companions = companions or {}
    labels = sorted({label for series in panels.values() for label in series})
    subjects = sorted({companions.get(label, label) for label in labels})
    colours = _colours(subjects)
    # more subjects than colours: the ones past the palette get other marker shapes too
    markers = {s: MARKERS[i // len(PALETTE) % len(MARKERS)] for i, s in enumerate(subjects)}
    fig = _figure(ncols=len(panels), width=4.0, height=3.1)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, series) in zip(axes, panels.items()):
        if zero_line:
            ax.axhline(0, color="0.4", linewidth=0.8)
        for label, (xs, ys) in series.items():
            x, y = _array(xs, f"x of {label!r}"), _array(ys, f"y of {label!r}")
            if x.size != y.size:
                raise ConfigError(f"{label!r}: {x.size} x values for {y.size} y values")
            order = np.argsort(x, kind="stable")
            line = ("--" if label in companions else "-") if connect else "none"
            subject = companions.get(label, label)
            ax.plot(x[order], y[order], color=colours[subject], label=label, marker=markers[subject],
                    markersize=4, linestyle=line, linewidth=1.0)
        if log_x:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # labelled minor ticks overlap
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if len(labels) > LEGEND_INSIDE_MAX:  # beside the panels: inside, it would hide the data
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper")
    else:
        axes[0].legend(loc="best")
    return _save(fig, path)


# ---------------------------------------------------------------- tables


def _cell(value: object) -> str:
    """Floats get 2 decimals; everything else (str, int, bool) prints as is."""
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return f"{float(value):.2f}"
    return str(value).replace("|", r"\|")


def _is_numeric(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Real):
        return True
    return isinstance(value, str) and bool(_NUMERIC_TEXT.match(value.strip()))


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """GitHub-flavoured table, padded so the raw text reads too; numeric columns right-aligned.

    A column is numeric when every non-empty cell is a number or a string such as
    "86.33", "86.33 ± 0.45" or "12.5 %".
    """
    if not headers:
        raise ConfigError("markdown_table: no headers")
    for i, row in enumerate(rows):
        if len(row) != len(headers):
            raise ConfigError(f"markdown_table: row {i} has {len(row)} cells, expected {len(headers)}")
    cells = [[_cell(v) for v in row] for row in rows]
    numeric = [
        any(str(row[j]) != "" for row in rows) and all(_is_numeric(row[j]) for row in rows if str(row[j]) != "")
        for j in range(len(headers))
    ]
    head = [_cell(h) for h in headers]
    widths = [max(3, len(head[j]), *(len(r[j]) for r in cells)) for j in range(len(headers))]

    def line(parts: Sequence[str]) -> str:
        return "| " + " | ".join(parts) + " |"

    def pad(text: str, j: int) -> str:
        return text.rjust(widths[j]) if numeric[j] else text.ljust(widths[j])

    align = ["-" * (w - 1) + ":" if num else ":" + "-" * (w - 1) for w, num in zip(widths, numeric)]
    body = [line([pad(c, j) for j, c in enumerate(r)]) for r in cells]
    return "\n".join([line([pad(h, j) for j, h in enumerate(head)]), line(align), *body])


def mean_std(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    """Mean ± sample std (ddof=1) of scale * values, e.g. "86.33 ± 0.45"; one value gives just the mean."""
    arr = _array(values, "mean_std") * scale
    if arr.size == 1:
        return f"{arr[0]:.{digits}f}"
    return f"{arr.mean():.{digits}f} ± {arr.std(ddof=1):.{digits}f}"


@_styled
def plot_shift(accuracies: dict[str, Sequence[float]], path: str | Path) -> Path:
    """Accuracy against corruption severity, one line per corruption (severity 0: the clean images).

    accuracies: corruption name -> accuracies (fractions) at severities 0, 1, ..., 5.
    """
    _require(accuracies, "plot_shift")
    fig = _figure(width=5.2, height=3.4)
    ax = fig.subplots()
    for name, values in accuracies.items():
        acc = 100 * _array(values, f"accuracies of {name}")
        ax.plot(range(len(acc)), acc, marker="o", markersize=3, label=name)
    ax.set(xlabel="severity (0 = clean)", ylabel="accuracy (%)", title="accuracy under corruption")
    ax.legend(loc="lower left", fontsize="small", ncol=2)
    return _save(fig, path)
