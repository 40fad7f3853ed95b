"""A run folder: what `train` writes, what a resume and an evaluation read back.

    config.yaml          the run's TrainConfig
    log.jsonl            one line of metrics per epoch
    checkpoint.pt        written atomically after every epoch
    checkpoint.prev.pt   the one before, which a resume falls back to when checkpoint.pt is damaged
    tensorboard/         event files, with `tensorboard: true`
    eval/, eval-recalibrated/   what `evaluate_run` writes

A new run refuses a folder holding any of these (they are another run's), unless asked to
replace them.

Checkpoints load with `weights_only=True`, so a crafted pickle cannot execute code.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import re
import shutil
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .build import build_network
from .config import TrainConfig, changed_keys, save_yaml
from .data import DatasetInfo, dataset_info
from .dropout import MCDropout
from .errors import CheckpointError, ConfigError, first_line
from .fileio import (
    atomic_write_bytes, atomic_write_text, previous_path, read_jsonl, remove_stale_temps, restore_from, writing,
)
from .hardware import can_resume

CONFIG = "config.yaml"
LOG = "log.jsonl"
CHECKPOINT = "checkpoint.pt"
PREV_CHECKPOINT = previous_path(CHECKPOINT).name
#: Everything a run writes into its folder.
RUN_FILES = (CONFIG, LOG, CHECKPOINT, PREV_CHECKPOINT, "tensorboard", "eval", "eval-recalibrated")
_STATE_KEYS = ("kind", "config", "epoch", "net", "optimizer")


class DamagedCheckpoint(CheckpointError):
    """The file is truncated, corrupt or no checkpoint at all; an older good one may stand in for it.

    A file that would run code is not damaged but unsafe: that stays a plain CheckpointError.
    """


# ---------------------------------------------------------------- the checkpoint file


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write `state` atomically, keeping the checkpoint it replaces as `previous_path(path)`."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue(), keep_previous=True)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`, refusing anything that is not plain data.

    Raises DamagedCheckpoint for a truncated, corrupt or foreign file, and a plain CheckpointError
    for a missing or unreadable one, or one whose pickle names code to run.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about odd pickle protocols; the error says enough
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        blocked = re.search(r"GLOBAL ([\w.]+)", str(err))
        if blocked:
            raise CheckpointError(f"refusing to load {path}: its pickle would import {blocked[1]}, and a "
                                  "checkpoint written by asbnn holds only tensors and plain data") from None
        raise DamagedCheckpoint(f"checkpoint {path} is corrupt or not a checkpoint (unreadable pickle)") from None
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
    except Exception as err:  # torch reports a damaged archive in many ways (RuntimeError, EOFError, ...)
        raise DamagedCheckpoint(f"checkpoint {path} is truncated or corrupt ({type(err).__name__})") from None
    if not isinstance(state, dict):
        raise DamagedCheckpoint(f"checkpoint {path} holds a {type(state).__name__}, not a checkpoint's dict")
    return state


# ---------------------------------------------------------------- what a training checkpoint holds


def checkpoint_state(cfg: TrainConfig, info: DatasetInfo, epoch: int, precision: str, net: nn.Module,
                     optimizer: torch.optim.Optimizer, sampler_state: dict[str, Any] | None) -> dict[str, Any]:
    """The checkpoint of a run after `epoch` epochs: everything a resume needs to go on exactly, and
    the data set's description (`info`, with its classes), so that the run predicts and evaluates
    without reading its training set again, even once that has moved."""
    return {
        "kind": "posterior" if cfg.bayesian else "deterministic",
        "config": cfg.to_dict(), "epoch": epoch, "precision": precision, "data": dataclasses.asdict(info),
        "net": net.state_dict(), "optimizer": optimizer.state_dict(), "sampler": sampler_state,
    }


def stored_info(state: dict[str, Any], path: Path) -> DatasetInfo | None:
    """The data set description a checkpoint holds; None for one written before they held it."""
    data = state.get("data")
    if data is None:
        return None
    try:
        info = DatasetInfo(**data)
        return dataclasses.replace(info, mean=tuple(info.mean), std=tuple(info.std),
                                   classes=None if info.classes is None else tuple(info.classes))
    except TypeError:
        raise DamagedCheckpoint(f"{path} is not an asbnn training checkpoint (bad 'data' entry)") from None


def checkpoint_path(run: str | Path) -> Path:
    """The checkpoint of a run folder, or the checkpoint file named."""
    run = Path(run)
    return run / CHECKPOINT if run.is_dir() else run


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
def restoring(path: Path) -> Iterator[None]:
    """Report tensors that do not fit the network (another version, a foreign file) as one line."""
    try:
        yield
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} does not fit the network it describes: {first_line(err)}") from None


def deterministic_weights(source: str | Path, model_name: str) -> dict[str, Tensor]:
    """The weights of deterministic run `source` (`init_from`), checked to be of model `model_name`."""
    state = load_state(checkpoint_path(source))
    if state.get("kind") != "deterministic":
        raise ConfigError(f"init_from must be a deterministic run; {source} holds a {state.get('kind')} run")
    if state["config"]["model"] != model_name:
        raise ConfigError(f"init_from holds model {state['config']['model']}, this run trains {model_name}")
    return state["net"]


def load_run(run: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, TrainConfig, DatasetInfo]:
    """Rebuild the trained network of a run folder or checkpoint file, in eval mode: a `Posterior`,
    an `MCDropout` (a distribution over dropout masks) or the deterministic model.

    The data set's description comes from the checkpoint; one written before checkpoints held it
    reads the data set (all of it, for an image folder) to describe it again."""
    path = checkpoint_path(run)
    state = load_state(path, device)
    try:
        cfg = TrainConfig(**{**state["config"], "init_from": None})
    except TypeError as err:  # a key this version of TrainConfig does not know
        raise CheckpointError(f"{path} holds a config this version of asbnn cannot read ({err})") from None
    info = stored_info(state, path) or dataset_info(cfg.dataset)
    net = build_network(cfg, info).to(device)
    with restoring(path):
        net.load_state_dict(state["net"])
    if cfg.method == "mc_dropout":  # evaluated, predicted and exported as sampled networks
        net = MCDropout(net)
    return net.eval(), cfg, info


# ---------------------------------------------------------------- starting and resuming a run


def run_files(out: Path) -> list[str]:
    """The names of the files and folders of a run in `out` (none for a new or empty folder)."""
    return [name for name in RUN_FILES if (out / name).exists() or (out / name).is_symlink()]


def start_run(out: Path, cfg: TrainConfig) -> None:
    """Make `out` the folder of a new run: its config, and nothing of an older one (no log, evaluation
    or previous checkpoint to fall back to); files that are not a run's stay."""
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
        for name in run_files(out):
            path = out / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        save_yaml(cfg, out / CONFIG)


