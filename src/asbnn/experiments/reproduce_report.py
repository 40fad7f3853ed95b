"""The `reproduce` report: our tables beside the paper's numbers, the plots, and how each run was made.

It reads the finished runs `reproduce` hands it; a run's columns say where it goes: `variant` (a
`reproduce.Variant`: method, BatchNorm policy, initialisation), `lambda`, `cheap`, `seed`, ...
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .. import report
from ..fileio import atomic_write_text, read_jsonl
from ..runfolder import LOG
from .map_report import NETWORKS, PROTOCOLS, epoch_passes, evaluation_under, map_section

PAPER_CSV = Path(__file__).parent / "paper_results.csv"
PAPER_NAMES = {"CIFAR-10": "cifar10", "CIFAR-100": "cifar100", "ResNet20": "resnet20", "ResNet56": "resnet56",
               "VGG16": "vgg16_bn"}
METRICS = ("lowest", "highest", "ensemble")
RETAIN = ("retain20", "retain40", "retain60", "retain80")


class Planned(Protocol):
    """What the report reads of a planned experiment."""

    columns: dict[str, Any]
    tables: set[str]
    key: str
    init_from: Any  # the Planned it starts from, or None


def paper_numbers() -> dict[tuple, tuple[float, float]]:
    """(table, dataset, model, method, metric) -> (mean, std) from the paper, method 'vi' or 'as'."""
    out = {}
    with open(PAPER_CSV) as f:
        for row in csv.DictReader(f):
            method = "as" if row["method"] == "VI+AS" else "vi"
            key = (row["table"], PAPER_NAMES[row["dataset"]], PAPER_NAMES[row["model"]], method, row["metric"])
            out[key] = (float(row["mean"]), float(row["std"]))
    return out


def _load(finished: list[tuple[Planned, Path]]) -> list[dict[str, Any]]:
    """The finished runs (experiment, folder) with their evaluations (one per BatchNorm protocol) and log."""
    runs = []
    for exp, folder in finished:
        evals = {protocol: json.loads((folder / "run" / sub / "eval.json").read_text())
                 for protocol, sub in (("running", "eval"), ("recalibrated", "eval-recalibrated"))
                 if (folder / "run" / sub / "eval.json").is_file()}
        runs.append({
            "exp": exp, "meta": json.loads((folder / "done.json").read_text()),
            "eval": evals["running"], "evals": evals, "log": read_jsonl(folder / "run" / LOG),
        })
    return runs


def _values(runs: list[dict], metric: str) -> list[float]:
    if metric == "ensemble":
        return [100 * r["eval"]["ensemble"]["accuracy"] for r in runs]
    if metric.startswith("retain"):
        coverage = str(int(metric.removeprefix("retain")) / 100)  # retain20 -> "0.2"
        return [100 * r["eval"]["selective"]["total"][coverage] for r in runs]
    return [100 * r["eval"]["sampled"][metric] for r in runs]


def _group(runs: list[dict], *keys: str) -> list[tuple[tuple, list[dict]]]:
    """Runs grouped by the values of columns `keys`, in the order of those values (variants by label)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        groups[tuple(r["exp"].columns[k] for k in keys)].append(r)
    return sorted(groups.items(), key=lambda kv: tuple(getattr(v, "label", v) for v in kv[0]))


def _paper_method(variant: Any) -> str:
    """The paper's row a variant sits beside: its VI or AS; free AS is not in the paper."""
    return "free AS" if variant.free else variant.method


def _paper_cell(paper: dict, table: str, dataset: str, model: str, method: str, metric: str) -> str:
    value = paper.get((table, dataset, model, method, metric))
    return f"{value[0]:.2f} ± {value[1]:.2f}" if value else "–"


def _accuracy_table(runs: list[dict], table: str, paper: dict, metrics: tuple[str, ...]) -> str:
    rows = []
    for (dataset, model, variant), group in _group(runs, "dataset", "model", "variant"):
        row: list[Any] = [dataset, model, variant.label, len(group)]
        for metric in metrics:
            row.append(report.mean_std(_values(group, metric)))
            row.append(_paper_cell(paper, table, dataset, model, _paper_method(variant), metric))
        rows.append(row)
    headers = ["data", "model", "variant", "seeds"]
    for metric in metrics:
        headers += [f"{metric} (ours)", f"{metric} (paper)"]
    return report.markdown_table(headers, rows)


