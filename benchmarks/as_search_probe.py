"""How far does AS's sign search push the loss, where a Bayesian fine-tune starts or where a run ended?

AS trains on the loss at eps_adv, N sign steps of alpha from a regular draw. Where that loss is far
above the regular one, lambda = 0.8 of every step goes to a network much worse than the posterior's
typical one. For each source this measures, on a few training batches in train mode (batch
statistics; running statistics untouched), the cross-entropy and accuracy at the posterior mean, at
a regular draw eps and at eps_adv (the source's N and alpha). A source is a fine-tune's config.yaml
(its first posterior, built exactly as the run starts it: mu = its deterministic start's weights,
sigma = its init_sigma) or a finished Bayesian run folder, the one holding checkpoint.pt (its trained
posterior):

    python benchmarks/as_search_probe.py SOURCE [SOURCE ...] [--data-root DIR] [--batches 10]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from asbnn.adversarial import adversarial_eps, frozen_bn_stats
from asbnn.build import build_data, build_network
from asbnn.config import TrainConfig, make_config
from asbnn.data import dataset_info
from asbnn.posterior import Posterior
from asbnn.runfolder import deterministic_weights, load_run


def posterior_of(source: str, data_root: str | None) -> tuple[Posterior, TrainConfig]:
    """A fine-tune's first posterior (`source` its config.yaml) or a trained one (`source` a run folder)."""
    if Path(source).is_dir():
        net, cfg, _ = load_run(source)
    else:
        cfg = make_config(source)
        if cfg.init_from is None:
            raise SystemExit(f"{source} is not a fine-tune (no init_from)")
        net = build_network(cfg, dataset_info(cfg.dataset), deterministic_weights(cfg.init_from, cfg.model))
    if not isinstance(net, Posterior):
        raise SystemExit(f"{source} holds no posterior")
    if data_root:
        cfg.data_root = data_root
    return net, cfg


def probe(net: Posterior, cfg: TrainConfig, batches: int) -> dict[str, float]:
    """Mean loss and accuracy at mu, at a regular draw and at the adversarial one over `batches` batches."""
    data = build_data(cfg, torch.device("cpu"))
    net.train()
    generator = torch.Generator().manual_seed(cfg.seed)
    totals = {f"{kind}_{at}": 0.0 for kind in ("loss", "acc") for at in ("mean", "regular", "adversarial")}
    with frozen_bn_stats(net):
        for _, (x, y) in zip(range(batches), data.train.batches(generator)):
            eps = net.sample_eps(generator)
            eps_adv = adversarial_eps(net, x, y, eps, cfg.as_steps, cfg.as_step_size)
            with torch.no_grad():
                for at, weights in (("mean", net.flat_weights("mean")), ("regular", net.flat_weights(eps)),
                                    ("adversarial", net.flat_weights(eps_adv))):
                    logits = net(x, weights=weights)
                    totals[f"loss_{at}"] += F.cross_entropy(logits, y).item() / batches
                    totals[f"acc_{at}"] += (logits.argmax(1) == y).float().mean().item() / batches
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+", help="fine-tune config.yaml files or run folders")
    parser.add_argument("--data-root")
    parser.add_argument("--batches", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{args.batches} training batches each, train mode; run | its start | init sigma | N x alpha | "
          "loss at mu / regular eps / eps_adv | accuracy (%) at mu / regular / adversarial")
    for source in args.sources:
        net, cfg = posterior_of(source, args.data_root)
        r = probe(net, cfg, args.batches)
        path = Path(source).resolve()
        name, start = (path.parent.name, "trained") if path.is_dir() else \
            (path.parent.parent.name, Path(cfg.init_from).resolve().parent.name)
        print(f"{name} | {start} | {cfg.init_sigma:g} | {cfg.as_steps} x {cfg.as_step_size:g} | "
              f"{r['loss_mean']:.3f} / {r['loss_regular']:.3f} / {r['loss_adversarial']:.3f} | "
              f"{100 * r['acc_mean']:.1f} / {100 * r['acc_regular']:.1f} / {100 * r['acc_adversarial']:.1f}")


if __name__ == "__main__":
    main()
