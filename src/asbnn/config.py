"""The run configuration: one flat dataclass, loaded from YAML plus `key=value` overrides.

Defaults are the paper's training recipe (Adam, lr 0.01, 200 epochs, lr / 10 at epochs 80, 140
and 180, batch 100, one MC sample, N=5, alpha=0.02, lambda=0.8) with the traps of the authors'
code fixed. The `paper` preset restores those traps for a faithful reproduction:
sigma starts at exp(0.15) ~ 1.16, every adversarial pass updates BatchNorm running statistics,
the KL is scaled by (1 - lambda) and Adam is rebuilt every epoch.

Every field is checked for type and range before any work starts; unknown keys are rejected with
the nearest valid name.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .adversarial import ASConfig
from .data import list_datasets, looks_like_path
from .errors import ConfigError, first_line
from .fileio import atomic_write_text
from .models import list_models
from .posterior import PosteriorConfig

Method = Literal["deterministic", "vi", "as", "mc_dropout"]


@dataclass
class TrainConfig:
    # what to train
    model: str = "resnet20"
    dataset: str = "cifar10"
    method: Method = "as"
    # data
    data_root: str | None = None
    train_subset: int | None = None  # first n training images (small-scale runs)
    test_subset: int | None = None
    augment: bool | None = None  # None: the data set's default
    # optimisation (the paper's recipe)
    epochs: int = 200
    batch_size: int = 100
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: Literal["multistep", "cosine", "constant"] = "multistep"
    lr_milestones: list[int] = field(default_factory=lambda: [80, 140, 180])
    lr_gamma: float = 0.1
    reset_optimizer_each_epoch: bool = False
    # posterior
    sigma_param: Literal["exp", "softplus"] = "exp"
    init_sigma: float = 0.05
    prior_sigma: float = 0.15
    # "paper": the authors' initialisation of the means, as the paper's runs used. The library's
    # PosteriorConfig defaults to "module" instead: a user's own module keeps its own initialisation.
    mu_init: Literal["module", "paper"] = "paper"
    kl_weight: float | None = None  # None: 1 / (100 * N_train), the paper's beta
    init_from: str | None = None  # deterministic run or checkpoint: its weights become the means
    dropout: float = 0.0  # method mc_dropout: rate of the dropout before every conv/linear layer but the first
    # adversarial sampling
    as_steps: int = 5
    as_step_size: float = 0.02
    as_lambda: float = 0.8
    kl_convention: Literal["paper", "authors"] = "paper"  # "paper": eq. 3 (KL unscaled); "authors": x (1 - lambda)
    bn_policy: Literal["freeze", "update"] = "freeze"
    as_variant: Literal["standard", "free"] = "standard"  # free: 1 sign step per training step, 2 passes
    # normalised: sign steps only on the noise of BatchNorm layers and the conv / linear layers feeding one
    as_layers: Literal["all", "normalised"] = "all"
    as_first_epoch: int = 1  # AS from this (1-based) epoch on, plain VI before it: AS only in the last epochs
    as_search_fraction: float = 1.0  # the N sign steps on this share of each batch (L_adv on all of it)
    # run
    seed: int = 42
    device: str = "auto"
    # bf16 autocast for training steps: auto = where a measured step is faster (hardware.py), true = wherever
    # native (CUDA, CPUs with AMX or AVX-512 bf16), false = never; eval stays fp32
    amp: bool | Literal["auto"] = "auto"
    channels_last: bool = False  # NHWC image batches: faster for ResNet-20, slower for VGG on CPU (docs/benchmarks.md)
    compile: bool = False  # torch.compile the training steps (a minute or two of compiling first)
    deterministic: bool = False  # deterministic GPU kernels (slower); CPU runs are always bitwise repeatable
    eval_samples: int = 100
    tensorboard: bool = False  # also write TensorBoard event files (scalars, sigma histograms) to RUN/tensorboard
    nonfinite: Literal["stop", "skip"] = "stop"  # on a NaN/inf loss: stop the run, or skip the step

    def __post_init__(self) -> None:
        validate(self)

    @property
    def bayesian(self) -> bool:
        return self.method in ("vi", "as")

    def posterior_config(self) -> PosteriorConfig:
        return PosteriorConfig(
            sigma_param=self.sigma_param, init_sigma=self.init_sigma,
            prior_sigma=self.prior_sigma, mu_init=self.mu_init,
        )

    def as_config(self) -> ASConfig:
        """The AS settings of this run; method 'vi' is lambda = 0."""
        lam = self.as_lambda if self.method == "as" else 0.0
        return ASConfig(
            steps=self.as_steps, step_size=self.as_step_size, lam=lam,
            kl_convention=self.kl_convention, bn_policy=self.bn_policy, layers=self.as_layers,
            search_fraction=self.as_search_fraction,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: "paper" reproduces the authors' code, traps included (not the paper's text: that is the default).
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "paper": {
        "init_sigma": math.exp(0.15),
        "bn_policy": "update",
        "kl_convention": "authors",
        "reset_optimizer_each_epoch": True,
    },
}


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _check_type(name: str, value: Any, hint: Any) -> Any:
    """Return `value` converted to `hint` where lossless (int -> float), or raise ConfigError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(name, value, option)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [_check_type(name, v, item) for v in value]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if hint is float:
        number = _as_float(value)
        if number is None or not math.isfinite(number):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint}")  # a bug in TrainConfig, not user input


