"""The regime map's section of the `reproduce` report: where AS helps, and how much of it is BatchNorm.

Each map cell (model, schedule, initial sigma) has a VI run and AS runs of the same seeds. The
section gives every cell's numbers under both evaluation protocols (BatchNorm running statistics,
as the paper; statistics recalibrated for each sampled network), the gain of AS over VI per cell,
and a plot of that gain against what VI's posterior looked like (the spread of its sampled
accuracies, the width sigma / |mu| of its weights), to find what predicts the gain.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from .. import report

PROTOCOLS = {"running": "running statistics", "recalibrated": "recalibrated per sample"}
MAP_METHOD_ORDER = ("vi", "as", "free")


def _eval(run: dict[str, Any], protocol: str) -> dict[str, Any] | None:
    return run["evals"].get(protocol)


def _pct(values: list[float]) -> str:
    return report.mean_std([100 * v for v in values]) if values else "–"


def _cell_key(run: dict[str, Any]) -> tuple:
    c = run["exp"].columns
    return c["model"], c["schedule"], c["init_sigma"]


def _width(run: dict[str, Any]) -> float:
    """sigma / |mu| over all Bayesian weights, weighted like the per-kind numbers (conv dominates)."""
    width = run["meta"].get("posterior_width", {})
    return float(np.mean(list(width.values()))) if width else float("nan")


def _metric(runs: list[dict], protocol: str, path: tuple[str, ...]) -> list[float]:
    values = []
    for r in runs:
        value: Any = _eval(r, protocol)
        for key in path:
            value = None if value is None else value.get(key)
        if value is not None:
            values.append(float(value))
    return values


def _cell_table(runs: list[dict], protocol: str) -> str:
    rows = []
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        groups[(*_cell_key(r), r["exp"].columns["method"])].append(r)
    order = {m: i for i, m in enumerate(MAP_METHOD_ORDER)}
    for (model, schedule, sigma, method), group in sorted(groups.items(), key=lambda kv: (*kv[0][:3], order[kv[0][3]])):
        widths = defaultdict(list)
        for r in group:
            for kind, w in r["meta"].get("posterior_width", {}).items():
                widths[kind].append(w)
        ood = [v for r in group for v in _ood_auroc(r, protocol)]
        rows.append([
            model, schedule, f"{sigma:g}", group[0]["exp"].columns["label"], len(group),
            _pct(_metric(group, protocol, ("sampled", "lowest"))),
            _pct(_metric(group, protocol, ("sampled", "highest"))),
            _pct(_metric(group, protocol, ("sampled", "mean"))),
            _pct(_metric(group, protocol, ("sampled", "std"))),
            _pct(_metric(group, protocol, ("ensemble", "accuracy"))),
            report.mean_std(_metric(group, protocol, ("ensemble", "nll")), digits=3),
            _pct(_metric(group, protocol, ("ensemble", "ece"))),
            _pct(ood),
            " / ".join(f"{np.mean(widths[k]):.2f}" for k in ("conv", "linear", "batchnorm") if widths[k]),
            f"{np.mean([r['meta']['train_seconds'] for r in group]):.0f}",
        ])
    return report.markdown_table(
        ["model", "schedule", "init σ", "method", "seeds", "lowest", "highest", "mean", "std", "ensemble",
         "ens. NLL", "ECE", "OOD AUROC", "σ/|μ| conv / linear / BN", "train s"], rows)


def _ood_auroc(run: dict[str, Any], protocol: str) -> list[float]:
    result = _eval(run, protocol) or {}
    return [by["total"]["auroc"] for by in result.get("ood", {}).values()]


def gains(runs: list[dict]) -> list[dict[str, Any]]:
    """Per cell and AS variant: the AS - VI differences (in points) under both protocols, with what
    VI's posterior looked like and what AS cost, averaged over the seeds both have."""
    cells: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        cells[_cell_key(r)][r["exp"].columns["method"]].append(r)
    out = []
    for key, by_method in sorted(cells.items()):
        for method in ("as", "free"):
            # compare seed with seed: only the seeds both methods have finished
            seeds = ({r["exp"].columns["seed"] for r in by_method.get("vi", [])}
                     & {r["exp"].columns["seed"] for r in by_method.get(method, [])})
            vi = [r for r in by_method.get("vi", []) if r["exp"].columns["seed"] in seeds]
            adv = [r for r in by_method.get(method, []) if r["exp"].columns["seed"] in seeds]
            if not vi or not adv:
                continue
            row: dict[str, Any] = {"model": key[0], "schedule": key[1], "init_sigma": key[2], "method": method,
                                   "label": adv[0]["exp"].columns["label"], "seeds": len(seeds)}
            for protocol in PROTOCOLS:
                for name, path in (("lowest", ("sampled", "lowest")), ("mean", ("sampled", "mean")),
                                   ("ensemble", ("ensemble", "accuracy"))):
                    a, v = _metric(adv, protocol, path), _metric(vi, protocol, path)
                    row[f"{name}_{protocol}"] = 100 * (np.mean(a) - np.mean(v)) if a and v else float("nan")
                nll_a, nll_v = _metric(adv, protocol, ("ensemble", "nll")), _metric(vi, protocol, ("ensemble", "nll"))
                row[f"nll_{protocol}"] = np.mean(nll_a) - np.mean(nll_v) if nll_a and nll_v else float("nan")
            row["vi_std"] = 100 * float(np.mean(_metric(vi, "running", ("sampled", "std"))))
            row["vi_width"] = float(np.mean([_width(r) for r in vi]))
            row["cost"] = float(np.mean([r["meta"]["train_seconds"] for r in adv])
                                / np.mean([r["meta"]["train_seconds"] for r in vi]))
            out.append(row)
    return out


