"""Does the damage of AS's search on VI's trained posterior order the cells of the regime map by AS's gain?

Reads the output of `as_search_probe.py` on the map's VI runs (one line a run) and the published
evaluations of the map (docs/results/map/runs), and prints per cell the mean accuracy a regular draw
loses to the adversarial one (VI's posterior, end of training) beside the mean AS - VI gain on the
lowest sampled network (both protocols) and the ensemble (recalibrated), then Spearman's rho over the
cells. A cell is a run name without its method, seed and key.

    python benchmarks/as_search_vs_gain.py PROBE_OUTPUT [--map docs/results/map]
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from asbnn.experiments.map_report import rank_correlation

RUN = re.compile(r"^(?P<cell>.+)-(?P<method>vi|as|free)-s(?P<seed>\d+)-[0-9a-f]{12}$")


def drops(probe_output: Path) -> dict[str, list[float]]:
    """Per cell, each VI run's accuracy at a regular draw minus at the adversarial one (points)."""
    out: dict[str, list[float]] = defaultdict(list)
    for line in probe_output.read_text().splitlines()[1:]:
        cells = [c.strip() for c in line.split("|")]
        match = RUN.match(cells[0])
        if match and match["method"] == "vi":
            _, regular, adversarial = (float(v) for v in cells[5].split("/"))
            out[match["cell"]].append(regular - adversarial)
    return out


def gains(map_dir: Path) -> dict[str, dict[str, float]]:
    """Per cell, the mean over shared seeds of AS - VI: lowest (running, recalibrated), ensemble (recalibrated)."""
    evals: dict[tuple[str, str, str], dict[str, dict]] = {}
    for run in (map_dir / "runs").iterdir():
        match = RUN.match(run.name)
        if match is None or not (run / "run" / "eval-recalibrated" / "eval.json").is_file():
            continue
        evals[(match["cell"], match["method"], match["seed"])] = {
            p: json.loads((run / "run" / folder / "eval.json").read_text())
            for p, folder in (("running", "eval"), ("recalibrated", "eval-recalibrated"))}
    per_cell: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (cell, method, seed), as_eval in evals.items():
        vi_eval = evals.get((cell, "vi", seed))
        if method != "as" or vi_eval is None:
            continue
        for protocol in ("running", "recalibrated"):
            per_cell[cell][f"lowest {protocol}"].append(
                100 * (as_eval[protocol]["sampled"]["lowest"] - vi_eval[protocol]["sampled"]["lowest"]))
        per_cell[cell]["ensemble recalibrated"].append(
            100 * (as_eval["recalibrated"]["ensemble"]["accuracy"] - vi_eval["recalibrated"]["ensemble"]["accuracy"]))
    return {cell: {k: float(np.mean(v)) for k, v in by.items()} for cell, by in per_cell.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probe_output", type=Path)
    parser.add_argument("--map", type=Path, default=Path("docs/results/map"))
    args = parser.parse_args()
    drop, gain = drops(args.probe_output), gains(args.map)
    cells = sorted(set(drop) & set(gain), key=lambda c: np.mean(drop[c]))
    keys = ("lowest running", "lowest recalibrated", "ensemble recalibrated")
    print("cell | VI runs | accuracy lost to the search (points) | AS - VI: " + " / ".join(keys))
    for cell in cells:
        print(f"{cell} | {len(drop[cell])} | {np.mean(drop[cell]):.1f} | "
              + " / ".join(f"{gain[cell][k]:+.2f}" for k in keys))
    for key in keys:
        rho = rank_correlation([float(np.mean(drop[c])) for c in cells], [gain[c][key] for c in cells])
        print(f"Spearman rho over {len(cells)} cells, accuracy lost to the search vs AS - VI {key}: {rho:+.2f}")


if __name__ == "__main__":
    main()
