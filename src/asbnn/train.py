"""The training loop: deterministic, plain VI and VI + Adversarial Sampling through one path.

A run lives in one folder: `config.yaml`, `log.jsonl` (one line of metrics per epoch),
`checkpoint.pt` (written atomically after every epoch) and `checkpoint.prev.pt` (the one before,
which a resume falls back to when `checkpoint.pt` is damaged). All randomness of an epoch
(shuffling, augmentation, weight noise) comes from a generator seeded by (seed, epoch), so a
resumed run replays exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import distributed
from .adversarial import FreeAdversarialSampler, bayes_loss
from .checkpoint import (
    DamagedCheckpoint,
    append_jsonl,
    atomic_write_text,
    load_checkpoint,
    previous_path,
    read_jsonl,
    remove_stale_temps,
    restore_from,
    save_checkpoint,
    writing,
)
from .config import TrainConfig, changed_keys, save_yaml
from .distributed import Ranks, average_gradients, barrier, reduce, shard
from .data import ArrayDataset, DatasetInfo, DeviceLoader, dataset_info, load_dataset
from .errors import AsbnnError, CheckpointError, ConfigError, DataError
from .models import create_model
from .posterior import Posterior

CHECKPOINT = "checkpoint.pt"
PREV_CHECKPOINT = previous_path(CHECKPOINT).name
LOG = "log.jsonl"
EVAL_BATCH = 500
RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available")
    return device


def make_generator(device: torch.device, *seeds: int) -> torch.Generator:
    """A generator seeded from several integers (e.g. run seed and epoch), reproducible anywhere."""
    seed = int(np.random.SeedSequence(list(seeds)).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device).manual_seed(seed)


def subset(data: ArrayDataset, n: int | None) -> ArrayDataset:
    """A fixed random subset (the same for every run and seed), so runs stay comparable."""
    if n is None or n >= len(data.labels):
        return data
    idx = np.sort(np.random.default_rng(0).permutation(len(data.labels))[:n])
    return ArrayDataset(images=data.images[idx], labels=data.labels[idx], classes=data.classes)


@dataclass
class RunData:
    info: DatasetInfo
    train: DeviceLoader
    test: DeviceLoader


def build_data(cfg: TrainConfig, device: torch.device) -> RunData:
    info = dataset_info(cfg.dataset)
    train = subset(load_dataset(cfg.dataset, "train", cfg.data_root), cfg.train_subset)
    test = subset(load_dataset(cfg.dataset, "test", cfg.data_root), cfg.test_subset)
    if test.classes != train.classes:  # labels are class indices: the two lists must agree exactly
        extra = sorted(set(test.classes) - set(train.classes)) or sorted(set(train.classes) - set(test.classes))
        raise DataError(f"the test and training splits of {cfg.dataset} have different classes "
                        f"(e.g. {', '.join(extra[:3]) or 'a different order'}); labels would not match")
    augment = info.augment if cfg.augment is None else cfg.augment
    common = dict(mean=info.mean, std=info.std, device=device, channels_last=cfg.channels_last)
    return RunData(
        info=info,
        train=DeviceLoader(train, cfg.batch_size, train=True, augment=augment, **common),
        test=DeviceLoader(test, min(EVAL_BATCH, len(test.labels)), train=False, augment=False, **common),
    )


def build_network(cfg: TrainConfig, info: DatasetInfo) -> nn.Module:
    """The deterministic model, or the posterior over it; seeded so runs are reproducible."""
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes=info.num_classes, in_channels=info.channels)
    if cfg.init_from is not None:
        model.load_state_dict(load_deterministic_weights(cfg.init_from, cfg.model))
    if not cfg.bayesian:
        return model
    pcfg = cfg.posterior_config()
    if cfg.init_from is not None:  # Bayesian fine-tune: the pretrained weights become the means
        pcfg = type(pcfg)(**{**pcfg.__dict__, "mu_init": "module"})
    return Posterior(model, pcfg)


def checkpoint_path(run: str | Path) -> Path:
    run = Path(run)
    return run / CHECKPOINT if run.is_dir() else run


_STATE_KEYS = ("kind", "config", "epoch", "net", "optimizer")


def load_state(path: Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint of `train`, checked to hold what training and evaluation read from it."""
    state = load_checkpoint(path, map_location=device)
    missing = [key for key in _STATE_KEYS if key not in state]
    if missing:
        raise DamagedCheckpoint(f"{path} is not an asbnn training checkpoint (no '{missing[0]}' entry)")
    if not isinstance(state["config"], dict) or not isinstance(state["epoch"], int):
        raise DamagedCheckpoint(f"{path} is not an asbnn training checkpoint (bad 'config' or 'epoch' entry)")
    return state


