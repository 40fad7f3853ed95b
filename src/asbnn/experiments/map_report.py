"""The regime map's section of the `reproduce` report: where AS helps, and how much of it is BatchNorm.

Each map cell (model, schedule, initial sigma) has a VI run and AS runs of the same seeds. The
section gives every cell's numbers under both evaluation protocols (BatchNorm running statistics,
as the paper; statistics recalibrated for each sampled network), the gain of AS over VI per cell,
and a plot of that gain against what VI's posterior looked like (the spread of its sampled
accuracies, the width sigma / |mu| of its weights), to find what predicts the gain. Where the map
has them, the other ways of spending AS's training cost stand beside the cells: deterministic
networks and their deep ensembles (one set per model and schedule), and VI trained longer.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from .. import report

PROTOCOLS = {"running": "running statistics", "recalibrated": "recalibrated per sample"}
#: a cell's rows, in order
MAP_METHOD_ORDER = ("vi", "as", "free", "asnorm", "as-l0.2", "as-n1", "as-late", "as-quarter", "vi-longer",
                    "deterministic", "ensemble")
# compared with the cell's VI at the same epochs
AS_VARIANTS = ("as", "free", "asnorm", "as-l0.2", "as-n1", "as-late", "as-quarter")
NETWORKS = ("deterministic", "ensemble")  # deterministic networks: no initial sigma, running statistics only


def evaluation_under(run: dict[str, Any], protocol: str) -> dict[str, Any] | None:
    """A run's evaluation under `protocol`. Deterministic networks (and their ensembles) are
    evaluated with running statistics only, recalibration being for the sampled networks of a
    posterior, so their running numbers stand in for both protocols."""
    if run["exp"].columns["method"] in NETWORKS:
        protocol = "running"
    return run["evals"].get(protocol)


def _pct(values: list[float]) -> str:
    return report.mean_std([100 * v for v in values]) if values else "–"


#: Sweep-cell settings that move the posterior's target, with their name in a cell's init σ column
SETTINGS = {"prior_sigma": "prior", "kl_weight": "KL weight"}


def _cell_key(run: dict[str, Any]) -> tuple:
    """(model, schedule, initial sigma, setting); sigma None for deterministic networks, shared by
    every sigma; setting the (name, value) pairs of `SETTINGS` a sweep cell moves from the config's
    (the prior's sigma, the KL weight), () in every other cell."""
    c = run["exp"].columns
    return c["model"], c["schedule"], c["init_sigma"], tuple((k, c[k]) for k in SETTINGS if c.get(k) is not None)


def _sigma_text(sigma: float | None, setting: tuple) -> str:
    """A cell's init σ column: '0.05', or '0.05, prior 1' / '0.05, KL weight 5e-05' where the cell moves it."""
    return "–" if sigma is None else ", ".join([f"{sigma:g}", *(f"{SETTINGS[k]} {v:g}" for k, v in setting)])


def _row_key(run: dict[str, Any]) -> tuple:
    """The cell-table row of a run: its cell, its method, and the ensemble's size or VI's epochs (else 0)."""
    c = run["exp"].columns
    return (*_cell_key(run), c["method"], c.get("members", c.get("epochs", 0)))


def _row_order(key: tuple) -> tuple:
    """Rows by model and schedule, then each sigma's methods (the config's settings first), then the
    model's deterministic networks."""
    model, schedule, sigma, setting, method, size = key
    return model, schedule, sigma is None, sigma or 0.0, setting, MAP_METHOD_ORDER.index(method), size


def _rows(runs: list[dict]) -> list[tuple[tuple, list[dict]]]:
    """Runs grouped by `_row_key`, in table order."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        groups[_row_key(r)].append(r)
    return sorted(groups.items(), key=lambda kv: _row_order(kv[0]))


def _width(run: dict[str, Any]) -> float:
    """sigma / |mu| over all Bayesian weights, weighted like the per-kind numbers (conv dominates)."""
    width = run["meta"].get("posterior_width", {})
    return float(np.mean(list(width.values()))) if width else float("nan")


def _metric(runs: list[dict], protocol: str, path: tuple[str, ...]) -> list[float]:
    values = []
    for r in runs:
        value: Any = evaluation_under(r, protocol)
        for key in path:
            value = None if value is None else value.get(key)
        if value is not None:
            values.append(float(value))
    return values


def _cell_table(runs: list[dict], protocol: str) -> str:
    rows = []
    for (model, schedule, sigma, setting, _, _), group in _rows(runs):
        widths = defaultdict(list)
        for r in group:
            for kind, w in r["meta"].get("posterior_width", {}).items():
                widths[kind].append(w)
        ood = [v for r in group for v in _ood_auroc(r, protocol)]
        rows.append([
            model, schedule, _sigma_text(sigma, setting), group[0]["exp"].columns["label"], len(group),
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
    result = evaluation_under(run, protocol) or {}
    return [by["total"]["auroc"] for by in result.get("ood", {}).values()]


def gains(runs: list[dict]) -> list[dict[str, Any]]:
    """Per cell and AS variant: the AS - VI differences (in points) under both protocols, with what
    VI's posterior looked like and what AS cost, averaged over the seeds both have."""
    cells: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r["exp"].columns["method"] in ("vi", *AS_VARIANTS):  # at the same epochs: VI trained longer is not VI
            cells[_cell_key(r)][r["exp"].columns["method"]].append(r)
    out = []
    for key, by_method in sorted(cells.items(), key=lambda kv: _row_order((*kv[0], "vi", 0))):
        for method in AS_VARIANTS:
            # compare seed with seed: only the seeds both methods have finished
            seeds = ({r["exp"].columns["seed"] for r in by_method.get("vi", [])}
                     & {r["exp"].columns["seed"] for r in by_method.get(method, [])})
            vi = [r for r in by_method.get("vi", []) if r["exp"].columns["seed"] in seeds]
            adv = [r for r in by_method.get(method, []) if r["exp"].columns["seed"] in seeds]
            if not vi or not adv:
                continue
            row: dict[str, Any] = {"model": key[0], "schedule": key[1], "init_sigma": key[2],
                                   "setting": key[3], "method": method,
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
            lowest = {p: _metric(vi, p, ("sampled", "lowest")) for p in PROTOCOLS}
            row["vi_bn_lift"] = (100 * (np.mean(lowest["recalibrated"]) - np.mean(lowest["running"]))
                                 if all(lowest.values()) else float("nan"))
            row["cost"] = float(np.mean([r["meta"]["train_seconds"] for r in adv])
                                / np.mean([r["meta"]["train_seconds"] for r in vi]))
            out.append(row)
    return out


def passes_per_step(config: dict[str, Any]) -> float:
    """Forward-backward passes of one training step: VI 1, standard AS N + 2 (on normalised layers
    only too: the mask changes which noise moves, not the passes; N x fraction + 2 with the search on
    a fraction of the batch), free AS 2."""
    if config["method"] != "as":
        return 1
    if config.get("as_variant") == "free":
        return 2
    return config["as_steps"] * config.get("as_search_fraction", 1.0) + 2


def epoch_passes(config: dict[str, Any]) -> float:
    """A run's training cost in passes over its training set: epochs x passes a step, the epochs
    before `as_first_epoch` (AS only in the last epochs) at VI's one pass."""
    vi_epochs = config.get("as_first_epoch", 1) - 1 if config["method"] == "as" else 0
    return float(vi_epochs + (config["epochs"] - vi_epochs) * passes_per_step(config))


def training_passes(config: dict[str, Any]) -> float:
    """Forward-backward passes a run's training cost: steps x passes per step. Counted in passes,
    the cost holds on any hardware; NaN where the training set size is not in the config."""
    if config.get("train_subset") is None:
        return float("nan")
    return -(-config["train_subset"] // config["batch_size"]) * epoch_passes(config)


def _cost(run: dict[str, Any]) -> float:
    """A run's training cost in forward-backward passes (`training_passes`); a deep ensemble's is
    its members' together, M x one member's. NaN where it has no evaluation to read the config from."""
    result = evaluation_under(run, "running")
    if result is None:
        return float("nan")
    members = len(result["members"]) if result.get("method") == "deep_ensemble" else 1
    return members * training_passes(result["config"])


#: Cost-plot series of their own within a cell: VI trained longer (a dashed line from the cell's VI), and
#: AS on normalised layers and the cheaper AS, points that would make the cell's line double back on itself.
_OWN_SERIES = {"vi-longer": ", VI longer", "asnorm": ", AS normalised layers", "as-l0.2": ", AS λ 0.2",
               "as-n1": ", AS one step", "as-late": ", AS late", "as-quarter": ", AS search on 1/4"}


def _series_label(key: tuple, schedules: set[str]) -> str:
    """The cost-plot line a row belongs to: its cell's (VI, free AS, AS), the cell's VI trained
    longer, the cell's AS on normalised layers, or its model's deep ensembles (one deterministic
    network, then 2..M of them). The schedule is named where the runs have more than one."""
    model, schedule, sigma, setting, method, _ = key
    prefix = f"{model}, {schedule}" if len(schedules) > 1 else model
    if method in NETWORKS:
        return f"{prefix}, deep ensemble"
    return f"{prefix}, σ0 {_sigma_text(sigma, setting)}" + _OWN_SERIES.get(method, "")


def cost_series(runs: list[dict], protocol: str, path: tuple[str, ...],
                scale: float) -> dict[str, tuple[list[float], list[float]]]:
    """One panel of an equal-compute plot: per line (`_series_label`), the training cost (`_cost`)
    and the mean over seeds of the metric at `path` (x `scale`) of each of its rows. A VI-longer
    line starts at its cell's VI, the same recipe at the base epochs; the deterministic point is
    the mean over all members."""
    series: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    vi_points: dict[str, tuple[float, float]] = {}
    schedules = {_cell_key(r)[1] for r in runs}
    for key, group in _rows(runs):
        values, cost = _metric(group, protocol, path), _cost(group[0])
        if not values or not np.isfinite(cost):
            continue
        point = (cost, scale * float(np.mean(values)))
        label = _series_label(key, schedules)
        if key[4] == "vi":
            vi_points[f"{label}, VI longer"] = point
        series[label][0].append(point[0])
        series[label][1].append(point[1])
    for label, (xs, ys) in series.items():
        if label in vi_points:
            xs.insert(0, vi_points[label][0])
            ys.insert(0, vi_points[label][1])
    return dict(series)


def _equal_compute(runs: list[dict], plots: Path) -> list[str]:
    """Lowest sampled accuracy and ensemble NLL against training cost, per cell, under both
    protocols, with the map's other ways of spending that cost where it has them. Where some cells
    have VI trained longer, only those cells are drawn (and the deep ensembles): a cell without an
    equal-compute arm (a sweep cell) adds a line with nothing to compare it with at higher cost."""
    with_arms = {_cell_key(r) for r in runs if r["exp"].columns["method"] == "vi-longer"}
    left_out = bool(with_arms) and any(_cell_key(r) not in with_arms for r in runs
                                       if r["exp"].columns["method"] not in NETWORKS)
    if with_arms:
        runs = [r for r in runs if r["exp"].columns["method"] in NETWORKS or _cell_key(r) in with_arms]
    figures = {"lowest": ("lowest sampled accuracy (%)", ("sampled", "lowest"), 100.0, "map_cost_lowest.png"),
               "nll": ("ensemble NLL (nats)", ("ensemble", "nll"), 1.0, "map_cost_nll.png")}
    lines = ["### Equal compute: quality against training cost", ""]
    for ylabel, path, scale, name in figures.values():
        panels = {f"BatchNorm {title}": series for protocol, title in PROTOCOLS.items()
                  if (series := cost_series(runs, protocol, path, scale))}
        if panels:
            companions = {label: label.removesuffix(", VI longer") for series in panels.values() for label in series
                          if label.endswith(", VI longer")}
            report.plot_scatter_panels(panels, "training cost (forward-backward passes)", ylabel, plots / name,
                                       connect=True, log_x=True, companions=companions)
            lines += [f"![{ylabel} against cost](plots/{name})", ""]
    note = (" Cells without VI trained longer beside them (the sweep cells) are not drawn; their numbers are "
            "in the tables above." if left_out else "")
    return lines + [_equal_compute_legend(runs) + note, ""]


def _equal_compute_legend(runs: list[dict]) -> str:
    """What each line of the equal-compute plots is, naming only the arms that have finished runs."""
    columns = [r["exp"].columns for r in runs]
    text = ("Each solid line joins one cell's methods in order of cost: VI (1 pass a step), free AS (2), "
            "AS (N + 2 = 7).")
    base = {evaluation_under(r, "running")["config"]["epochs"] for r in runs
            if r["exp"].columns["method"] == "vi" and evaluation_under(r, "running")}
    longer = sorted({c["epochs"] for c in columns if c["method"] == "vi-longer"})
    if longer:
        ratios = f" ({', '.join(f'{e / min(base):g}x' for e in longer)} VI's passes)" if len(base) == 1 else ""
        text += (" The dashed line of the same colour is that cell's VI trained longer, from its VI on to "
                 f"{', '.join(map(str, longer))} epochs{ratios}.")
    sizes = sorted({c["members"] for c in columns if c["method"] == "ensemble"})
    if sizes or any(c["method"] == "deterministic" for c in columns):
        text += (" Each model's deep-ensemble line (one per model, shared by its cells: a deterministic network "
                 "has no initial sigma) starts at one deterministic network of the base recipe (mean over the "
                 f"members) and goes on to ensembles of {', '.join(map(str, sizes)) or 'no'} members, at M x a "
                 "member's passes (1 pass a step); its lowest sampled accuracy is the ensemble's weakest member. "
                 "Deterministic networks are evaluated with BatchNorm running statistics only: the recalibrated "
                 "panels repeat their running numbers.")
    if not longer and not sizes:
        text += " Deep ensembles and VI trained longer at the same cost have no finished runs here."
    if any(c["method"] == "asnorm" for c in columns):
        text += (" AS with its sign steps on normalised layers only costs what AS does (N + 2 passes a step): "
                 "one point per cell, in a colour of its own.")
    if any(c["method"] == "as-l0.2" for c in columns):
        text += " AS with lambda 0.2 costs what AS does: one point per cell, in a colour of its own."
    if any(c["method"] in ("as-n1", "as-late", "as-quarter") for c in columns):
        text += (" The cheaper AS (one larger sign step: 3 passes a step; AS only in the last epochs: VI's pass "
                 "before them; the search on a quarter of each batch: 5 x 1/4 + 2 = 3.25 passes) are one point "
                 "each, in colours of their own.")
    return text


def _arm_rows_note(runs: list[dict]) -> str:
    """What the rows of the equal-compute arms mean, for those that have finished runs."""
    methods = {r["exp"].columns["method"] for r in runs}
    text = ""
    if methods & set(NETWORKS):
        text += (" *deterministic*: one network of the base recipe per seed (seeds counts networks), the members "
                 "of the deep ensembles; one set per model and schedule (no init σ). *deep ensemble (M)*: its first "
                 "M networks; lowest / highest / mean / std over the M members, train s theirs together. Both are "
                 "evaluated with running statistics only; the recalibrated table repeats those numbers.")
    if "vi-longer" in methods:
        text += " *VI, E epochs*: the cell's VI trained E epochs, lr milestones scaled to them."
    if "asnorm" in methods:
        text += (" *AS, normalised layers*: AS whose sign steps move only the noise of BatchNorm layers and of the "
                 "conv / linear layers feeding straight into one (`as_layers: normalised`), N + 2 passes a step.")
    if "as-l0.2" in methods:
        text += (" *AS, lambda 0.2*: AS with 20 % of the loss on the adversarial sample and 80 % on the ordinary one "
                 "(the paper's lambda 0.8 the other way round), N + 2 passes a step.")
    if "as-n1" in methods:
        text += (" *AS, one step of 0.1*: the search in one sign step of alpha = 0.1 (N x alpha as the paper's "
                 "5 x 0.02), 3 passes a step.")
    if "as-late" in methods:
        text += " *AS from epoch E*: plain VI before epoch E, AS from it on (`as_first_epoch`)."
    if "as-quarter" in methods:
        text += (" *AS, search on 1/4 of the batch*: the N = 5 sign steps on the first quarter of each shuffled batch, "
                 "L_adv and L_p on all of it (`as_search_fraction: 0.25`), 5 x 1/4 + 2 = 3.25 passes a step.")
    return text


def map_section(runs: list[dict], plots: Path, note: str) -> list[str]:
    """The report's lines for the regime map (runs: finished map runs with "exp", "meta", "evals")."""
    lines = ["", "## Regime map: where does AS help, and how much of it is BatchNorm?", "", f"Grid: {note}.", ""]
    for protocol, title in PROTOCOLS.items():
        if any(evaluation_under(r, protocol) for r in runs):
            lines += [f"### Every cell, BatchNorm {title}", "", _cell_table(runs, protocol), ""]
    lines += ["Accuracies in %, mean ± std over seeds; std is the spread of the 100 sampled accuracies; OOD AUROC "
              "by total uncertainty; σ/|μ| is mean σ over mean |μ| per kind of weight at the end of training; "
              "train s is the training time on the machine in the Runs table." + _arm_rows_note(runs), ""]
    rows = gains(runs)
    if not rows:
        return lines + ["(no VI / AS pair of the map finished yet)"]
    lines += ["### AS - VI per cell (points; NLL in nats), under both protocols", "", report.markdown_table(
        ["model", "schedule", "init σ", "variant", "seeds", "lowest (running)", "lowest (recal.)",
         "mean (running)", "mean (recal.)", "ensemble (running)", "ensemble (recal.)", "NLL (running)",
         "NLL (recal.)", "VI sampled std", "VI σ/|μ|", "cost vs VI"],
        [[r["model"], r["schedule"], _sigma_text(r["init_sigma"], r["setting"]), r["label"], r["seeds"],
          f"{r['lowest_running']:+.2f}", f"{r['lowest_recalibrated']:+.2f}",
          f"{r['mean_running']:+.2f}", f"{r['mean_recalibrated']:+.2f}",
          f"{r['ensemble_running']:+.2f}", f"{r['ensemble_recalibrated']:+.2f}",
          f"{r['nll_running']:+.3f}", f"{r['nll_recalibrated']:+.3f}",
          f"{r['vi_std']:.2f}", f"{r['vi_width']:.2f}", f"{r['cost']:.1f}x"] for r in rows]), ""]
    for predictor, (xlabel, name) in PREDICTORS.items():
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
    return lines + _predictor_table(rows) + _equal_compute(runs, plots)


#: What VI's posterior looked like, as candidates for predicting AS's gain: (axis label, plot file).
PREDICTORS = {
    "vi_std": ("std of VI's sampled accuracies (points)", "map_gain_vs_vi_spread.png"),
    "vi_width": ("VI's posterior width σ/|μ|", "map_gain_vs_vi_width.png"),
    "vi_bn_lift": ("VI's lowest, recalibrated - running (points)", "map_gain_vs_vi_bn_lift.png"),
}


def rank_correlation(xs: list[float], ys: list[float]) -> float:
    """Spearman's rho: the correlation of the ranks (ties ranked by order; NaN below 3 points)."""
    if len(xs) < 3:
        return float("nan")
    ranks = [np.argsort(np.argsort(v, kind="stable"), kind="stable").astype(float) for v in (xs, ys)]
    return float(np.corrcoef(*ranks)[0, 1])


def _predictor_table(rows: list[dict[str, Any]]) -> list[str]:
    """How well each candidate orders the gains of each AS variant over the cells: rank correlation of
    predictor and the AS - VI lowest sampled accuracy, under both protocols (variants in 3+ cells)."""
    table = []
    for label in dict.fromkeys(r["label"] for r in rows):
        mine = [r for r in rows if r["label"] == label]
        if len(mine) < 3:
            continue
        cells = []
        for predictor in PREDICTORS:
            for protocol in PROTOCOLS:
                pairs = [(r[predictor], r[f"lowest_{protocol}"]) for r in mine
                         if np.isfinite(r[predictor]) and np.isfinite(r[f"lowest_{protocol}"])]
                rho = rank_correlation(*map(list, zip(*pairs))) if len(pairs) >= 3 else float("nan")
                cells.append("–" if not np.isfinite(rho) else f"{rho:+.2f}")
        table.append([label, len(mine), *cells])
    if not table:
        return []
    header = ["variant", "cells"] + [f"{name} / {'running' if p == 'running' else 'recal.'} gain"
                                     for name in ("VI std", "VI σ/|μ|", "recal. lift") for p in PROTOCOLS]
    return ["### What predicts the gain: rank correlation with AS - VI in the lowest sampled accuracy", "",
            report.markdown_table(header, table), "",
            "Spearman's rho over the cells of each variant between a predictor and the gain under either protocol "
            "(+1: the larger the predictor, the larger the gain). "
            "VI std: the spread of VI's 100 sampled accuracies under running statistics; VI σ/|μ|: its posterior "
            "width; recal. lift: how much per-sample recalibration raises VI's lowest sampled accuracy, the part of "
            "its spread that is BatchNorm statistics.", ""]