def _gain_table(runs: list[dict], table: str, paper: dict, metrics: tuple[str, ...]) -> str:
    """AS minus VI at the same init, ours beside the paper's mean gain over its rows."""
    paper_gain = {}
    for metric in metrics:
        gains = [paper[k][0] - paper[(k[0], k[1], k[2], "vi", k[4])][0]
                 for k in paper if k[0] == table and k[3] == "as" and k[4] == metric]
        paper_gain[metric] = float(np.mean(gains)) if gains else float("nan")
    rows = []
    for (dataset, model), group in _group(runs, "dataset", "model"):
        by_variant = dict(_group(group, "variant"))
        for (variant,), as_runs in by_variant.items():
            if variant.method != "as":
                continue
            vi = dataclasses.replace(variant, method="vi", bn_policy="freeze", free=False)
            vi_runs = by_variant.get((vi,), [])
            if not vi_runs:
                continue
            row: list[Any] = [dataset, model, variant.label]
            for metric in metrics:
                ours = np.mean(_values(as_runs, metric)) - np.mean(_values(vi_runs, metric))
                row += [f"{ours:+.2f}", "–" if variant.free else f"{paper_gain[metric]:+.2f}"]
            rows.append(row)
    headers = ["data", "model", "AS variant (vs VI, same init)"]
    for metric in metrics:
        headers += [f"{metric} gain (ours)", f"{metric} gain (paper, mean)"]
    return report.markdown_table(headers, rows) if rows else "(no VI / AS pair finished yet)"


