"""Does the fast evaluation (`asbnn eval --amp`) give the published numbers? Measured on a trained run.

    python benchmarks/eval_fidelity.py RUN [--samples 20] [--images 2000] [--sigma 0.01] [--out FILE]

Evaluates the same sampled networks of RUN on its test set three ways: the exact fp32 evaluation
(published numbers), the fast one in fp32 (BatchNorm folded into the convolutions, NHWC batches)
and the fast one in bf16, and reports the time of each and how far every published metric
(lowest / highest / mean sampled accuracy, ensemble accuracy, NLL, ECE, Brier, accuracy at the
posterior mean) moved, in points. A deterministic RUN is wrapped in a posterior of initial
`--sigma` around its weights, so its sampled networks are spread like a fine-tune's at the start.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from asbnn.build import build_data
from asbnn.evaluate import sampled_predictions, summarize
from asbnn.posterior import Posterior, PosteriorConfig
from asbnn.runfolder import load_run

PUBLISHED = {"lowest": ("sampled", "lowest"), "highest": ("sampled", "highest"), "mean": ("sampled", "mean"),
             "ensemble accuracy": ("ensemble", "accuracy"), "ensemble NLL": ("ensemble", "nll"),
             "ECE": ("ensemble", "ece"), "Brier": ("ensemble", "brier"),
             "posterior mean accuracy": ("posterior_mean", "accuracy")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--sigma", type=float, default=0.01, help="initial sigma around a deterministic run")
    parser.add_argument("--out", default="benchmarks/results/eval_fidelity.json")
    args = parser.parse_args()
    net, cfg, _ = load_run(args.run)
    if not isinstance(net, Posterior):
        net = Posterior(net, PosteriorConfig(mu_init="module", init_sigma=args.sigma)).eval()
    cfg.test_subset = args.images
    test = build_data(cfg, torch.device("cpu")).test
    ways = {"exact fp32": {}, "fast fp32": {"fast": True}, "fast bf16": {"fast": True, "amp": True}}
    results, seconds = {}, {}
    for name, options in ways.items():
        began = time.perf_counter()
        results[name] = summarize(sampled_predictions(net, test, num_samples=args.samples, **options))
        seconds[name] = time.perf_counter() - began
        print(name, f"{seconds[name]:.1f} s", flush=True)
    table = {metric: {name: results[name][a][b] for name in ways} for metric, (a, b) in PUBLISHED.items()}
    scale = {metric: 1 if "NLL" in metric or "Brier" in metric else 100 for metric in table}  # accuracies in points
    worst = {name: max(abs(table[m][name] - table[m]["exact fp32"]) * scale[m] for m in table) for name in ways}
    summary = {"run": args.run, "model": cfg.model, "samples": args.samples, "images": len(test.labels),
               "threads": torch.get_num_threads(), "seconds": seconds, "metrics": table,
               "largest_change_in_points": worst}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