@contextmanager
def _restoring(path: Path) -> Iterator[None]:
    """Report tensors that do not fit the network (another version, a foreign file) as one line."""
    try:
        yield
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} does not fit the network it describes: {first}") from None


def load_deterministic_weights(source: str | Path, model_name: str) -> dict[str, Tensor]:
    state = load_state(checkpoint_path(source))
    if state.get("kind") != "deterministic":
        raise ConfigError(f"init_from must be a deterministic run; {source} holds a {state.get('kind')} run")
    if state["config"]["model"] != model_name:
        raise ConfigError(f"init_from holds model {state['config']['model']}, this run trains {model_name}")
    return state["net"]


def load_run(run: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, TrainConfig, DatasetInfo]:
    """Rebuild the trained network of a run folder or checkpoint file, in eval mode."""
    path = checkpoint_path(run)
    state = load_state(path, device)
    try:
        cfg = TrainConfig(**{**state["config"], "init_from": None})
    except TypeError as err:  # a key this version of TrainConfig does not know
        raise CheckpointError(f"{path} holds a config this version of asbnn cannot read ({err})") from None
    info = dataset_info(cfg.dataset)
    net = build_network(cfg, info).to(device)
    with _restoring(path):
        net.load_state_dict(state["net"])
    return net.eval(), cfg, info


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
def test_accuracy(net: nn.Module, loader: DeviceLoader, eps: Tensor | str | None = None) -> float:
    """Accuracy on the loader; for a posterior, at the fixed `eps` (a tensor or "mean")."""
    net.eval()
    correct = torch.zeros((), device=next(net.parameters()).device)
    for x, y in loader.batches():
        logits = net(x) if eps is None else net(x, eps)
        correct += (logits.argmax(1) == y).sum()
    return correct.item() / loader.num_samples


def step_precision(device: torch.device, amp: bool) -> str:
    """What the training steps of a run with `amp` compute in on `device`: "bf16" or "fp32"."""
    return "bf16" if use_amp(device, amp) else "fp32"


def use_amp(device: torch.device, amp: bool) -> bool:
    """Whether training steps run in bf16 autocast: with `amp`, on hardware with native bf16 matmuls
    (CUDA GPUs that support bf16, CPUs with AMX); elsewhere bf16 is emulated and slower than fp32."""
    if not amp:
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private API: absent means no
    return device.type == "cpu" and amx is not None and amx()


class TrainingDiverged(AsbnnError):
    """The loss or the parameters became NaN or infinite."""


def train_epoch(
    net: nn.Module, cfg: TrainConfig, loader: DeviceLoader, optimizer: torch.optim.Optimizer,
    generator: torch.Generator, kl_weight: float, bar: tqdm, epoch: int,
    sampler: FreeAdversarialSampler | None = None, ranks: Ranks = Ranks(), noise: torch.Generator | None = None,
) -> dict[str, float]:
    """One pass over the training set; sums stay on the device (a sync every 20 steps only).

    A non-finite loss stops the run naming the epoch and step (`nonfinite: stop`), or, with
    `nonfinite: skip`, that step is left out (which costs one sync per step) and counted.
    `generator` shapes the global batches (alike on every rank); `noise` draws the weight noise
    (this rank's own; the same generator on a lone process).
    """
    noise = generator if noise is None else noise
    net.train()
    device = generator.device
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp(device, cfg.amp))
    as_config = cfg.as_config()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    first_bad = torch.full((), -1, device=device)
    seen = skipped = 0
    skip_mode = cfg.nonfinite == "skip"
    running_stats = [b for name, b in net.named_buffers() if name.rpartition(".")[2] in RUNNING_STATS]
    for step, (x, y) in enumerate(loader.batches(generator)):
        x, y = shard(x, y, ranks)
        if skip_mode:  # a skipped step must not leave NaN in the BatchNorm running statistics
            saved_stats = [b.clone() for b in running_stats]
        with amp:
            if sampler is not None:
                parts = sampler.loss(x, y, kl_weight=kl_weight, generator=noise)
                loss, logits = parts.total, parts.logits
            elif cfg.bayesian:
                parts = bayes_loss(net, x, y, kl_weight=kl_weight, config=as_config, generator=noise)
                loss, logits = parts.total, parts.logits
            else:
                logits = net(x)
                loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        bar.update(len(y) * ranks.world)
        if skip_mode and reduce((~torch.isfinite(loss.detach())).float(), ranks) > 0:
            for buffer, saved in zip(running_stats, saved_stats):
                buffer.copy_(saved)
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


