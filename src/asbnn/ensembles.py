"""Deep ensembles (Lakshminarayanan et al., 2017): M deterministic networks trained from different
seeds, evaluated as the K sampled networks of a posterior are.

The members play the role of sampled networks, so every number of an evaluation (lowest / highest /
mean member accuracy, ensemble accuracy, NLL, Brier, ECE, uncertainty, selective prediction, OOD)
comes from the same `Predictions` reduction and means the same thing for both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .config import TrainConfig
from .data import DeviceLoader
from .errors import ConfigError
from .evaluate import Predictions, sampled_predictions

#: Config keys members may differ in; the rest must agree, so that they share data and classes.
SHARED_KEYS = ("dataset", "train_subset", "test_subset")


def check_members(configs: Sequence[TrainConfig], names: Sequence[str]) -> None:
    """Members must be deterministic runs on the same data, and no two the same network."""
    if len(configs) < 2:
        raise ConfigError("a deep ensemble needs at least 2 runs")
    for cfg, name in zip(configs, names):
        if cfg.method != "deterministic":
            raise ConfigError(f"{name} is a {cfg.method} run; a deep ensemble is made of deterministic runs")
        for key in SHARED_KEYS:
            if getattr(cfg, key) != getattr(configs[0], key):
                raise ConfigError(f"{name} has {key} {getattr(cfg, key)!r}, {names[0]} has "
                                  f"{getattr(configs[0], key)!r}; members must share their data")
    seen: dict[str, str] = {}
    for cfg, name in zip(configs, names):
        identity = repr({k: v for k, v in cfg.to_dict().items() if k not in ("data_root", "device")})
        if identity in seen:
            raise ConfigError(f"{name} and {seen[identity]} have the same config and seed: the same network twice")
        seen[identity] = name


@torch.no_grad()
def ensemble_predictions(members: Sequence[nn.Module], loader: DeviceLoader, *, keep_probs: bool = False,
                         amp: bool = False) -> Predictions:
    """Run each member over `loader` and reduce their outputs as K sampled networks' would be."""
    preds = [sampled_predictions(net, loader, keep_probs=keep_probs, amp=amp) for net in members]

    def mean(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([t.double() for t in tensors]).mean(0).float()

    return Predictions(
        labels=preds[0].labels,
        ensemble_probs=mean([p.ensemble_probs for p in preds]),
        aleatoric=mean([p.aleatoric for p in preds]),
        sample_correct=torch.cat([p.sample_correct for p in preds]),
        sample_nll=torch.cat([p.sample_nll for p in preds]),
        sample_probs=torch.cat([p.sample_probs for p in preds]) if keep_probs else None,
        mean_logits=mean([p.mean_logits for p in preds]), rechecked=sum(p.rechecked for p in preds),
    )