def passes_per_step(config: dict[str, Any]) -> int:
    """Forward-backward passes of one training step: VI 1, standard AS N + 2, free AS 2."""
    if config["method"] != "as":
        return 1
    return 2 if config.get("as_variant") == "free" else config["as_steps"] + 2


def training_passes(config: dict[str, Any]) -> float:
    """Forward-backward passes a run's training cost: steps x passes per step. Counted in passes,
    the cost holds on any hardware; NaN where the training set size is not in the config."""
    if config.get("train_subset") is None:
        return float("nan")
    steps = config["epochs"] * -(-config["train_subset"] // config["batch_size"])
    return float(steps * passes_per_step(config))


def _equal_compute(runs: list[dict], plots: Path) -> list[str]:
    """Lowest sampled accuracy and ensemble NLL against training cost, per cell, under both protocols."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        groups[(*_cell_key(r), r["exp"].columns["method"])].append(r)
    figures = {"lowest": ("lowest sampled accuracy (%)", ("sampled", "lowest"), 100.0, "map_cost_lowest.png"),
               "nll": ("ensemble NLL (nats)", ("ensemble", "nll"), 1.0, "map_cost_nll.png")}
    lines = ["### Equal compute: quality against training cost", ""]
    for ylabel, path, scale, name in figures.values():
        panels = {}
        for protocol, title in PROTOCOLS.items():
            series: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
            for (model, schedule, sigma, method), group in sorted(groups.items()):
                values = _metric(group, protocol, path)
                cost = training_passes(_eval(group[0], "running")["config"]) if _eval(group[0], "running") else np.nan
                if values and np.isfinite(cost):
                    xs, ys = series[f"{model}, σ0 {sigma:g}"]
                    xs.append(cost)
                    ys.append(scale * float(np.mean(values)))
            if series:
                panels[f"BatchNorm {title}"] = dict(series)
        if panels:
            report.plot_scatter_panels(panels, "training cost (forward-backward passes)", ylabel, plots / name,
                                       connect=True, log_x=True)
            lines += [f"![{ylabel} against cost](plots/{name})", ""]
    lines += ["Each line joins one cell's methods in order of cost: VI (1 pass a step), free AS (2), AS (N + 2 = 7). "
              "Deep ensembles and VI trained longer at the same cost are not in this grid yet.", ""]
    return lines


def map_section(runs: list[dict], plots: Path, note: str) -> list[str]:
    """The report's lines for the regime map (runs: finished map runs with "exp", "meta", "evals")."""
    lines = ["", "## Regime map: where does AS help, and how much of it is BatchNorm?", "", f"Grid: {note}.", ""]
    for protocol, title in PROTOCOLS.items():
        if any(_eval(r, protocol) for r in runs):
            lines += [f"### Every cell, BatchNorm {title}", "", _cell_table(runs, protocol), ""]
    lines += ["Accuracies in %, mean ± std over seeds; std is the spread of the 100 sampled accuracies; OOD AUROC "
              "by total uncertainty; σ/|μ| is mean σ over mean |μ| per kind of weight at the end of training; "
              "train s is the training time on the machine in the Runs table.", ""]
    rows = gains(runs)
    if not rows:
        return lines + ["(no VI / AS pair of the map finished yet)"]
    lines += ["### AS - VI per cell (points; NLL in nats), under both protocols", "", report.markdown_table(
        ["model", "schedule", "init σ", "variant", "seeds", "lowest (running)", "lowest (recal.)",
         "mean (running)", "mean (recal.)", "ensemble (running)", "ensemble (recal.)", "NLL (running)",
         "NLL (recal.)", "VI sampled std", "VI σ/|μ|", "cost vs VI"],
        [[r["model"], r["schedule"], f"{r['init_sigma']:g}", r["label"], r["seeds"],
          f"{r['lowest_running']:+.2f}", f"{r['lowest_recalibrated']:+.2f}",
          f"{r['mean_running']:+.2f}", f"{r['mean_recalibrated']:+.2f}",
          f"{r['ensemble_running']:+.2f}", f"{r['ensemble_recalibrated']:+.2f}",
          f"{r['nll_running']:+.3f}", f"{r['nll_recalibrated']:+.3f}",
          f"{r['vi_std']:.2f}", f"{r['vi_width']:.2f}", f"{r['cost']:.1f}x"] for r in rows]), ""]
    for predictor, xlabel, name in (("vi_std", "std of VI's 100 sampled accuracies (points, running stats)",
                                     "map_gain_vs_vi_spread.png"),
                                    ("vi_width", "VI's posterior width σ/|μ|", "map_gain_vs_vi_width.png")):
        panels = {}
        for protocol, title in PROTOCOLS.items():
            series: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
            for r in rows:
                y = r[f"lowest_{protocol}"]
                if np.isfinite(y) and np.isfinite(r[predictor]):
                    xs, ys = series[f"{r['label']}, {r['model']}"]
                    xs.append(r[predictor])
                    ys.append(y)
            if series:
                panels[f"BatchNorm {title}"] = dict(series)
        if panels:
            report.plot_scatter_panels(panels, xlabel, "AS - VI, lowest sampled accuracy (points)", plots / name,
                                       zero_line=True)
            lines += [f"![gain against {predictor}](plots/{name})", ""]
    return lines + _equal_compute(runs, plots)
