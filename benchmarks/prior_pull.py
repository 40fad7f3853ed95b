"""How hard does the prior pull on a trained posterior? The KL term's gradient against the data term's.

With the paper's KL weight 1 / (100 N) the prior's sigma may hardly matter; this measures it on a
finished run: the mean |gradient| of the data loss (cross-entropy at sampled weights, averaged over
a few training batches) and of the weighted KL for several prior sigmas, on mu and on rho.

    python benchmarks/prior_pull.py RUN_FOLDER [--data-root DIR] [--batches 10] [--priors 0.05 0.15 1]
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.nn.functional as F

from asbnn.build import build_data
from asbnn.posterior import Posterior
from asbnn.runfolder import load_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--data-root")
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--priors", type=float, nargs="+", default=[0.05, 0.15, 1.0])
    args = parser.parse_args()

    torch.manual_seed(0)
    net, cfg, _ = load_run(args.run)
    if not isinstance(net, Posterior):
        raise SystemExit(f"{args.run} is not a Bayesian run")
    if args.data_root:
        cfg.data_root = args.data_root
    train = build_data(cfg, torch.device("cpu")).train
    kl_weight = cfg.kl_weight if cfg.kl_weight is not None else 1.0 / (100 * train.num_samples)
    net.train()  # as in training: batch statistics, fresh weights each batch
    data_mu, data_rho = torch.zeros_like(net.mu), torch.zeros_like(net.rho)
    for _, (x, y) in zip(range(args.batches), train.batches()):
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
        data_mu += net.mu.grad / args.batches
        data_rho += net.rho.grad / args.batches
    print(f"run {args.run}: {train.num_samples} training images, KL weight {kl_weight:.3g}, trained with prior "
          f"sigma {cfg.prior_sigma:g}; mean sigma {net.sigma().mean():.4f}, mean |mu| {net.mu.abs().mean():.4f}")
    print(f"data term, mean |grad| over {args.batches} batches: mu {data_mu.abs().mean():.3e}, "
          f"rho {data_rho.abs().mean():.3e}")
    for prior in args.priors:
        net.config = dataclasses.replace(net.config, prior_sigma=prior)
        net.zero_grad()
        (kl_weight * net.kl()).backward()
        mu, rho = net.mu.grad.abs().mean(), net.rho.grad.abs().mean()
        print(f"prior sigma {prior:g}: KL term, mean |grad|: mu {mu:.3e} ({mu / data_mu.abs().mean():.1%} of the "
              f"data term's), rho {rho:.3e} ({rho / data_rho.abs().mean():.1%})")


if __name__ == "__main__":
    main()