def _stability(log: list[dict], key: str) -> float:
    """Std (in %) of the per-epoch test accuracy over the second half of training."""
    values = [100 * r[key] for r in log if key in r]
    tail = values[len(values) // 2:]
    return float(np.std(tail)) if len(tail) > 1 else float("nan")


def _train_seconds(runs: list[dict]) -> float:
    return float(np.mean([r["meta"]["train_seconds"] for r in runs]))


def _protocol_table(runs: list[dict]) -> str:
    """Per variant and BatchNorm protocol: the sampled-model spread, NLL, ECE and OOD AUROC."""
    rows = []
    for (variant,), group in _group(runs, "variant"):
        for protocol in ("running", "recalibrated"):
            evals = [r["evals"][protocol] for r in group if protocol in r["evals"]]
            if not evals:
                continue
            ood = [by["total"]["auroc"] for e in evals for by in e.get("ood", {}).values()]
            rows.append([variant.label, protocol, len(evals),
                         report.mean_std([100 * e["sampled"]["lowest"] for e in evals]),
                         report.mean_std([100 * e["sampled"]["highest"] for e in evals]),
                         report.mean_std([100 * e["sampled"]["std"] for e in evals]),
                         report.mean_std([100 * e["ensemble"]["accuracy"] for e in evals]),
                         report.mean_std([e["ensemble"]["nll"] for e in evals], digits=3),
                         report.mean_std([100 * e["ensemble"]["ece"] for e in evals]),
                         report.mean_std([100 * v for v in ood]) if ood else "–"])
    return report.markdown_table(["variant", "BatchNorm statistics", "seeds", "lowest", "highest", "std",
                                  "ensemble", "ens. NLL", "ECE", "OOD AUROC"], rows)


def _protocols_section(runs: list[dict]) -> list[str]:
    """The report's lines for `_protocol_table`, where any of `runs` was evaluated recalibrated too."""
    if not any("recalibrated" in r["evals"] for r in runs):
        return []
    return ["", "### Both BatchNorm protocols, with calibration and OOD detection", "", _protocol_table(runs)]


FINETUNE_LABELS = {"vi": "VI", "free": "free AS", "as": "AS"}


def _finetune_cost(run: dict[str, Any]) -> float:
    """A fine-tune's training cost in passes over the training set (epochs x forward-backward passes a
    step; VI 1, free AS 2, AS N + 2): hardware-independent, and the pretraining every fine-tune shares
    left out. The deterministic start costs 0 beyond that, a deep ensemble its other members' training."""
    if run["exp"].columns["method"] in NETWORKS:
        return (run["exp"].columns.get("members", 1) - 1) * epoch_passes(run["eval"]["config"])
    return epoch_passes(run["eval"]["config"])


def _finetune_label(run: dict[str, Any]) -> str:
    columns = run["exp"].columns
    method = columns["method"]
    if method == "deterministic":
        return "deterministic start"
    if method == "ensemble":
        return f"deep ensemble ({columns['members']})"
    if method == "vi-longer":
        return f"VI, {columns['epochs']} epochs"
    return f"{FINETUNE_LABELS[method]}, {run['eval']['config']['epochs']} epochs"


def _equal_compute_finetune(runs: list[dict], plots: Path) -> list[str]:
    """Table 2's fine-tunes against their training cost: VI, free AS and AS at the scale's epochs,
    VI fine-tuned as many epochs as AS's variants cost (`Scale.finetune_longer_epochs`), and the
    deterministic start with its deep ensembles (`Scale.pretrain_members`), with the lowest sampled
    accuracy and the ensemble's accuracy and NLL under each BatchNorm protocol."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        groups[_finetune_label(r)].append(r)
    ordered = sorted(groups.items(), key=lambda kv: (_finetune_cost(kv[1][0]), kv[0]))
    protocols = [p for p in PROTOCOLS if any(p in r["evals"] for r in runs)]
    # the shared start's training is left out of every row, a deep ensemble's members' included
    start_seconds = next((r["meta"]["train_seconds"] for r in runs if r["exp"].columns["method"] == "deterministic"),
                         0.0)
    rows = []
    for label, group in ordered:
        row: list[Any] = [label, len(group), f"{_finetune_cost(group[0]):g}"]
        for protocol in protocols:
            evals = [e for e in (evaluation_under(r, protocol) for r in group) if e is not None]
            ood = [by["total"]["auroc"] for e in evals for by in e.get("ood", {}).values()]
            row += [report.mean_std([100 * e["sampled"]["lowest"] for e in evals]),
                    report.mean_std([100 * e["ensemble"]["accuracy"] for e in evals]),
                    report.mean_std([e["ensemble"]["nll"] for e in evals], digits=3),
                    report.mean_std([100 * a for a in ood]) if ood else "–"]
        beyond = start_seconds if group[0]["exp"].columns["method"] in NETWORKS else 0.0
        row.append(f"{_train_seconds(group) - beyond:.0f}")
        rows.append(row)
    headers = ["fine-tune", "seeds", "cost (passes over the data)"]
    for protocol in protocols:
        short = "running" if protocol == "running" else "recal."
        headers += [f"lowest ({short})", f"ensemble ({short})", f"NLL ({short})", f"OOD AUROC ({short})"]
    lines = ["", "### Equal compute: the fine-tunes against their training cost", "",
             report.markdown_table([*headers, "train s"], rows), "",
             "Cost: epochs x forward-backward passes a step (VI 1, free AS 2, AS N + 2), in passes over the "
             "training set, and train s, the training time on the machine in the Runs table: the deterministic "
             "pretraining all fine-tunes share is left out of both. VI fine-tuned longer has seed 0 only; the other "
             "rows are means over their seeds."]
    if any(r["exp"].columns["method"] in NETWORKS for r in runs):
        lines[-1] += (" The deterministic start and its deep ensembles (deterministic networks of the same "
                      "recipe and other seeds; a deep ensemble costs its other members' training) are evaluated "
                      "once, with their own BatchNorm statistics, and stand under both protocols; their lowest "
                      "is the weakest member; the start alone has no OOD evaluation.")
    for name, ylabel, metric in (("finetune_cost_lowest.png", "lowest sampled accuracy (%)", ("sampled", "lowest")),
                                 ("finetune_cost_nll.png", "ensemble NLL (nats)", ("ensemble", "nll"))):
        panels = {}
        for protocol in protocols:
            methods: tuple[list[float], list[float]] = ([], [])
            longer: tuple[list[float], list[float]] = ([], [])
            ensembles: tuple[list[float], list[float]] = ([], [])
            for label, group in ordered:
                values = [e[metric[0]][metric[1]] for e in (evaluation_under(r, protocol) for r in group)
                          if e is not None]
                if not values:
                    continue
                # VI at the scale's epochs starts both lines: VI, free AS, AS and VI trained longer
                on_lines = {"vi": [methods, longer], "vi-longer": [longer], "deterministic": [ensembles],
                            "ensemble": [ensembles]}.get(group[0]["exp"].columns["method"], [methods])
                for xs, ys in on_lines:
                    xs.append(_finetune_cost(group[0]))
                    ys.append((100.0 if metric[0] == "sampled" else 1.0) * float(np.mean(values)))
            series = {"VI, free AS, AS": methods, "VI trained longer": longer}
            if ensembles[0]:
                series["deterministic, deep ensembles"] = ensembles
            panels[f"BatchNorm {PROTOCOLS[protocol]}"] = series
        if panels:
            report.plot_scatter_panels(panels, "training cost (passes over the training set)", ylabel, plots / name,
                                       connect=True, companions={"VI trained longer": "VI, free AS, AS"})
            lines += ["", f"![{ylabel} against cost](plots/{name})"]
    return lines


def _eval_seconds(meta: dict[str, Any]) -> str:
    """Evaluation time: one number, or one per BatchNorm protocol."""
    seconds = meta["eval_seconds"]
    if isinstance(seconds, dict):
        return " + ".join(f"{v:.0f}" for v in seconds.values())
    return f"{seconds:.0f}"


def _mean_std(values: list[float]) -> str:
    finite = [v for v in values if np.isfinite(v)]
    return report.mean_std(finite) if finite else "–"


def write_report(out: Path, wanted: set[str], scale: str, notes: dict[str, str], code: str,
                 finished: list[tuple[Planned, Path]], planned: int, seeds: int | None = None) -> Path:
    """OUT/report.md (and OUT/plots) from the `finished` runs of the `planned` ones, for tables `wanted`.

    `notes` describe the scale: "paper" for the paper's tables, "map" for the regime map."""
    paper = paper_numbers()
    runs = _load(finished)
    plots = out / "plots"
    machines = sorted({r["meta"]["machine"] for r in runs})
    paper_tables = wanted != {"map"}
    # the initial sigma of the "init ours" variants: 0.05, but where a scale sets its own (mid-narrow)
    ours = sorted({r["eval"]["config"]["init_sigma"] for r in runs
                   if getattr(r["exp"].columns.get("variant"), "init", None) == "ours"}) or [0.05]
    lines = [
        f"# Adversarial Sampling, reproduced at the `{scale}` scale",
        "",
        f"Scale: {notes['paper'] if paper_tables else notes['map']}. Made by `asbnn reproduce "
        f"{' '.join(sorted(wanted))} --scale {scale}{f' --seeds {seeds}' if seeds else ''} --out {out}` "
        f"(report code {code}), last written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"on: {'; '.join(machines) or 'nothing finished yet'}.",
        f"{len(runs)} of {planned} runs finished. Accuracies in %, mean ± std over seeds"
        + ("; 'paper' columns are the paper's numbers where its data set and model match ours, '–' where not."
           if paper_tables else "."),
        "",
        "Everything not named follows the paper's recipe (Adam lr 0.01, batch 100, N = 5, alpha = 0.02, "
        "lambda = 0.8, prior sigma 0.15, KL weight 1 / (100 N_train)); AS keeps BatchNorm running statistics "
        "out of the N + 1 adversarial passes (BN freeze)"
        + (f". Variants: *init ours* starts sigma at {' / '.join(f'{v:g}' for v in ours)}, *init authors* at "
           "exp(0.15) = 1.16 as the authors' code; *BN update* lets every adversarial pass update the running "
           "statistics, as the authors' code."
           if paper_tables else "."),
    ]
    t1 = [r for r in runs if "table1" in r["exp"].tables]
    if wanted & {"table1"} and t1:
        lines += ["", "## Table 1: trained from scratch, 100 sampled models", "",
                  _accuracy_table(t1, "1", paper, METRICS), "",
                  "### The gain of AS over VI, ours beside the paper's", "", _gain_table(t1, "1", paper, METRICS)]
        lines += _protocols_section(t1)
    t2 = [r for r in runs if "table2" in r["exp"].tables]
    if "table2" in wanted and t2:
        start_keys = {r["exp"].init_from.key for r in t2}
        dets = [r for r in runs if "table2-det" in r["exp"].tables and r["exp"].key in start_keys]
        whole_dets = [r for r in runs if "table2-det-all-test" in r["exp"].tables]
        whole_text = (f"; on the whole test set ({whole_dets[0]['eval']['num_inputs']:,} images) "
                      f"{report.mean_std(_values(whole_dets, 'ensemble'))} %" if whole_dets else "")
        lines += ["", "## Table 2: Bayesian fine-tune from a deterministic network", "",
                  _accuracy_table(t2, "2", paper, METRICS), "",
                  f"Deterministic starting points: {report.mean_std(_values(dets, 'ensemble'))} % test accuracy"
                  f"{whole_text}.", "", _gain_table(t2, "2", paper, METRICS)]
        lines += _protocols_section(t2)
        whole = [r for r in runs if "table2-all-test" in r["exp"].tables]
        if whole:
            images = sorted({r["eval"]["num_inputs"] for r in whole})
            lines += ["", f"### The same fine-tunes on the whole test set ({', '.join(f'{n:,}' for n in images)} "
                      "images)", "", _accuracy_table(whole, "2", paper, METRICS), "", _protocol_table(whole), "",
                      "The networks above, evaluated again (the same 100 sampled networks and, recalibrated, the same "
                      "training images) on every test image; no OOD set here (OOD AUROC is above's)."]
        longer = [r for r in runs if "table2-cost" in r["exp"].tables]
        if longer:
            has_ensembles = any(r["exp"].columns["method"] == "ensemble" for r in longer)
            lines += _equal_compute_finetune(t2 + longer + (dets if has_ensembles else []), plots)
    if "table3" in wanted and t1:
        lines += ["", "## Table 3: selective prediction (ensemble accuracy on the inputs of lowest total uncertainty)",
                  "", _accuracy_table(t1, "3", paper, RETAIN)]
    lam_runs = [r for r in runs if "lambda" in r["exp"].tables]
    if "lambda" in wanted and lam_runs:
        lams = sorted({r["exp"].columns["lambda"] for r in lam_runs})
        series = {m: ([float(np.mean(_values([r for r in lam_runs if r["exp"].columns["lambda"] == lam], m)))
                       for lam in lams],
                      [float(np.std(_values([r for r in lam_runs if r["exp"].columns["lambda"] == lam], m)))
                       for lam in lams]) for m in METRICS}
        report.plot_lambda_sweep(lams, series, plots / "lambda.png")
        rows = [[f"{lam:g}", len([r for r in lam_runs if r["exp"].columns["lambda"] == lam])]
                + [report.mean_std(_values([r for r in lam_runs if r["exp"].columns["lambda"] == lam], m))
                   for m in METRICS] for lam in lams]
        lines += ["", "## Lambda sweep (VI + AS, init ours, BN freeze; lambda 0 is plain VI)", "",
                  report.markdown_table(["lambda", "seeds", *METRICS], rows), "", "![lambda](plots/lambda.png)"]
    if "curves" in wanted and t1:
        lines += ["", "## Training curves and the spread of sampled models", ""]
        first = {r["exp"].columns["variant"].label: r for r in sorted(t1, key=lambda r: -r["exp"].columns["seed"])}
        report.plot_training_curves({v: r["log"] for v, r in sorted(first.items())}, plots / "curves.png")
        report.plot_sample_accuracies({v: [100 * a for a in r["eval"]["per_sample_accuracy"]]
                                       for v, r in sorted(first.items())}, plots / "sample_accuracies.png")
        rows = []
        for (variant,), group in _group(t1, "variant"):
            rows.append([variant.label, _mean_std([_stability(r["log"], "test_acc") for r in group]),
                         _mean_std([_stability(r["log"], "test_acc_sample") for r in group]),
                         report.mean_std([100 * r["eval"]["sampled"]["std"] for r in group])])
        lines += [report.markdown_table(
            ["variant", "std of test acc (mean), 2nd half of epochs", "std of test acc (one sample), 2nd half",
             "std of the 100 sampled accuracies"], rows),
            "", "Curves and histograms show seed 0 of each variant.", "",
            "![curves](plots/curves.png)", "", "![histograms](plots/sample_accuracies.png)"]
    cheap = [r for r in runs if "cheap" in r["exp"].tables]
    if "cheap" in wanted and cheap:
        rows = []
        for (label,), group in sorted(_group(cheap, "cheap"), key=lambda kv: _train_seconds(kv[1])):
            rows.append([label, len(group), f"{_train_seconds(group):.0f}"]
                        + [report.mean_std(_values(group, m)) for m in METRICS])
        lines += ["", "## Cheaper AS: free AS (2 passes per step) against standard AS (N + 2)", "",
                  report.markdown_table(["variant", "seeds", "train s (mean)", *METRICS], rows), "",
                  "Rows are sorted by training time; compare rows of similar time for the equal-wall-clock view."]
    map_runs = [r for r in runs if "map" in r["exp"].tables]
    if "map" in wanted and map_runs:
        lines += map_section(map_runs, plots, notes["map"])
    lines += ["", "## Runs", "", "Code: the fingerprint of the result-deciding modules that made each run.", "",
              report.markdown_table(
        ["run", "machine", "code", "train s", "eval s", "re-run alone"],
        [[r["meta"]["name"], r["meta"]["machine"], r["meta"].get("code", "–"), f"{r['meta']['train_seconds']:.0f}",
          _eval_seconds(r["meta"]), f"`{r['meta']['command']}`"] for r in runs])]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
