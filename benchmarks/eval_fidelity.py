"""Does the fast evaluation (`asbnn eval --amp`) give the published numbers? Measured on a trained run.

    python benchmarks/eval_fidelity.py RUN [--samples 20] [--images 2000] [--sigma 0.01] [--out FILE]

Evaluates the same sampled networks of RUN on its test set four ways: the exact fp32 evaluation
(published numbers), the fast one in fp32 (BatchNorm folded into the convolutions, NHWC batches),
the fast one in bf16 without and with the fp32 recheck of near-ties (`evaluate.recheck_near_ties`,
what `asbnn eval --amp` runs), and reports the time of each, the fraction of (network, image) pairs
rechecked, and how far every published metric (lowest / highest / mean sampled accuracy, ensemble
accuracy, NLL, ECE, Brier, accuracy at the posterior mean) moved, in points. It also measures what
sets the recheck's margin (`evaluate.RECHECK_MARGIN`): per (network, image) pair the largest
|bf16 logit - fp32 logit| over the classes, the largest error of the margin between the top class
and a class within 1 of it (percentiles of both), the largest bf16 top-1 / top-2 margin at which
bf16 changed the class, and the fraction of pairs below a few margins (the recheck's cost).
A deterministic RUN is wrapped in a posterior of initial `--sigma` around its weights, so its
sampled networks are spread like a fine-tune's at the start.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from asbnn.build import build_data
from asbnn.data import DeviceLoader
from asbnn.evaluate import _nhwc, folded, sampled_models, sampled_predictions, summarize
from asbnn.posterior import Posterior, PosteriorConfig
from asbnn.runfolder import load_run

PUBLISHED = {"lowest": ("sampled", "lowest"), "highest": ("sampled", "highest"), "mean": ("sampled", "mean"),
             "ensemble accuracy": ("ensemble", "accuracy"), "ensemble NLL": ("ensemble", "nll"),
             "ECE": ("ensemble", "ece"), "Brier": ("ensemble", "brier"),
             "posterior mean accuracy": ("posterior_mean", "accuracy")}
WAYS = {"exact fp32": {}, "fast fp32": {"fast": True}, "fast bf16": {"fast": True, "amp": True, "tau": 0.0},
        "fast bf16 + fp32 recheck": {"fast": True, "amp": True}}
PERCENTILES = (50, 99, 99.9, 99.99, 100)
MARGINS = (0.05, 0.1, 0.2, 0.3)


@torch.no_grad()
def logit_errors(net: Posterior, test: DeviceLoader, samples: int) -> dict[str, object]:
    """bf16 against fp32 logits of the first `samples` sampled networks, folded, on NHWC batches, per
    (network, image) pair: the largest |bf16 - fp32| logit over the classes, and the largest error
    of the margin between the bf16 top class and a class within 1 of it (what can change the class)."""
    fold = folded(net)
    errors, margin_errors, margins, flipped = [], [], [], []
    for eps in sampled_models(net, 0, range(samples)):
        weights = [fold.weights(eps)]
        for x, _ in test.batches():
            x = _nhwc(x)
            exact = fold(x, weights)[0]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                bf16 = fold(x, weights)[0].float()
            top = bf16.argmax(-1, keepdim=True)
            margin = bf16.gather(1, top) - bf16  # each class's bf16 margin below the top one
            margin_error = (exact.gather(1, top) - exact - margin).abs()
            errors.append((bf16 - exact).abs().amax(-1))
            margin_errors.append(margin_error.where(margin < 1, 0).amax(-1))
            margins.append(margin.scatter(1, top, float("inf")).amin(-1))
            flipped.append(top[:, 0] != exact.argmax(-1))
    errors, margin_errors, margins, flipped = map(torch.cat, (errors, margin_errors, margins, flipped))
    levels = torch.tensor(PERCENTILES, dtype=torch.float64) / 100

    def percentiles(values: torch.Tensor) -> dict[str, float]:
        return dict(zip(map(str, PERCENTILES), torch.quantile(values.double(), levels).tolist()))

    return {"pairs": len(errors), "max_abs_logit_error_percentiles": percentiles(errors),
            "near_margin_error_percentiles": percentiles(margin_errors), "flips": int(flipped.sum()),
            "largest_bf16_margin_at_a_flip": float(margins[flipped].max()) if flipped.any() else 0.0,
            "fraction_with_margin_below": {str(t): float((margins < t).double().mean()) for t in MARGINS}}


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
    results, seconds, rechecked = {}, {}, {}
    for name, options in WAYS.items():
        began = time.perf_counter()
        pred = sampled_predictions(net, test, num_samples=args.samples, **options)
        seconds[name] = time.perf_counter() - began
        results[name] = summarize(pred)
        rechecked[name] = pred.rechecked / (args.samples * len(pred.labels))
        print(name, f"{seconds[name]:.1f} s", flush=True)
    table = {metric: {name: results[name][a][b] for name in WAYS} for metric, (a, b) in PUBLISHED.items()}
    scale = {metric: 1 if "NLL" in metric or "Brier" in metric else 100 for metric in table}  # accuracies in points
    worst = {name: max(abs(table[m][name] - table[m]["exact fp32"]) * scale[m] for m in table) for name in WAYS}
    summary = {"run": args.run, "model": cfg.model, "samples": args.samples, "images": len(test.labels),
               "threads": torch.get_num_threads(), "seconds": seconds, "fraction_rechecked": rechecked,
               "metrics": table, "largest_change_in_points": worst,
               "bf16_logit_errors": logit_errors(net, test, args.samples)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