def remove_leftovers(out: Path) -> None:
    """The temporary files a killed run left in `out`."""
    if out.is_dir():
        remove_stale_temps(out, CHECKPOINT, PREV_CHECKPOINT, LOG)


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
        # checkpoints before 2026-11-27 do not say
        if "precision" in state and not can_resume(device, cfg.amp, state["precision"]):
            raise CheckpointError(f"{out} trained in {state['precision']}, and this machine would not continue it in "
                                  f"{state['precision']} (amp: {cfg.amp}; bf16 runs where CUDA, AMX or AVX-512 bf16 "
                                  "has it); resume it on a machine like the one that started it")
        if path == prev:
            problem = damaged[0] if damaged else f"{ckpt} is missing"
            print(f"asbnn: warning: {problem}; resuming from {prev} (epoch {state['epoch']})", file=sys.stderr)
            restore_from(prev, ckpt)
        return state
    if damaged:
        raise CheckpointError(f"{damaged[0]}; no good previous checkpoint to fall back to"
                              + (f" ({damaged[1]})" if len(damaged) > 1 else ""))
    return None


def truncate_log(out: Path, epochs: int) -> None:
    """Keep the log lines of the first `epochs` epochs: later ones are trained again after a resume."""
    kept = [r for r in read_jsonl(out / LOG) if r.get("epoch") in range(1, epochs + 1)]
    atomic_write_text(out / LOG, "".join(json.dumps(r) + "\n" for r in kept))


def tensorboard_writer(run: Path) -> Any:
    """A TensorBoard SummaryWriter for RUN/tensorboard (the optional `tensorboard` package)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("tensorboard: true needs the tensorboard package (pip install tensorboard)") from None
    return SummaryWriter(str(run / "tensorboard"))
