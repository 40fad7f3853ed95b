"""Trained networks as `.safetensors` files, for tools outside asbnn.

A model file holds the state dict (for a posterior: the flat `mu` and `rho`, plus the wrapped
model's deterministic parameters and buffers; for MC dropout: the plain model's, with the dropout
rate in the metadata) and, in the safetensors metadata, everything needed
to rebuild the network and feed it images: the training config, model and data set names, input
size and normalisation, class names and which parameters are Bayesian. Safetensors holds only raw
tensors and a JSON header, so loading a file from anywhere can never execute code, unlike a pickle.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from . import __version__
from .config import TrainConfig
from .data import DatasetInfo, dataset_classes, dataset_info
from .dropout import MCDropout, dropout_hooks
from .errors import CheckpointError, ConfigError, first_line
from .fileio import atomic_write_bytes
from .models import create_model
from .posterior import Posterior, PosteriorConfig, select_parameters
from .runfolder import load_run

#: Version of the metadata layout below; a reader refuses files of another layout.
FORMAT_VERSION = "1"
# Metadata values are strings: these are stored as they are, every other key as JSON.
_TEXT_KEYS = ("format", "asbnn_format", "asbnn_version", "kind", "model", "dataset")


def save_model(
    source: str | Path | nn.Module,
    path: str | Path,
    *,
    config: TrainConfig | None = None,
    info: DatasetInfo | None = None,
    classes: Sequence[str] | None = None,
) -> Path:
    """Write a run (folder or checkpoint) or a network to one `.safetensors` file.

    For a network, `config` is its TrainConfig if it was built from one (then `load_model` rebuilds
    it alone); without one, `load_model` needs the bare module again. `info` (input size and
    normalisation) defaults to the config's data set; `classes` to that data set's class names.
    """
    if isinstance(source, nn.Module):
        net, cfg = source, config
        if cfg is not None and cfg.bayesian != isinstance(net, Posterior):
            raise ConfigError(f"the config says method {cfg.method}, the network is "
                              f"{'a posterior' if isinstance(net, Posterior) else 'deterministic'}")
        if info is None and cfg is not None:
            info = dataset_info(cfg.dataset)
    else:
        if config is not None or info is not None:
            raise ConfigError("config and info are read from the run itself; pass them only with a network")
        net, cfg, info = load_run(source)
    if classes is None and info is not None:
        classes = info.classes
    if classes is None and cfg is not None:
        classes = dataset_classes(cfg.dataset, cfg.data_root)
    if classes is not None and info is not None and len(classes) != info.num_classes:
        raise ConfigError(f"{len(classes)} class names given for {info.num_classes} classes")

    kind = "posterior" if isinstance(net, Posterior) else "mc_dropout" if isinstance(net, MCDropout) else "deterministic"
    meta: dict[str, Any] = {"format": "pt", "asbnn_format": FORMAT_VERSION, "asbnn_version": __version__, "kind": kind}
    if cfg is not None:
        meta.update(config=cfg.to_dict(), model=cfg.model)
    if info is not None:
        meta.update(dataset=info.name, num_classes=info.num_classes, channels=info.channels,
                    image_size=info.image_size, mean=info.mean, std=info.std, augment=info.augment)
    if classes is not None:
        meta["classes"] = list(classes)
    if isinstance(net, Posterior):
        meta.update(posterior_config=dataclasses.asdict(net.config), bayesian_names=net.names)
    if isinstance(net, MCDropout):  # the plain model's tensors (its weight-scaling network) and the rate
        meta["dropout"] = net.hooks[0].p
        net = net.model
    # safetensors stores dense, unshared tensors: copy each (tied weights come back untied)
    tensors = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in net.state_dict().items()}
    path = Path(path)
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata=_encode(meta)))
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of an asbnn model file, values decoded (numbers, lists, the config dict)."""
    path = Path(path)
    with _opened(path) as f:
        return _decode(f.metadata(), path)


def info_from_metadata(meta: dict[str, Any]) -> DatasetInfo | None:
    """The input description stored with a model, or None for a file saved without one."""
    if "image_size" not in meta:
        return None
    return DatasetInfo(meta["dataset"], meta["num_classes"], meta["channels"], meta["image_size"],
                       tuple(meta["mean"]), tuple(meta["std"]), meta["augment"])


def load_model(path: str | Path, *, model: nn.Module | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the network saved in `path`, in eval mode: a `Posterior`, an `MCDropout` or the
    deterministic model.

    `model` is a fresh instance of the bare architecture, needed for networks that are not in the
    model registry (it is then wrapped in the saved posterior). The caller's random state is kept.
    """
    path = Path(path)
    with _opened(path) as f:
        meta = _decode(f.metadata(), path)
        state = {key: f.get_tensor(key) for key in f.keys()}
    with torch.random.fork_rng(devices=[]):  # building layers draws initial weights; keep the caller's stream
        try:
            net = _build(meta, model, path)
        except (KeyError, TypeError) as err:
            raise CheckpointError(f"{path} has incomplete or invalid metadata ({type(err).__name__}: {err})") from None
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{path} does not fit the network: {first_line(err)}") from None
    if meta["kind"] == "mc_dropout":
        net = MCDropout(net)
    return net.to(device).eval()


def _build(meta: dict[str, Any], model: nn.Module | None, path: Path) -> nn.Module:
    if model is None:
        if "model" not in meta:
            raise CheckpointError(f"{path} holds a network outside the model registry; "
                                  "load it in Python with load_model(path, model=YourNet())")
        model = create_model(meta["model"], num_classes=meta["num_classes"], in_channels=meta["channels"],
                             dropout=meta.get("dropout", 0.0))
    elif meta["kind"] == "mc_dropout" and not dropout_hooks(model):
        raise CheckpointError(f"{path} holds an MC-dropout network: pass a model with dropout layers "
                              f"(asbnn.dropout.add_dropout(model, {meta['dropout']}))")
    if meta["kind"] in ("deterministic", "mc_dropout"):
        return model
    names = meta["bayesian_names"]
    # The saved names say which parameters are Bayesian, whatever selection chose them.
    every = select_parameters(model, layer_types=(nn.Module,))
    chosen = set(names)
    posterior = Posterior(model, PosteriorConfig(**meta["posterior_config"]),
                          exclude=[n for n in every if n not in chosen], layer_types=(nn.Module,))
    if posterior.names != names:
        missing = ", ".join(sorted(chosen - set(posterior.names)))
        raise CheckpointError(f"{path} does not fit the network: " + (
            f"it has no parameters {missing}" if missing else "its parameters come in another order"))
    return posterior


@contextmanager
def _opened(path: Path) -> Iterator[Any]:
    """The open safetensors file; any failure to read it becomes one CheckpointError line."""
    if not path.is_file():
        raise CheckpointError(f"model file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            yield f
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({first_line(err)})") from None


def _encode(meta: dict[str, Any]) -> dict[str, str]:
    return {k: v if k in _TEXT_KEYS else json.dumps(v) for k, v in meta.items()}


def _decode(raw: dict[str, str] | None, path: Path) -> dict[str, Any]:
    raw = raw or {}
    version = raw.get("asbnn_format")
    if version is None:
        raise CheckpointError(f"{path} is a safetensors file but not an asbnn model (no asbnn_format in its metadata)")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path} has model format {version}; this asbnn reads format {FORMAT_VERSION}, "
                              "upgrade asbnn")
    try:
        return {k: v if k in _TEXT_KEYS else json.loads(v) for k, v in raw.items()}
    except json.JSONDecodeError:
        raise CheckpointError(f"{path} has corrupt metadata (a value is not valid JSON)") from None