def _check_finite(first_bad: Tensor, epoch: int) -> None:
    step = int(first_bad.item())
    if step > 0:
        raise TrainingDiverged(f"the loss became NaN or infinite at epoch {epoch}, step {step}; the checkpoint "
                               f"of epoch {epoch - 1} is kept; lower lr or set nonfinite=skip to skip such steps")


def train(cfg: TrainConfig, out: str | Path, *, resume: bool = False, progress: bool = True) -> Path:
    """Train `cfg` into run folder `out`; with `resume`, continue from its last checkpoint."""
    out = Path(out)
    ckpt_file = out / CHECKPOINT
    if ckpt_file.exists() and not resume:
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    ranks, device = distributed.setup(resolve_device(cfg.device))
    compiler = os.environ.get("CXX", "g++")  # the one torch.compile's CPU backend calls
    if cfg.compile and device.type == "cpu" and not shutil.which(compiler):
        raise ConfigError(f"compile: true on a CPU needs the C++ compiler {compiler} ($CXX, else g++); install "
                          "it or set compile: false")
    progress = progress and ranks.is_main
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for repeatable sums
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    if out.is_dir() and ranks.is_main:
        remove_stale_temps(out, CHECKPOINT, PREV_CHECKPOINT, LOG)
    state = resume_state(out, cfg, device) if resume else None  # before the data: a bad checkpoint fails fast
    data = build_data(cfg, device)
    net = build_network(cfg, data.info).to(device)
    # The compiled network runs the training steps; `net` itself is evaluated and checkpointed.
    step_net = torch.compile(net) if cfg.compile else net
    precision = step_precision(device, cfg.amp)  # logged per epoch
    optimizer = make_optimizer(cfg, net)
    kl_weight = cfg.kl_weight if cfg.kl_weight is not None else 1.0 / (100 * data.train.num_samples)
    free_as = cfg.method == "as" and cfg.as_variant == "free"
    sampler = FreeAdversarialSampler(step_net, cfg.as_config()) if free_as else None

    start = 0
    if state is not None:
        with _restoring(ckpt_file):
            net.load_state_dict(state["net"])
            optimizer.load_state_dict(state["optimizer"])
            if sampler is not None:
                sampler.load_state_dict(state["sampler"])
        start = state["epoch"]
        # Epochs after the checkpoint are trained again, so their log lines go.
        kept = [r for r in read_jsonl(out / LOG) if r.get("epoch") in range(1, start + 1)]
        if ranks.is_main:
            atomic_write_text(out / LOG, "".join(json.dumps(r) + "\n" for r in kept))
    elif ranks.is_main:
        with writing(out):
            out.mkdir(parents=True, exist_ok=True)
            save_yaml(cfg, out / "config.yaml")
            (out / LOG).unlink(missing_ok=True)
            (out / PREV_CHECKPOINT).unlink(missing_ok=True)  # an earlier run's: never fall back to it
    barrier(ranks)

    writer = tensorboard_writer(out) if cfg.tensorboard and ranks.is_main else None
    for epoch in range(start, cfg.epochs):
        if cfg.reset_optimizer_each_epoch and epoch > start:
            optimizer = make_optimizer(cfg, net)
        lr = learning_rate(cfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        generator = make_generator(device, cfg.seed, epoch)
        noise = make_generator(device, cfg.seed, epoch, 2, ranks.rank) if ranks.world > 1 else None
        began = time.perf_counter()
        with tqdm(total=data.train.num_samples, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="img",
                  disable=not progress, leave=False) as bar:
            record: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, "precision": precision}
            record.update(train_epoch(step_net, cfg, data.train, optimizer, generator, kl_weight, bar, epoch + 1,
                                      sampler, ranks, noise))
        record["epoch_time"] = time.perf_counter() - began
        if not ranks.is_main:  # rank 0 alone evaluates, logs and checkpoints
            barrier(ranks)
            continue
        record.update(epoch_metrics(net, cfg, data.test, device, epoch))
        append_jsonl(out / LOG, record)
        state = {
            "kind": "posterior" if cfg.bayesian else "deterministic",
            "config": cfg.to_dict(), "epoch": epoch + 1, "precision": precision,
            "net": net.state_dict(), "optimizer": optimizer.state_dict(),
            "sampler": sampler.state_dict() if sampler is not None else None,
        }
        save_checkpoint(state, ckpt_file)
        barrier(ranks)
        if writer is not None:
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    writer.add_scalar(key, value, epoch + 1)
            if cfg.bayesian:
                writer.add_histogram("sigma", net.sigma().detach().float().cpu(), epoch + 1)
            writer.flush()
    if writer is not None:
        writer.close()
        if progress:
            tqdm.write(_summary(record))
    return out


