"""What a TrainConfig describes, built: the data loaders of a run and its network."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor, nn

from .config import TrainConfig
from .data import ArrayDataset, DatasetInfo, DeviceLoader, dataset_info, eval_loader, load_dataset
from .errors import DataError
from .models import create_model
from .posterior import Posterior


def subset(data: ArrayDataset, n: int | None) -> ArrayDataset:
    """A fixed random subset (the same for every run and seed), so runs stay comparable."""
    if n is None or n >= len(data.labels):
        return data
    idx = np.sort(np.random.default_rng(0).permutation(len(data.labels))[:n])
    return ArrayDataset(images=data.images[idx], labels=data.labels[idx], classes=data.classes)


@dataclass
class RunData:
    info: DatasetInfo  # with the training split's class names: a checkpoint keeps it (`load_run`)
    train: DeviceLoader
    test: DeviceLoader


def build_data(cfg: TrainConfig, device: torch.device) -> RunData:
    """The training loader (shuffled, augmented per the data set or `augment`) and the test loader."""
    train = subset(load_dataset(cfg.dataset, "train", cfg.data_root), cfg.train_subset)
    info = replace(dataset_info(cfg.dataset), classes=tuple(train.classes))
    augment = info.augment if cfg.augment is None else cfg.augment
    return RunData(
        info=info,
        train=DeviceLoader(train, cfg.batch_size, train=True, augment=augment, mean=info.mean, std=info.std,
                           device=device, channels_last=cfg.channels_last),
        test=build_test_loader(cfg, info, device),
    )


def build_test_loader(cfg: TrainConfig, info: DatasetInfo, device: torch.device) -> DeviceLoader:
    """The test split of `cfg.dataset`, checked to fit a network trained on `info` (the training split's
    classes in the same order, images of its size), normalised as in training."""
    test = subset(load_dataset(cfg.dataset, "test", cfg.data_root), cfg.test_subset)
    classes = list(info.classes) if info.classes is not None else test.classes  # old checkpoints do not say
    if test.classes != classes:  # labels are class indices: the two lists must agree exactly
        extra = sorted(set(test.classes) - set(classes)) or sorted(set(classes) - set(test.classes))
        raise DataError(f"the test and training splits of {cfg.dataset} have different classes "
                        f"(e.g. {', '.join(extra[:3]) or 'a different order'}); labels would not match")
    check_images(cfg.dataset, test, info)
    return eval_loader(test, info.mean, info.std, device=device, channels_last=cfg.channels_last)


def check_images(name: str, data: ArrayDataset, info: DatasetInfo) -> None:
    """Refuse images of another size or channel count than the network `info` describes was trained on."""
    _, height, width, channels = data.images.shape
    if (height, width, channels) != (info.image_size, info.image_size, info.channels):
        raise DataError(f"{name} has {channels}x{width}x{height}px images, the model expects "
                        f"{info.channels}x{info.image_size}x{info.image_size}px")


def build_network(cfg: TrainConfig, info: DatasetInfo, init_weights: dict[str, Tensor] | None = None) -> nn.Module:
    """The deterministic model, or the posterior over it; seeded so runs are reproducible.

    `init_weights` (the state dict of a deterministic run, see `runfolder.deterministic_weights`)
    start the model; for a posterior they become the means (a Bayesian fine-tune).
    """
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes=info.num_classes, in_channels=info.channels, dropout=cfg.dropout)
    if init_weights is not None:
        model.load_state_dict(init_weights)
    if not cfg.bayesian:
        return model
    pcfg = cfg.posterior_config()
    if init_weights is not None:
        pcfg = type(pcfg)(**{**pcfg.__dict__, "mu_init": "module"})
    return Posterior(model, pcfg)