def _as_float(value: Any) -> float | None:
    """`value` as a float if it is a number or the text of one (YAML 1.1 reads `1e-3`, which has no
    dot, as a string); None for anything else, and for an integer too large for a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        return float(value)
    except (ValueError, OverflowError):
        return None


def validate(cfg: TrainConfig) -> None:
    """Type-check every field and check ranges; raises ConfigError with one clear line."""
    for name, hint in _field_types().items():
        setattr(cfg, name, _check_type(name, getattr(cfg, name), hint))
    positive = ["epochs", "batch_size", "eval_samples"]
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name} must be > 0, got {getattr(cfg, name)}")
    for name in ("train_subset", "test_subset"):
        if getattr(cfg, name) is not None and getattr(cfg, name) <= 0:
            raise ConfigError(f"{name} must be > 0 or null, got {getattr(cfg, name)}")
    if cfg.lr <= 0:
        raise ConfigError(f"lr must be > 0, got {cfg.lr}")
    if not 0 <= cfg.seed < 2**64:  # what torch.manual_seed and numpy's SeedSequence both take
        raise ConfigError(f"seed must be in [0, 2**64), got {cfg.seed}")
    if cfg.weight_decay < 0 or not 0 <= cfg.momentum < 1 or not 0 < cfg.lr_gamma <= 1:
        raise ConfigError("need weight_decay >= 0, 0 <= momentum < 1 and 0 < lr_gamma <= 1")
    if cfg.kl_weight is not None and cfg.kl_weight < 0:
        raise ConfigError(f"kl_weight must be >= 0 or null, got {cfg.kl_weight}")
    if any(m <= 0 for m in cfg.lr_milestones) or cfg.lr_milestones != sorted(cfg.lr_milestones):
        raise ConfigError(f"lr_milestones must be increasing positive epochs, got {cfg.lr_milestones}")
    if cfg.model not in list_models():
        raise ConfigError(f"unknown model {cfg.model!r}; valid: {', '.join(list_models())}")
    # a path need not exist: a trained run keeps its config after its data moves (`eval --data`)
    if cfg.dataset not in list_datasets() and not looks_like_path(cfg.dataset):
        raise ConfigError(f"unknown dataset {cfg.dataset!r}; valid: {', '.join(list_datasets())}, "
                          "or the path of an image folder / .tar.gz")
    if cfg.method == "mc_dropout" and not 0 < cfg.dropout < 1:
        raise ConfigError(f"method mc_dropout needs 0 < dropout < 1, got {cfg.dropout}")
    if cfg.method != "mc_dropout" and cfg.dropout != 0:
        raise ConfigError(f"dropout is a setting of method mc_dropout; method {cfg.method} needs dropout 0")
    if cfg.method == "as" and not 1 <= cfg.as_first_epoch <= cfg.epochs:
        raise ConfigError(f"as_first_epoch must be an epoch of the run (1 to epochs = {cfg.epochs}), "
                          f"got {cfg.as_first_epoch}")
    if cfg.method != "as" and cfg.as_first_epoch != 1:
        raise ConfigError(f"as_first_epoch is a setting of method as; method {cfg.method} needs as_first_epoch 1")
    if cfg.as_search_fraction != 1 and not (cfg.method == "as" and cfg.as_variant == "standard"):
        raise ConfigError("as_search_fraction is a setting of standard AS (method as, as_variant standard): free "
                          "AS has no search passes to shrink; leave it at 1")
    cfg.posterior_config()  # PosteriorConfig and ASConfig check their own ranges
    ASConfig(steps=cfg.as_steps, step_size=cfg.as_step_size, lam=cfg.as_lambda, kl_convention=cfg.kl_convention,
             bn_policy=cfg.bn_policy, layers=cfg.as_layers, search_fraction=cfg.as_search_fraction)


#: Keys that change how fast a run goes or what it writes, not what it computes (up to the last bits
#: of rounding): a run may resume with other values.
RESUMABLE_CHANGES = frozenset({"compile", "channels_last", "tensorboard"})


def changed_keys(stored: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """The keys in which a checkpoint's config differs from `cfg`, apart from `RESUMABLE_CHANGES`.
    Keys an older version did not write count as their defaults; keys this version does not know differ."""
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
                for f in dataclasses.fields(TrainConfig)}
    current = cfg.to_dict()
    unknown = sorted(set(stored) - set(current))
    stored = {**defaults, **stored}
    return unknown + [key for key, value in current.items() if key not in RESUMABLE_CHANGES and stored[key] != value]


#: The paper's symbols for its settings, so that `lambda=0.5` or `as_alpha=0.01` finds its key.
PAPER_SYMBOLS = {"as_lambda": "lambda", "as_step_size": "alpha", "as_steps": "N", "prior_sigma": "sigma0",
                 "kl_weight": "beta"}
_SYMBOL_SPELLINGS = {"lambda": "as_lambda", "lam": "as_lambda", "λ": "as_lambda", "alpha": "as_step_size",
                     "α": "as_step_size", "n": "as_steps", "sigma0": "prior_sigma", "sigma_0": "prior_sigma",
                     "σ0": "prior_sigma", "beta": "kl_weight", "β": "kl_weight"}


def suggest_key(key: str) -> str | None:
    """The key an unknown `key` most likely means: by the paper's symbol (with or without `as_`),
    else by spelling; None when nothing is close (3-letter near misses like lam/amp are not)."""
    bare = key.strip().lower().removeprefix("as_")
    if bare in _SYMBOL_SPELLINGS:
        return _SYMBOL_SPELLINGS[bare]
    spellings = {n: n for n in _field_types()} | {n.removeprefix("as_"): n for n in _field_types()}
    close = difflib.get_close_matches(bare, list(spellings), n=1, cutoff=0.7)
    return spellings[close[0]] if close else None


def _check_keys(values: dict[str, Any], source: str) -> None:
    names = list(_field_types())
    for key in values:
        if not isinstance(key, str) or key not in names:
            close = suggest_key(str(key))
            symbol = f" (the paper's {PAPER_SYMBOLS[close]})" if close in PAPER_SYMBOLS else ""
            hint = f"; did you mean '{close}'{symbol}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {key!r} in {source}{hint}")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` strings to a dict; values are parsed as YAML (`5`, `0.1`, `true`, `[1, 2]`)."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except Exception:  # PyYAML's constructors fail in many ways: `!!float` alone, a date 2001-13-01, ...
            raise ConfigError(f"cannot parse the value of override {item!r}") from None
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text: {err}") from None
    try:
        values = yaml.safe_load(text)
    except Exception as err:  # PyYAML's constructors fail in many ways: `!!float` alone, a date 2001-13-01, ...
        raise ConfigError(f"config file {path} is not valid YAML: {first_line(err)}") from None
    if values is None or values == {}:  # all defaults would be days of ResNet-20 on CIFAR-10: surely a mistake
        raise ConfigError(f"config file {path} is empty (or only comments); write the settings of the run "
                          "in it, or start from a shipped config (e.g. asbnn train quickstart)")
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of key: value")
    return values


def make_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    preset: str | None = None,
) -> TrainConfig:
    """Defaults < preset < YAML file < overrides. A file may name its preset with `preset: NAME`."""
    file_values = load_yaml(path) if path is not None else {}
    overrides = dict(overrides or {})
    preset = overrides.pop("preset", None) or preset or file_values.pop("preset", None) or "default"
    file_values.pop("preset", None)
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
    _check_keys(file_values, str(path))
    _check_keys(overrides, "the overrides")
    return TrainConfig(**{**PRESETS[preset], **file_values, **overrides})


def save_yaml(cfg: TrainConfig, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