def tensorboard_writer(run: Path) -> Any:
    """A TensorBoard SummaryWriter for RUN/tensorboard (the optional `tensorboard` package)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("tensorboard: true needs the tensorboard package (pip install tensorboard)") from None
    return SummaryWriter(str(run / "tensorboard"))


def resume_state(out: Path, cfg: TrainConfig, device: torch.device) -> dict[str, Any] | None:
    """The checkpoint to continue run `out` from, or None if it has none yet.

    When `checkpoint.pt` is truncated or corrupt, the previous good one is used (with a warning on
    stderr) and copied over the damaged one, so that the next save keeps a good previous checkpoint.
    """
    ckpt, prev = out / CHECKPOINT, out / PREV_CHECKPOINT
    damaged: list[DamagedCheckpoint] = []
    for path in (ckpt, prev):
        if not path.exists():
            continue
        try:
            state = load_state(path, device)
        except DamagedCheckpoint as err:
            damaged.append(err)
            continue
        changed = changed_keys(state["config"], cfg)
        if changed:
            raise CheckpointError(f"{out} holds a run with a different config ({', '.join(changed)}); "
                                  "start a new --out")
        precision = step_precision(device, cfg.amp)
        if state.get("precision", precision) != precision:  # checkpoints before 2026-11-27 do not say
            raise CheckpointError(f"{out} trained in {state['precision']}, and this machine would continue it in "
                                  f"{precision} (bf16 runs where CUDA or AMX has it); resume it on a machine like "
                                  "the one that started it")
        if path == prev:
            problem = damaged[0] if damaged else f"{ckpt} is missing"
            print(f"asbnn: warning: {problem}; resuming from {prev} (epoch {state['epoch']})", file=sys.stderr)
            restore_from(prev, ckpt)
        return state
    if damaged:
        raise CheckpointError(f"{damaged[0]}; no good previous checkpoint to fall back to"
                              + (f" ({damaged[1]})" if len(damaged) > 1 else ""))
    return None


def epoch_metrics(net: nn.Module, cfg: TrainConfig, test: DeviceLoader, device: torch.device, epoch: int) -> dict[str, float]:
    if not cfg.bayesian:
        return {"test_acc": test_accuracy(net, test)}
    eps = net.sample_eps(make_generator(device, cfg.seed, epoch, 1))
    with torch.no_grad():
        return {
            "test_acc": test_accuracy(net, test, "mean"),
            "test_acc_sample": test_accuracy(net, test, eps),
            "kl": net.kl().item(),
            "mean_sigma": net.sigma().mean().item(),
        }


def _summary(record: dict[str, Any]) -> str:
    parts = [f"epoch {record['epoch']}"]
    for key in ("train_loss", "train_acc", "test_acc", "test_acc_sample", "mean_sigma", "epoch_time"):
        if key in record:
            parts.append(f"{key} {record[key]:.4g}")
    return "  ".join(parts)
