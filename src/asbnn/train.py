"""The training loop: deterministic, plain VI and VI + Adversarial Sampling through one path.

All randomness of an epoch (shuffling, augmentation, weight noise) comes from generators seeded
by (seed, epoch) (`streams`), and the learning rate is a pure function of the epoch, so a run
resumed from the checkpoint of its folder (`runfolder`) replays exactly what an uninterrupted one
would have done.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import distributed, streams
from .adversarial import FreeAdversarialSampler, RunningStats, bayes_loss, normalised_mask
from .build import build_data, build_network
from .config import TrainConfig
from .data import DatasetInfo, DeviceLoader
from .dropout import set_training_generator
from .distributed import Ranks, average_gradients, barrier, reduce, shard
from .errors import AsbnnError, ConfigError
from .fileio import append_jsonl
from .hardware import (
    Precision, Workload, autocast, bf16_native, choose_precision, require_compiler, resolve_device,
    use_deterministic_kernels,
)
from .runfolder import (
    CHECKPOINT, LOG, checkpoint_state, deterministic_weights, remove_leftovers, restoring, resume_state, run_files,
    save_checkpoint, start_run, tensorboard_writer, truncate_log,
)


class TrainingDiverged(AsbnnError):
    """The loss or the parameters became NaN or infinite."""


def train(cfg: TrainConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True) -> Path:
    """Train `cfg` into run folder `out`; with `resume`, continue from its last checkpoint (if any).

    A folder holding another run's files is refused, since a new run would delete what they hold
    (a checkpoint a resume could still use, an evaluation of other weights), unless `overwrite`."""
    out = Path(out)
    if resume and overwrite:
        raise ConfigError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    found = run_files(out)
    if found and not resume and not overwrite:
        raise ConfigError(f"{out} already holds a run ({', '.join(found)}); pass --resume to continue it, "
                          "--overwrite to replace it, or choose another --out")
    ranks, device = distributed.setup(resolve_device(cfg.device))
    if cfg.compile:
        require_compiler(device)
    if cfg.deterministic:
        use_deterministic_kernels()
    progress = progress and ranks.is_main
    # a bar on a terminal; elsewhere (a log file, CI, nohup) its carriage-return updates would pile up
    # by the thousand, so one line per epoch instead
    bar_shown = progress and on_terminal()
    if ranks.is_main:
        remove_leftovers(out)
    state = resume_state(out, cfg, device) if resume else None  # before the data: a bad checkpoint fails fast

    data = build_data(cfg, device)
    init = deterministic_weights(cfg.init_from, cfg.model) if cfg.init_from is not None else None
    net = build_network(cfg, data.info, init).to(device)
    if cfg.method == "as" and cfg.as_layers == "normalised":
        normalised_mask(net)  # traced once here: a model without normalised layers is refused before the run starts
    step_net = torch.compile(net) if cfg.compile else net  # runs the steps; `net` is evaluated and saved
    precision = state["precision"] if state is not None and "precision" in state else \
        run_precision(cfg, net, data.info, device, ranks)  # a resumed run keeps its own
    optimizer = make_optimizer(cfg, net)
    kl_weight = cfg.kl_weight if cfg.kl_weight is not None else 1.0 / (100 * data.train.num_samples)
    sampler = FreeAdversarialSampler(step_net, cfg.as_config()) if cfg.method == "as" and cfg.as_variant == "free" \
        else None

    start = 0
    if state is not None:
        with restoring(out / CHECKPOINT):
            net.load_state_dict(state["net"])
            optimizer.load_state_dict(state["optimizer"])
            if sampler is not None:
                sampler.load_state_dict(state["sampler"])
        start = state["epoch"]
        if ranks.is_main:
            truncate_log(out, start)
    elif ranks.is_main:
        start_run(out, cfg)
    barrier(ranks)

    writer = tensorboard_writer(out) if cfg.tensorboard and ranks.is_main else None
    record: dict[str, Any] | None = None
    for epoch in range(start, cfg.epochs):
        if cfg.reset_optimizer_each_epoch and epoch > start:
            optimizer = make_optimizer(cfg, net)
        lr = learning_rate(cfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = streams.epoch_batches(device, cfg.seed, epoch)
        noise = streams.rank_noise(device, cfg.seed, epoch, ranks.rank) if ranks.world > 1 else batches
        set_training_generator(net, noise)  # MC dropout's draws; a no-op for networks without dropout
        began = time.perf_counter()
        with tqdm(total=data.train.num_samples, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="img",
                  disable=not bar_shown, leave=False) as bar:
            record = {"epoch": epoch + 1, "lr": lr, "precision": precision}
            record.update(train_epoch(step_net, cfg, data.train, optimizer, kl_weight, epoch + 1, bar=bar,
                                      batch_stream=batches, noise_stream=noise, sampler=sampler, ranks=ranks,
                                      bf16=precision == "bf16"))
        record["epoch_time"] = time.perf_counter() - began
        if ranks.is_main:  # rank 0 alone evaluates, logs and checkpoints
            record.update(epoch_metrics(net, cfg, data.test, device, epoch))
            append_jsonl(out / LOG, record)
            save_checkpoint(checkpoint_state(cfg, data.info, epoch + 1, precision, net, optimizer,
                                             sampler.state_dict() if sampler is not None else None), out / CHECKPOINT)
        barrier(ranks)
        if progress and not bar_shown:
            print(summary(record), flush=True)
        if writer is not None:
            log_tensorboard(writer, record, net if cfg.bayesian else None)
    if writer is not None:
        writer.close()
    if bar_shown and record is not None:
        tqdm.write(summary(record))
    return out


def on_terminal() -> bool:
    """Whether progress bars are seen as bars (stderr is a terminal), not as a stream of updates."""
    return sys.stderr.isatty()


def train_epoch(
    net: nn.Module, cfg: TrainConfig, loader: DeviceLoader, optimizer: torch.optim.Optimizer, kl_weight: float,
    epoch: int, *, bar: tqdm, batch_stream: torch.Generator, noise_stream: torch.Generator,
    sampler: FreeAdversarialSampler | None = None, ranks: Ranks = Ranks(), bf16: bool = False,
) -> dict[str, float]:
    """One pass over the training set; sums stay on the device (a sync every 20 steps only).

    A non-finite loss stops the run naming the epoch and step (`nonfinite: stop`), or, with
    `nonfinite: skip`, that step is left out (which costs one sync per step) and counted.
    `batch_stream` shapes the global batches (alike on every rank); `noise_stream` draws the
    weight noise (this rank's own; the batch stream itself on a lone process). `bf16`: the steps
    run in bf16 autocast (the run's `run_precision`).
    """
    net.train()
    device = batch_stream.device
    as_config = cfg.as_config()
    if epoch < cfg.as_first_epoch:  # AS only from `as_first_epoch` on: plain VI (lambda 0) before it
        as_config, sampler = dataclasses.replace(as_config, lam=0.0), None
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    first_bad = torch.full((), -1, device=device)
    seen = skipped = 0
    for step, (x, y) in enumerate(loader.batches(batch_stream)):
        x, y = shard(x, y, ranks)
        # a skipped step must not leave NaN in the BatchNorm running statistics
        stats = RunningStats(net) if cfg.nonfinite == "skip" else None
        with autocast(device, bf16):
            if sampler is not None:
                parts = sampler.loss(x, y, kl_weight=kl_weight, generator=noise_stream)
                loss, logits = parts.total, parts.logits
            elif cfg.bayesian:
                parts = bayes_loss(net, x, y, kl_weight=kl_weight, config=as_config, generator=noise_stream)
                loss, logits = parts.total, parts.logits
            else:
                logits = net(x)
                loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        bar.update(len(y) * ranks.world)
        if stats is not None and reduce((~torch.isfinite(loss.detach())).float(), ranks) > 0:
            stats.restore()
            skipped += 1
            continue
        average_gradients(net, ranks)
        optimizer.step()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), step + 1, first_bad)
        loss_sum += loss.detach() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(y)
        if step % 20 == 0:
            _check_finite(reduce(first_bad, ranks, "max"), epoch)
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}")
    _check_finite(reduce(first_bad, ranks, "max"), epoch)
    loss_sum, correct = reduce(loss_sum, ranks), reduce(correct, ranks)
    seen = int(reduce(torch.tensor(float(seen), device=device), ranks).item())
    if not all(torch.isfinite(p).all() for p in net.parameters()):
        raise TrainingDiverged(f"parameters became NaN or infinite in epoch {epoch}; the checkpoint of "
                               f"epoch {epoch - 1} is kept; lower lr or set nonfinite=skip")
    if seen == 0:
        raise TrainingDiverged(f"every step of epoch {epoch} had a non-finite loss and was skipped")
    return {"train_loss": loss_sum.item() / seen, "train_acc": correct.item() / seen, "skipped_steps": skipped}


def run_precision(cfg: TrainConfig, net: nn.Module, info: DatasetInfo, device: torch.device,
                  ranks: Ranks) -> Precision:
    """What a new run's steps compute in (`hardware.choose_precision`). With several ranks, rank 0
    alone measures (and caches the measurement), the others only say whether their device has
    native bf16, and bf16 is used only if rank 0 chose it and every rank has it: ranks measuring
    side by side on one loaded machine could disagree, and their cache writes would then leave a
    decision that a later run (a resume, a repeat) does not share with this one."""
    workload = Workload(cfg.model, (info.channels, info.image_size, info.image_size),
                        -(-cfg.batch_size // ranks.world), cfg.bayesian, "train", cfg.channels_last)
    if ranks.world == 1:
        return choose_precision(device, cfg.amp, workload, net)
    if ranks.is_main:
        mine = choose_precision(device, cfg.amp, workload, net)
    else:
        mine = "bf16" if cfg.amp is not False and bf16_native(device) else "fp32"
    if reduce(torch.tensor(float(mine == "fp32"), device=device), ranks, "max") > 0:
        return "fp32"
    return "bf16"


def _check_finite(first_bad: Tensor, epoch: int) -> None:
    step = int(first_bad.item())
    if step > 0:
        raise TrainingDiverged(f"the loss became NaN or infinite at epoch {epoch}, step {step}; the checkpoint "
                               f"of epoch {epoch - 1} is kept; lower lr or set nonfinite=skip to skip such steps")


def make_optimizer(cfg: TrainConfig, net: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in net.parameters() if p.requires_grad]
    # fused kernels: one pass over all parameters per step (7x faster than the default on a CPU)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=True)


def learning_rate(cfg: TrainConfig, epoch: int) -> float:
    """The learning rate of 0-based `epoch`: a pure function of the epoch, so resume needs no state."""
    if cfg.schedule == "multistep":
        return cfg.lr * cfg.lr_gamma ** sum(epoch >= m for m in cfg.lr_milestones)
    if cfg.schedule == "cosine":
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * epoch / cfg.epochs))
    return cfg.lr


@torch.no_grad()
def accuracy_on(net: nn.Module, loader: DeviceLoader, eps: Tensor | str | None = None) -> float:
    """Accuracy on the loader; for a posterior, at the fixed `eps` (a tensor or "mean")."""
    net.eval()
    correct = torch.zeros((), device=next(net.parameters()).device)
    for x, y in loader.batches():
        logits = net(x) if eps is None else net(x, eps)
        correct += (logits.argmax(1) == y).sum()
    return correct.item() / loader.num_samples


def epoch_metrics(net: nn.Module, cfg: TrainConfig, test: DeviceLoader, device: torch.device,
                  epoch: int) -> dict[str, float]:
    """Test accuracy after 0-based `epoch`; for a posterior at its mean and at one sampled model, with KL and sigma."""
    if not cfg.bayesian:
        return {"test_acc": accuracy_on(net, test)}
    eps = net.sample_eps(streams.epoch_test_sample(device, cfg.seed, epoch))
    with torch.no_grad():
        return {
            "test_acc": accuracy_on(net, test, "mean"),
            "test_acc_sample": accuracy_on(net, test, eps),
            "kl": net.kl().item(),
            "mean_sigma": net.sigma().mean().item(),
        }


def log_tensorboard(writer: Any, record: dict[str, Any], posterior: nn.Module | None) -> None:
    """An epoch's numbers as scalars, and the posterior's sigmas as a histogram."""
    for key, value in record.items():
        if key != "epoch" and isinstance(value, (int, float)):
            writer.add_scalar(key, value, record["epoch"])
    if posterior is not None:
        writer.add_histogram("sigma", posterior.sigma().detach().float().cpu(), record["epoch"])
    writer.flush()


def summary(record: dict[str, Any]) -> str:
    """The last epoch's main numbers on one line."""
    parts = [f"epoch {record['epoch']}"]
    for key in ("train_loss", "train_acc", "test_acc", "test_acc_sample", "mean_sigma", "epoch_time"):
        if key in record:
            parts.append(f"{key} {record[key]:.4g}")
    return "  ".join(parts)
