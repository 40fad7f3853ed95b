"""Does Adversarial Sampling (and evaluation) survive bf16 mixed precision? Measured on a trained run.

    python benchmarks/bf16_fidelity.py RUN [--batches 5] [--eval-samples 20] [--out benchmarks/results/bf16_fidelity.json]

Under bf16 autocast each sampled weight w = mu + sigma * eps is rounded to 8 significant bits
inside every convolution, while a sign step moves it by only alpha * sigma (0.02 sigma). This
script runs the search of Algorithm 1 on training batches of RUN in fp32 and in bf16 and reports,
for each: the loss increase it finds (measured in fp32 at the eps it returns), the share of
gradient signs that agree with fp32, and how much of the fp32 weight displacement w_adv - w is
still there after rounding the weights to bf16. Then it evaluates `--eval-samples` sampled
models on RUN's test set in fp32 and in bf16 (`asbnn eval --amp`): time and metrics side by side.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from asbnn.adversarial import adversarial_eps, frozen_bn_stats
from asbnn.build import build_data
from asbnn.evaluate import summarize, timed_predictions
from asbnn.runfolder import load_run
from asbnn.streams import make_generator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--eval-samples", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/bf16_fidelity.json")
    args = parser.parse_args()
    net, cfg, _ = load_run(args.run)
    net.train()
    data = build_data(cfg, torch.device("cpu"))
    steps, alpha = cfg.as_steps, cfg.as_step_size
    rows = []
    with frozen_bn_stats(net.model):
        for i, (x, y) in enumerate(data.train.batches(make_generator(torch.device("cpu"), 0, 0))):
            if i == args.batches:
                break
            eps = net.sample_eps(make_generator(torch.device("cpu"), 1, i))
            with torch.no_grad():
                clean = F.cross_entropy(net(x, eps), y).item()
            found = {}
            for precision in ("fp32", "bf16"):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    found[precision] = adversarial_eps(net, x, y, eps, steps, alpha)
                    first = eps.clone().requires_grad_(True)
                    (grad,) = torch.autograd.grad(F.cross_entropy(net(x, first), y), first)
                found[precision + "_sign"] = grad.sign()
            sigma = net.sigma().detach()
            w = net.mu.detach() + sigma * eps
            row = {"batch": i, "clean_loss": clean, "sign_agreement": (found["fp32_sign"] == found["bf16_sign"]).float().mean().item()}
            for precision in ("fp32", "bf16"):
                with torch.no_grad():
                    row[f"loss_increase_{precision}"] = F.cross_entropy(net(x, found[precision]), y).item() - clean
            w_adv = net.mu.detach() + sigma * found["fp32"]
            moved = w_adv - w
            moved_bf16 = w_adv.bfloat16().float() - w.bfloat16().float()
            row["displacement_kept_in_bf16"] = (torch.dot(moved_bf16, moved) / torch.dot(moved, moved)).item()
            row["weights_not_moved_in_bf16"] = ((moved_bf16 == 0) & (moved != 0)).float().mean().item()
            rows.append(row)
            print(row, flush=True)
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "batch"}
    summary = {"run": args.run, "model": cfg.model, "dataset": cfg.dataset, "epochs": cfg.epochs,
               "mean_sigma": net.sigma().mean().item(), "median_abs_mu": net.mu.abs().median().item(),
               "steps": steps, "step_size": alpha, "mean": mean, "batches": rows}
    summary["evaluation"] = {}
    for precision in ("fp32", "bf16"):
        pred, seconds = timed_predictions(net, data.test, num_samples=args.eval_samples, mode="loop", amp=precision == "bf16")
        result = summarize(pred)
        summary["evaluation"][precision] = {"seconds": seconds, **{k: result[k] for k in ("sampled", "ensemble", "uncertainty")}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "batches"}, indent=1))


if __name__ == "__main__":
    main()
