"""Reproduce the paper's tables and figures at a chosen scale, as ordinary resumable runs.

Every experiment is a normal training + evaluation run in its own folder,
`OUT/runs/<name>-<key>`, where the key hashes the full config and a fingerprint of the code, so
results from different configs or code versions never mix and a finished run is never redone.
A worker claims a run with an exclusive lock file; several `reproduce` processes on the same
folder (one per GPU, or a job array) share the work, and a lock left by a dead process on this
host is taken over. `report.md` is rewritten from whatever has finished.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import platform
import socket
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..bn_recalibration import Recalibration
from ..config import TrainConfig, make_config
from ..errors import ConfigError
from ..fileio import atomic_write_text, read_jsonl
from ..posterior import Posterior
from ..results import eval_folder, evaluate_ensemble, evaluate_run
from ..runfolder import CHECKPOINT, LOG, load_run
from ..train import train
from .reproduce_report import write_report

PAPER_TABLES = ("table1", "table2", "table3", "lambda", "curves", "cheap")  # what "all" runs
TABLES = (*PAPER_TABLES, "map")  # map: the regime map of where AS helps (not in the paper)
CHEAP_EPOCH_FACTOR = 3  # free AS (2 passes) at 3x the epochs costs about what standard AS (N + 2) does
AUTHORS_SIGMA = math.exp(0.15)


@dataclass(frozen=True)
class Variant:
    """One row of a table: the method and the two settings the paper does not discuss."""

    method: str  # vi | as
    bn_policy: str = "freeze"
    init: str = "ours"  # ours (init_sigma 0.05) | authors (exp(0.15) ~ 1.16)
    free: bool = False  # free AS (as_variant free): one sign step per training step

    def overrides(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method}
        if self.method == "as":
            out["bn_policy"] = self.bn_policy
        if self.free:
            out["as_variant"] = "free"
        if self.init == "authors":
            out["init_sigma"] = AUTHORS_SIGMA
        return out

    @property
    def label(self) -> str:
        name = "VI" if self.method == "vi" else f"VI + AS, BN {self.bn_policy}"
        return f"{'free ' if self.free else ''}{name}, init {self.init}"


OURS_VI, OURS_AS = Variant("vi"), Variant("as")
OURS_LAMBDA = 0.8  # the default lambda, written out so that the same run gets the same key
FACTOR_STUDY = (
    OURS_VI, OURS_AS, Variant("as", "update"),
    Variant("vi", init="authors"), Variant("as", init="authors"), Variant("as", "update", "authors"),
)


@dataclass(frozen=True)
class SweepCell:
    """A map cell beyond the grid's cross product, one factor moved from a grid cell (initial sigma to
    the ends of its range, the constant schedule, AS's lambda, the prior's sigma): the trend of each
    factor for a fraction of the full product's runs. The map plans the cells wave by wave (cells added
    later come after every run of the earlier ones), within a wave seed 0 of every cell before any
    seed 1; `seeds` (at most the map's --seeds) is 1 where the first seed already settles the comparison."""

    model: str
    schedule: str
    init_sigma: float
    methods: tuple[str, ...] = ("vi", "as", "free")
    seeds: int = 3
    prior_sigma: float | None = None  # None: TrainConfig's (the paper's 0.15)
    kl_weight: float | None = None  # None: TrainConfig's (the paper's 1 / (100 N))
    wave: int = 0
    # VI trained for each of these epochs beside the cell (seed 0), as the grid's `longer_epochs`
    longer_epochs: tuple[int, ...] = ()


@dataclass(frozen=True)
class RegimeMap:
    """The grid of the regime map: what decides how widely VI's sampled networks spread, and how
    AS acts on them. Every run is evaluated under both BatchNorm protocols and against `ood`.

    Two arms put AS's extra training cost beside other ways of spending it (both off by default, so
    a grid without them plans exactly the runs it planned before they existed):
    `ensemble_members` deterministic networks per model and schedule (seeds 0..M-1, the base recipe;
    a deterministic network has no initial sigma, so one set serves every sigma), evaluated alone
    and as deep ensembles of their first 2..M members; and VI trained for each of `longer_epochs`
    (`longer_seeds` seeds per cell), with the lr milestones scaled to the longer schedule.
    Deterministic networks are evaluated with their running statistics only: recalibration is
    for the sampled networks of a posterior."""

    dataset: str
    models: tuple[str, ...]
    init_sigmas: tuple[float, ...]
    schedules: tuple[str, ...]  # multistep (the paper's lr / 10 at 40 / 70 / 90 %) | constant
    methods: tuple[str, ...] = ("vi", "as", "free")  # keys of MAP_METHODS; free: free AS, 2 passes a step
    base: dict[str, Any] = field(default_factory=dict)
    ood: tuple[str, ...] = ()
    note: str = ""
    ensemble_members: int = 0  # deterministic networks per model and schedule: deep ensembles of 2..M
    longer_epochs: tuple[int, ...] = ()  # VI of every cell trained this many epochs (more than base's)
    longer_seeds: int = 1
    # cheaper AS (keys of MAP_METHODS) in the cells where AS helped, (model, initial sigma) at every schedule and
    # seed, planned after everything else
    cheaper_as: tuple[str, ...] = ()
    cheaper_as_cells: tuple[tuple[str, float], ...] = ()
    # cells beyond the cross product (`SweepCell`), planned after everything else, wave by wave
    sweep_cells: tuple[SweepCell, ...] = ()

    def __post_init__(self) -> None:
        methods = {*self.methods, *self.cheaper_as, *(m for cell in self.sweep_cells for m in cell.methods)}
        known = {*MAP_METHODS, "as-late"}  # as-late: `map_method`
        if unknown := sorted(methods - known):
            raise ConfigError(f"unknown map methods {unknown}: choose from {sorted(known)}")
        base_epochs = self.base.get("epochs", TrainConfig.epochs)
        if any(e <= base_epochs for e in self.longer_epochs):
            raise ConfigError(f"longer_epochs {self.longer_epochs} must exceed the base's {base_epochs} epochs: "
                              "VI at the base's epochs is the map's own VI run")


#: The map's methods: label and overrides. asnorm: AS whose sign steps move only the noise of normalised
#: layers (`as_layers`), to test whether LeNet-5's collapse comes from its unnormalised fully connected layers.
MAP_METHODS = {"vi": ("VI", {"method": "vi"}), "as": ("AS", {"method": "as"}),
               "free": ("free AS", {"method": "as", "as_variant": "free"}),
               "asnorm": ("AS, normalised layers", {"method": "as", "as_layers": "normalised"}),
               # cheaper AS: one larger sign step (the same N x alpha = 0.1 as the paper's 5 x 0.02; 3 passes a step)
               "as-n1": ("AS, one step of 0.1", {"method": "as", "as_steps": 1, "as_step_size": 0.1}),
               # lambda: AS's loss mostly on the ordinary sample (the paper's 0.8 puts it on the adversarial one)
               "as-l0.2": ("AS, lambda 0.2", {"method": "as", "as_lambda": 0.2}),
               # cheaper AS: the paper's 5 sign steps on a quarter of each batch (5 x 1/4 + 2 = 3.25 passes a step)
               "as-quarter": ("AS, search on 1/4 of the batch", {"method": "as", "as_search_fraction": 0.25})}
#: a sweep cell's settings in its runs' names: sigma0.05-prior1, sigma0.05-kl5e-05
SETTING_TAGS = {"prior_sigma": "prior", "kl_weight": "kl"}
LATE_AS_SHARE = 0.4  # method as-late (cheaper AS): AS only in the last 40 % of the epochs, plain VI before


def map_method(method: str, epochs: int) -> tuple[str, dict[str, Any]]:
    """A map method's label and overrides for a run of `epochs` (`MAP_METHODS`, and as-late, whose
    first AS epoch depends on them)."""
    if method == "as-late":
        first = epochs - max(1, round(LATE_AS_SHARE * epochs)) + 1
        return f"AS from epoch {first}", {"method": "as", "as_first_epoch": first}
    return MAP_METHODS[method]


@dataclass(frozen=True)
class Scale:
    pairs: tuple[tuple[str, str], ...]  # (dataset, model)
    base: dict[str, Any]
    seeds: int
    variants: tuple[Variant, ...]
    lambdas: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    note: str = ""
    regime_map: RegimeMap | None = None
    # Table 2 (Bayesian fine-tune): the deterministic network's own recipe (else `base`), the
    # methods fine-tuned from it (keys of MAP_METHODS), whether every seed starts from seed 0's
    # network, and how the fine-tunes are evaluated.
    pretrain: dict[str, Any] | None = None
    finetune_methods: tuple[str, ...] = ("vi", "as")
    one_pretrained: bool = False
    protocols: tuple[str, ...] = ("running",)
    ood: tuple[str, ...] = ()
    # Table 2 at equal training cost: seed 0's VI fine-tuned for each of these epochs (more than base's),
    # beside free AS (2 passes a step) and AS (N + 2) at base's epochs
    finetune_longer_epochs: tuple[int, ...] = ()
    # evaluate with `asbnn eval --amp` (bf16 where it pays, each sampled network's near-ties
    # rechecked in fp32: sampled accuracies exact, other metrics within 0.1 point; docs/benchmarks.md)
    # instead of the exact fp32 loop. Not in the run keys: it is how a run is evaluated, recorded in
    # each eval.json (timing.fast), and a finished evaluation is reused only if made the same way.
    fast_eval: bool = False
    # Table 2's fine-tunes evaluated once more on the whole test set (a scale whose runs use a
    # test_subset): an evaluation-only run each, planned after every training run, without OOD sets
    all_test_images: bool = False
    # Table 2 at equal training cost: deterministic networks of the pretraining recipe (seeds 0..M-1;
    # seed 0 is the fine-tunes' start), evaluated as deep ensembles of their first 2..M
    pretrain_members: int = 0


def _milestones(epochs: int) -> list[int]:
    """The paper's lr drops at epochs 80, 140, 180 of 200, scaled to a shorter schedule."""
    return sorted({max(1, round(epochs * f)) for f in (0.4, 0.7, 0.9)})


MID = Scale(
    pairs=(("cifar10", "resnet20"),),
    base=dict(epochs=3, lr=0.001, schedule="cosine", test_subset=2000, amp=True),  # amp: as the cpu map's
    seeds=2, variants=(OURS_VI, OURS_AS),
    pretrain=dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine", epochs=30,
                  batch_size=128, test_subset=2000, amp=True),
    finetune_methods=("vi", "as", "free"), one_pretrained=True,
    protocols=("running", "recalibrated"), ood=("tiny-imagenet-val",), fast_eval=True, all_test_images=True,
    finetune_longer_epochs=(21, 6),  # AS's passes (N + 2 = 7 a step) over 3 epochs first, then free AS's (2)
    # two more 30-epoch networks: deep ensembles of 2 and 3 cost 30 and 60 passes beyond the shared start,
    # about what AS's fine-tune adds (21)
    pretrain_members=3,
    note="the paper's Table 2 protocol on 2 CPU cores: a deterministic ResNet-20 trained on CIFAR-10 (SGD lr 0.1, "
         "momentum 0.9, weight decay 5e-4, cosine, 30 epochs, batch 128), then VI, AS and free AS fine-tunes of "
         "3 epochs each from it (Adam lr 0.001, cosine, init sigma 0.05), every seed from the same network; "
         "100 sampled models on a fixed 2,000-image subset of the test set under both BatchNorm protocols, "
         "2,000 Tiny ImageNet validation images as the OOD set; evaluated with the fast evaluation (eval --amp); "
         "then each seed's VI, AS and free AS fine-tune evaluated again on all 10,000 test images; "
         "deep ensembles of 2 and 3 deterministic ResNet-20s of the same 30-epoch recipe beside them",
)

#: `mid` from a deterministic ResNet-20 trained 100 epochs instead of 30 (86.9 % on the test subset):
#: the >= 90 % start the paper's fine-tunes have; no deep ensembles (a member would cost 100 passes)
MID_LONG = dataclasses.replace(
    MID, pretrain={**MID.pretrain, "epochs": 100}, pretrain_members=0,
    note=MID.note.replace("cosine, 30 epochs", "cosine, 100 epochs").split("; deep ensembles")[0])

#: `mid` with fine-tunes at initial sigma 0.01 instead of 0.05 (a quarter of the start's median |w| in its
#: convolutions, not all of it), from the same deterministic network (the same run key); VI fine-tuned longer
#: beside them as in `mid`
MID_NARROW = dataclasses.replace(
    MID, base={**MID.base, "init_sigma": 0.01}, pretrain_members=0, all_test_images=False,
    note=MID.note.replace("init sigma 0.05", "init sigma 0.01").split("; then each seed's")[0]
    + "; seed 0's VI fine-tuned 21 and 6 epochs too (AS's and free AS's passes)")

#: Table 1 (from scratch) on CIFAR-10 at CPU scale: the paper's recipe (Adam lr 0.01, lr / 10 at 40 / 70 / 90 %)
#: over 10 epochs instead of 200; VI against free AS only (2 passes a step: standard AS, 7, would take about
#: 4 core-hours a seed here, 20-30 minutes an epoch), evaluated as `mid`
MID_SCRATCH = Scale(
    pairs=(("cifar10", "resnet20"),),
    base=dict(epochs=10, lr_milestones=_milestones(10), test_subset=2000, amp=True),
    seeds=2, variants=(OURS_VI, Variant("as", free=True)),
    protocols=("running", "recalibrated"), ood=("tiny-imagenet-val",), fast_eval=True,
    note="the paper's Table 1 protocol on 2 CPU cores: a Bayesian ResNet-20 trained from scratch on CIFAR-10 "
         "with the paper's recipe (Adam lr 0.01, batch 100, init sigma 0.05) over 10 epochs (lr / 10 after "
         "epochs 4, 7 and 9), VI and free AS; 100 sampled models on a fixed 2,000-image subset of the test set "
         "under both BatchNorm protocols, 2,000 Tiny ImageNet validation images as the OOD set; evaluated with "
         "the fast evaluation (eval --amp)",
)

SCALES: dict[str, Scale] = {
    "smoke": Scale(
        pairs=(("fashion-mnist", "lenet5"),),
        base=dict(epochs=2, train_subset=400, test_subset=200, eval_samples=4, as_steps=2,
                  lr_milestones=_milestones(2)),
        seeds=1, variants=(OURS_VI, OURS_AS, Variant("as", "update")), lambdas=(0.0, 0.8, 1.0),
        finetune_longer_epochs=(3,), note="seconds; for tests only",
        regime_map=RegimeMap(
            "fashion-mnist", models=("lenet5", "allconv"), init_sigmas=(0.05,), schedules=("multistep",),
            base=dict(epochs=2, train_subset=400, test_subset=200, eval_samples=3, as_steps=2,
                      lr_milestones=_milestones(2)),
            methods=("vi", "as", "free", "asnorm"), ood=("mnist",), ensemble_members=3, longer_epochs=(4,),
            cheaper_as=("as-n1", "as-late"), cheaper_as_cells=(("allconv", 0.05),),
            sweep_cells=(SweepCell("lenet5", "constant", 0.15, ("vi", "as")),
                         SweepCell("allconv", "multistep", 0.05, ("as-l0.2", "as-quarter"), seeds=1)),
            note="seconds; for tests only"),
    ),
    "cpu": Scale(
        pairs=(("fashion-mnist", "lenet5"),),
        base=dict(epochs=10, train_subset=10000, lr_milestones=_milestones(10)),
        seeds=3, variants=FACTOR_STUDY,
        note="LeNet-5 on a fixed 10,000-image subset of Fashion-MNIST, 10 epochs (lr / 10 at epochs 4, 7, 9), "
             "full 10,000-image test set, 100 sampled models",
        regime_map=RegimeMap(
            "fashion-mnist", models=("lenet5", "allconv"), init_sigmas=(0.05, 0.15),
            schedules=("multistep",), methods=("vi", "as", "free", "asnorm"),
            # Sized to 2 CPU cores: 100 sampled all-conv networks on all 10,000 test images, under two
            # protocols and against MNIST, would take 35 minutes a run; on 2,000 test images 7.
            # amp=True: the default before amp: auto, kept so that runs begun then keep their keys
            base=dict(epochs=5, train_subset=20000, test_subset=2000, lr_milestones=_milestones(5), amp=True),
            ood=("mnist",),
            # at AS's cost: 7 deterministic networks (7 passes a step together), VI at 10 epochs (free AS's
            # 2 passes a step for 5 epochs) and 35 (standard AS's N + 2 = 7)
            ensemble_members=7, longer_epochs=(10, 35), longer_seeds=1,
            # where AS lifted the lowest sampled network most under running statistics (+16 points)
            cheaper_as=("as-n1", "as-late"), cheaper_as_cells=(("allconv", 0.05),),
            # session 7: the constant schedule a new user would try first, the ends of the initial-sigma range,
            # lambda 0.2 where AS helped or collapsed, the search on part of the batch. Seed 0 of every cell
            # first, then the further seeds in this order (the constant schedule first: seed 0 showed AS ahead
            # there). One seed settles LeNet-5 at sigma 0.3 (VI itself stays at chance: ensemble 11.7 %) and
            # lambda 0.2 in LeNet-5 at sigma 0.15 (AS collapses to chance, as with lambda 0.8).
            sweep_cells=(*(SweepCell(model, "constant", sigma)
                           for sigma in (0.05, 0.15) for model in ("lenet5", "allconv")),
                         *(SweepCell(model, "multistep", 0.02) for model in ("lenet5", "allconv")),
                         SweepCell("allconv", "multistep", 0.05, ("as-l0.2",)),
                         SweepCell("allconv", "multistep", 0.05, ("as-quarter",)),
                         SweepCell("allconv", "multistep", 0.3),
                         SweepCell("lenet5", "multistep", 0.3, seeds=1),
                         SweepCell("lenet5", "multistep", 0.15, ("as-l0.2",), seeds=1),
                         # session 8: the prior's sigma (0.15 elsewhere), tight at the initial sigma and wide as
                         # the standard normal prior other BNN libraries default to; one seed each to begin with
                         *(SweepCell("allconv", "multistep", 0.05, prior_sigma=prior, seeds=1, wave=1)
                           for prior in (0.05, 1.0)),
                         # the one cell where AS's worst network led VI's after recalibration in every seed
                         # (+0.9, +0.7, +0.9): VI at AS's 7x and free AS's 2x passes beside it
                         SweepCell("allconv", "constant", 0.05, methods=(), longer_epochs=(10, 35), wave=2),
                         # session 9: the untempered ELBO's KL weight 1 / N (N = 20,000), 100x the paper's, as most
                         # BNN libraries default to: the KL term, 1-8 % of the data term's pull on rho at the
                         # paper's weight (prior_pull.txt), now drives the posterior's width; one seed to begin with
                         *(SweepCell("allconv", "multistep", sigma, kl_weight=1 / 20_000, seeds=1, wave=3)
                           for sigma in (0.05, 0.15))),
            note="LeNet-5 and the all-conv BN network on a fixed 20,000-image subset of Fashion-MNIST, 5 epochs, "
                 "Adam lr 0.01 with lr / 10 after epochs 2 and 4, 100 sampled models on a fixed 2,000-image "
                 "subset of the test set under both BatchNorm protocols, 2,000 MNIST test images as the OOD set; "
                 "methods VI, AS, free AS and AS with its sign steps on the noise of normalised layers only "
                 "(BatchNorm and the convolutions feeding one: as_layers normalised); "
                 "at equal training cost beside them, deep ensembles of 2 to 7 deterministic networks of the same "
                 "recipe (evaluated with running statistics) and VI trained 10 and 35 epochs (one seed); "
                 "in the all-conv network at sigma 0.05, two cheaper AS: one sign step of 0.1 (3 passes a step) "
                 "and AS only in the last 2 epochs; beyond the cross product, VI, AS and free AS at initial sigma "
                 "0.02 and 0.3 and with a constant lr (sigma 0.05 and 0.15), and AS with lambda 0.2 in the "
                 "all-conv sigma 0.05 and LeNet-5 sigma 0.15 cells, and AS with its search on a quarter of each "
                 "batch in the all-conv sigma 0.05 cell; then, in that cell, VI, AS and free AS with the prior's sigma "
                 "at 0.05 and 1 instead of 0.15 (one seed); VI trained 10 and 35 epochs beside the constant-lr "
                 "all-conv sigma 0.05 cell (one seed); and VI, AS and free AS in the all-conv sigma 0.05 and 0.15 "
                 "cells with the KL weight 1 / N = 5e-05 instead of 1 / (100 N) (one seed)"),
    ),
    "mid": MID,
    "mid-long": MID_LONG,
    "mid-narrow": MID_NARROW,
    "mid-scratch": MID_SCRATCH,
    "full": Scale(
        pairs=tuple((d, m) for d in ("cifar10", "cifar100") for m in ("resnet20", "resnet56", "vgg16_bn")),
        base={}, seeds=5, variants=(OURS_VI, OURS_AS),
        note="the paper's settings: 200 epochs, full data, 100 sampled models, 5 seeds",
    ),
}


@dataclass
class Experiment:
    """One training + evaluation run; a run shared by several tables carries all their columns."""

    name: str
    overrides: dict[str, Any]
    columns: dict[str, Any]
    init_from: Experiment | None = None
    tables: set[str] = field(default_factory=set)
    key: str = ""
    protocols: tuple[str, ...] = ("running",)  # BatchNorm protocols of its evaluation; "recalibrated" too
    ood: tuple[str, ...] = ()
    members: tuple[Experiment, ...] = ()  # a deep ensemble of these runs' networks: evaluated, not trained
    fast_eval: bool = False  # the scale's `fast_eval`: evaluated as `asbnn eval --amp` does
    evaluates: Experiment | None = None  # evaluation only: this run's network on the whole test set


#: Raised by hand whenever a change is meant to change results (what a run of a given config computes).
#: Run keys hash the config and this number, not the source files, so moving or refactoring code keeps
#: finished runs; every run records the exact code that made it (`code_fingerprint`), and the report
#: lists each fingerprint it mixes. History: 1 = keyed by source (before 2026-11-29); 2 = this scheme,
#: with evaluation under both BatchNorm protocols where a scale asks for it.
RESULTS_VERSION = 2

#: Code that only presents results (package-relative paths; a folder counts with all below it):
#: editing it does not change the fingerprint.
PRESENTATION = ("cli.py", "report.py", "results.py", "experiments/")


@functools.cache
def code_fingerprint() -> str:
    """A hash of the code that decides results, recorded in every run's done.json. Read once per
    process (first use, at the latest when the first run finishes), so later edits of the files on
    disk are not attributed to a worker that is still running older code."""
    digest = hashlib.sha256()
    root = Path(__file__).parents[1]
    for path in sorted(root.rglob("*.py")):
        name = path.relative_to(root).as_posix()
        if not name.startswith(PRESENTATION):
            digest.update(name.encode() + path.read_bytes())
    return digest.hexdigest()[:10]


def plan(tables: Iterable[str], scale_name: str, seeds: int | None = None) -> list[Experiment]:
    """All runs the requested tables need, dependencies first; shared runs appear once."""
    scale = SCALES[scale_name]
    n_seeds = seeds or scale.seeds
    wanted = set(tables)
    if "all" in wanted:
        wanted = (wanted - {"all"}) | set(PAPER_TABLES)
    experiments: dict[str, Experiment] = {}

    def add(table: str, name: str, overrides: dict[str, Any], columns: dict[str, Any],
            init_from: Experiment | None = None, base: dict[str, Any] | None = None,
            protocols: tuple[str, ...] = ("running",), ood: tuple[str, ...] = (),
            members: tuple[Experiment, ...] = (), evaluates: Experiment | None = None) -> Experiment:
        exp = Experiment(name, {**(scale.base if base is None else base), **overrides}, columns, init_from,
                         protocols=protocols, ood=ood, members=members, fast_eval=scale.fast_eval,
                         evaluates=evaluates)
        exp.key = _key(exp)
        exp = experiments.setdefault(exp.key, exp)
        exp.tables.add(table)
        exp.columns.update(columns)
        return exp

    finetunes: list[Experiment] = []  # Table 2's
    starts: dict[str, Experiment] = {}  # Table 2's deterministic networks the fine-tunes start from
    grid = scale.regime_map
    if "map" in wanted and grid is not None:
        # VI and AS of every cell and seed first (the comparison the map is for), the other variants after
        primary = tuple(m for m in grid.methods if m in ("vi", "as"))
        order = [(seed, method, model, schedule, sigma)
                 for methods in (primary, tuple(m for m in grid.methods if m not in primary))
                 for seed, method, model, schedule, sigma in itertools.product(
                     range(n_seeds), methods, grid.models, grid.schedules, grid.init_sigmas)]

        def add_cell_run(seed: int, method: str, model: str, schedule: str, sigma: float, label: str,
                         overrides: dict[str, Any], prior_sigma: float | None = None,
                         kl_weight: float | None = None) -> None:
            # the prior's sigma and the KL weight only where a sweep cell sets them (else the config's, as before)
            setting = {k: v for k, v in (("prior_sigma", prior_sigma), ("kl_weight", kl_weight)) if v is not None}
            cell = f"sigma{sigma:g}" + "".join(f"-{SETTING_TAGS[k]}{v:g}" for k, v in setting.items())
            add("map", f"map-{grid.dataset}-{model}-{schedule}-{cell}-{method}-s{seed}",
                {"dataset": grid.dataset, "model": model, "schedule": schedule, "init_sigma": sigma,
                 "seed": seed, **setting, **overrides},
                {"model": model, "schedule": schedule, "init_sigma": sigma, "method": method, "label": label,
                 "seed": seed, **setting},
                base=grid.base, protocols=("running", "recalibrated"), ood=grid.ood)

        epochs = grid.base.get("epochs", TrainConfig.epochs)
        for seed, method, model, schedule, sigma in order:
            add_cell_run(seed, method, model, schedule, sigma, *map_method(method, epochs))
        _add_equal_compute_arms(grid, add)
        for seed, method, (model, sigma), schedule in itertools.product(
                range(n_seeds), grid.cheaper_as, grid.cheaper_as_cells, grid.schedules):
            add_cell_run(seed, method, model, schedule, sigma, *map_method(method, epochs))
        for wave in sorted({c.wave for c in grid.sweep_cells}):
            cells = [c for c in grid.sweep_cells if c.wave == wave]
            for seed, cell in itertools.product(range(n_seeds), cells):
                for method in cell.methods if seed < cell.seeds else ():
                    add_cell_run(seed, method, cell.model, cell.schedule, cell.init_sigma,
                                 *map_method(method, epochs), prior_sigma=cell.prior_sigma,
                                 kl_weight=cell.kl_weight)
                for longer in cell.longer_epochs if seed == 0 else ():
                    _add_vi_longer(grid, add, cell.model, cell.schedule, cell.init_sigma, longer, seed)
    for dataset, model in scale.pairs:
        for seed in range(n_seeds):
            common = {"dataset": dataset, "model": model, "seed": seed}
            cols = {"dataset": dataset, "model": model, "seed": seed}
            if wanted & {"table1", "table3", "curves"}:
                for v in scale.variants:
                    tag = v.method if v.method == "vi" else f"{'free' if v.free else ''}as-bn{v.bn_policy}"
                    add("table1", f"{dataset}-{model}-{tag}-init{v.init}-s{seed}",
                        {**common, **v.overrides()}, {**cols, "variant": v}, protocols=scale.protocols,
                        ood=scale.ood)
            if "lambda" in wanted:
                for lam in scale.lambdas:
                    v = OURS_VI if lam == 0 else OURS_AS
                    add("lambda", f"{dataset}-{model}-lambda{lam:g}-s{seed}",
                        {**common, **v.overrides(), "as_lambda": lam if lam > 0 else OURS_LAMBDA}, {**cols, "lambda": lam})
            if "cheap" in wanted:
                epochs = scale.base.get("epochs", 200)
                longer = {"epochs": CHEAP_EPOCH_FACTOR * epochs, "lr_milestones": _milestones(CHEAP_EPOCH_FACTOR * epochs)}
                for label, v, extra in (
                    (f"VI, {epochs} epochs", OURS_VI, {}),
                    (f"AS, {epochs} epochs", OURS_AS, {}),
                    (f"free AS, {epochs} epochs", OURS_AS, {"as_variant": "free"}),
                    (f"free AS, {CHEAP_EPOCH_FACTOR * epochs} epochs", OURS_AS, {"as_variant": "free", **longer}),
                    (f"VI, {CHEAP_EPOCH_FACTOR * epochs} epochs", OURS_VI, longer),
                ):
                    tag = label.replace(", ", "-").replace(" ", "")
                    add("cheap", f"{dataset}-{model}-{tag}-s{seed}", {**common, **v.overrides(), **extra},
                        {**cols, "cheap": label})
            if "table2" in wanted:
                det = _add_pretrained(add, scale, dataset, model, 0 if scale.one_pretrained else seed)
                starts.setdefault(det.key, det)
                for method in scale.finetune_methods:
                    label, overrides = MAP_METHODS[method]
                    variant = OURS_VI if method == "vi" else Variant("as", free=method == "free")
                    finetunes.append(add(
                        "table2", f"{dataset}-{model}-finetune-{method}-s{seed}", {**common, **overrides},
                        {**cols, "variant": variant, "method": method}, init_from=det, protocols=scale.protocols,
                        ood=scale.ood))
                if seed == 0:  # after seed 0's fine-tunes: VI fine-tuned as long as AS's variants cost
                    for epochs in scale.finetune_longer_epochs:
                        longer = {"epochs": epochs}
                        if scale.base.get("schedule", TrainConfig.schedule) == "multistep":
                            longer["lr_milestones"] = _milestones(epochs)
                        add("table2-cost", f"{dataset}-{model}-finetune-vi-e{epochs}-s0",
                            {**common, **MAP_METHODS["vi"][1], **longer},
                            {**cols, "method": "vi-longer", "epochs": epochs}, init_from=det,
                            protocols=scale.protocols, ood=scale.ood)
    for dataset, model in scale.pairs if "table2" in wanted and scale.pretrain_members else ():
        nets = [_add_pretrained(add, scale, dataset, model, seed) for seed in range(scale.pretrain_members)]
        for size in range(2, len(nets) + 1):
            add("table2-cost", f"{dataset}-{model}-ensemble-x{size}", nets[0].overrides,
                {"dataset": dataset, "model": model, "method": "ensemble", "members": size},
                base=scale.pretrain, ood=scale.ood, members=tuple(nets[:size]))
    for det in starts.values() if scale.all_test_images else ():  # is the start as good as the paper's?
        add("table2-det-all-test", f"{det.name}-all-test", det.overrides, dict(det.columns), base=scale.pretrain,
            evaluates=det)
    for run in finetunes if scale.all_test_images else ():
        add("table2-all-test", f"{run.name}-all-test", run.overrides, dict(run.columns), init_from=run.init_from,
            protocols=scale.protocols, evaluates=run)
    return list(experiments.values())


def _add_pretrained(add: Callable[..., Experiment], scale: Scale, dataset: str, model: str, seed: int) -> Experiment:
    """A deterministic network of the scale's pretraining recipe: Table 2's start, or a deep-ensemble member."""
    return add("table2-det", f"{dataset}-{model}-det-s{seed}",
               {"dataset": dataset, "model": model, "seed": seed, "method": "deterministic"},
               {"dataset": dataset, "model": model, "seed": seed, "method": "deterministic"}, base=scale.pretrain)


def _add_equal_compute_arms(grid: RegimeMap, add: Callable[..., Experiment]) -> None:
    """The map's other ways of spending AS's training cost (`RegimeMap`), planned after all the map's
    own runs so that a worker finishes what it began first: the deterministic networks, then their
    deep ensembles, then VI trained longer."""
    members: dict[tuple[str, str], list[Experiment]] = defaultdict(list)
    for seed, model, schedule in itertools.product(range(grid.ensemble_members), grid.models, grid.schedules):
        members[model, schedule].append(add(
            "map", f"map-{grid.dataset}-{model}-{schedule}-det-s{seed}",
            {"dataset": grid.dataset, "model": model, "schedule": schedule, "seed": seed, "method": "deterministic"},
            {"model": model, "schedule": schedule, "init_sigma": None, "method": "deterministic",
             "label": "deterministic", "seed": seed},
            base=grid.base, ood=grid.ood))
    for (model, schedule), nets in members.items():
        for size in range(2, len(nets) + 1):
            add("map", f"map-{grid.dataset}-{model}-{schedule}-ensemble-x{size}", nets[0].overrides,
                {"model": model, "schedule": schedule, "init_sigma": None, "method": "ensemble",
                 "label": f"deep ensemble ({size})", "members": size},
                base=grid.base, ood=grid.ood, members=tuple(nets[:size]))
    for seed, epochs, model, schedule, sigma in itertools.product(
            range(grid.longer_seeds), grid.longer_epochs, grid.models, grid.schedules, grid.init_sigmas):
        _add_vi_longer(grid, add, model, schedule, sigma, epochs, seed)


def _add_vi_longer(grid: RegimeMap, add: Callable[..., Experiment], model: str, schedule: str, sigma: float,
                  epochs: int, seed: int) -> None:
    """A cell's VI trained `epochs` instead of the base's, lr milestones scaled to them."""
    add("map", f"map-{grid.dataset}-{model}-{schedule}-sigma{sigma:g}-vi-e{epochs}-s{seed}",
        {"dataset": grid.dataset, "model": model, "schedule": schedule, "init_sigma": sigma, "seed": seed,
         **MAP_METHODS["vi"][1], "epochs": epochs, "lr_milestones": _milestones(epochs)},
        {"model": model, "schedule": schedule, "init_sigma": sigma, "method": "vi-longer",
         "label": f"VI, {epochs} epochs", "epochs": epochs, "seed": seed},
        base=grid.base, protocols=("running", "recalibrated"), ood=grid.ood)


#: TrainConfig fields added after RESULTS_VERSION 2, with the value that means "not used": a run key
#: hashes such a field only when it is set, so adding the field kept the key of every earlier run.
UNHASHED_DEFAULTS: dict[str, Any] = {"dropout": 0.0, "as_layers": "all", "as_first_epoch": 1,
                                    "as_search_fraction": 1.0}


def _key(exp: Experiment) -> str:
    config = {k: v for k, v in make_config(overrides=exp.overrides).to_dict().items()
              if k not in UNHASHED_DEFAULTS or v != UNHASHED_DEFAULTS[k]}
    identity = {"config": config, "init_from": exp.init_from.key if exp.init_from else None,
                "results_version": RESULTS_VERSION, "protocols": list(exp.protocols)}
    if exp.members:  # a deep ensemble: its members, in order (their number is M); hashed only when set
        identity["members"] = [m.key for m in exp.members]
    if exp.evaluates:  # evaluation only, on the whole test set
        identity["evaluates_on_all_test_images"] = exp.evaluates.key
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def run_dir(out: Path, exp: Experiment) -> Path:
    """OUT/runs/<name>-<key>. A run's name depends on the tables asked for (the AS run of Table 1 is
    lambda 0.8 of the lambda sweep), its key does not: a folder of the same key made under another
    name is this run, so `reproduce lambda` uses what `reproduce all` trained."""
    named = out / "runs" / f"{exp.name}-{exp.key}"
    if named.exists():
        return named
    return next(iter(sorted((out / "runs").glob(f"*-{exp.key}"))), named)


def is_done(out: Path, exp: Experiment) -> bool:
    return (run_dir(out, exp) / "done.json").is_file()


def _claim(folder: Path) -> bool:
    """Take the run's lock; False if a live process holds it. A dead owner's lock is taken over."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / "lock"
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            host, _, pid = lock.read_text().partition(" ") if lock.exists() else ("", "", "")
            if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                lock.unlink(missing_ok=True)
                continue
            return False
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return True
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_experiment(out: Path, exp: Experiment, scale: str, data_root: str | None, device: str,
                   progress: bool) -> bool:
    """Train and evaluate one experiment (or evaluate one deep ensemble) unless done, taken or
    waiting for the runs it builds on; True when it is done afterwards."""
    folder = run_dir(out, exp)
    if is_done(out, exp):
        return True
    needs = [dep for dep in (exp.init_from, exp.evaluates) if dep is not None] + list(exp.members)
    if not all(is_done(out, dep) for dep in needs):
        return False
    if not _claim(folder):
        return False
    try:
        began = time.perf_counter()
        work = _evaluate_ensemble if exp.members else _evaluate_all_test if exp.evaluates else _train_and_evaluate
        made = work(out, exp, data_root, device, progress)
        meta = {
            "name": exp.name, "key": exp.key, "tables": sorted(exp.tables), "scale": scale,
            "columns": {k: v.label if isinstance(v, Variant) else v for k, v in exp.columns.items()},
            "code": code_fingerprint(), **made, "this_call_seconds": time.perf_counter() - began,
        }
        atomic_write_text(folder / "done.json", json.dumps(meta, indent=1))
        return True
    finally:
        (folder / "lock").unlink(missing_ok=True)


def _train_and_evaluate(out: Path, exp: Experiment, data_root: str | None, device: str,
                        progress: bool) -> dict[str, Any]:
    """Train one run (resuming a killed worker's) and evaluate it under each of its protocols;
    what done.json records of it."""
    overrides = {**exp.overrides, "device": device}
    if data_root is not None:
        overrides["data_root"] = data_root
    if exp.init_from is not None:
        overrides["init_from"] = str(run_dir(out, exp.init_from) / "run")
    cfg = make_config(overrides=overrides)
    train_dir = run_dir(out, exp) / "run"
    train(cfg, train_dir, resume=True, progress=progress)  # a killed worker's run goes on
    results = {protocol: _finished_evaluation(train_dir / eval_folder(recalibrated=protocol == "recalibrated"),
                                              train_dir / CHECKPOINT, protocol, cfg.eval_samples, exp.ood,
                                              exp.fast_eval)
               or evaluate_run(train_dir, num_samples=cfg.eval_samples, device=device, progress=False,
                               ood=list(exp.ood), bn_recalibrate=protocol == "recalibrated", amp=exp.fast_eval)
               for protocol in exp.protocols}
    log = read_jsonl(train_dir / LOG)
    return {
        "machine": f"{machine()}, training steps in {_precision(log)}",
        "train_seconds": sum(r["epoch_time"] for r in log),
        "eval_seconds": {protocol: r["timing"]["seconds"] for protocol, r in results.items()},
        "posterior_width": posterior_width(train_dir),
        "command": f"asbnn train {train_dir / 'config.yaml'} --out {train_dir} --resume",
    }


def _finished_evaluation(folder: Path, checkpoint: Path, protocol: str, num_samples: int, ood: tuple[str, ...],
                         fast: bool) -> dict[str, Any] | None:
    """The evaluation in `folder` a killed worker finished before it died (its eval.md, written last, is
    there, and it is newer than the `checkpoint` it evaluated and made the same way: samples, OOD sets,
    fast or exact), so that a resumed worker does not repeat half an hour of sampling; None if there is
    none to reuse."""
    summary, numbers = folder / "eval.md", folder / "eval.json"
    if not (summary.exists() and numbers.exists() and checkpoint.exists()):
        return None
    if numbers.stat().st_mtime < checkpoint.stat().st_mtime:
        return None
    result = json.loads(numbers.read_text())
    recalibration = result.get("protocol", {}).get("recalibration")
    same = (result.get("num_samples") == num_samples and sorted(result.get("ood") or {}) == sorted(ood)
            and result.get("eval_seed", 0) == 0  # (eval.json before eval_seed: the seed was always 0 here)
            and recalibration == (dataclasses.asdict(Recalibration()) if protocol == "recalibrated" else None)
            and result.get("timing", {}).get("fast", False) == fast)
    return result if same else None


def _evaluate_all_test(out: Path, exp: Experiment, data_root: str | None, device: str,
                       progress: bool) -> dict[str, Any]:
    """Evaluate the network of `exp.evaluates` on the whole test set under each protocol of `exp`
    (`asbnn eval --all-test-images`), into this run's folder (RUN/eval, RUN/eval-recalibrated), so the
    report reads it as it reads a run; its training time and posterior width are the evaluated run's."""
    assert exp.evaluates is not None
    source, folder = run_dir(out, exp.evaluates) / "run", run_dir(out, exp) / "run"
    samples = make_config(overrides=exp.overrides).eval_samples
    results = {}
    for protocol in exp.protocols:
        recalibrated = protocol == "recalibrated"
        target = folder / eval_folder(recalibrated=recalibrated)
        results[protocol] = (
            _finished_evaluation(target, source / CHECKPOINT, protocol, samples, exp.ood, exp.fast_eval)
            or evaluate_run(source, num_samples=samples, out=target, data_root=data_root, device=device,
                            progress=False, ood=list(exp.ood), bn_recalibrate=recalibrated, amp=exp.fast_eval,
                            all_test_images=True))
    evaluated = json.loads((run_dir(out, exp.evaluates) / "done.json").read_text())
    flags = " --amp" * exp.fast_eval + "".join(f" --ood {name}" for name in exp.ood)
    return {
        "machine": machine(),
        "train_seconds": evaluated["train_seconds"],
        "eval_seconds": {protocol: r["timing"]["seconds"] for protocol, r in results.items()},
        "posterior_width": evaluated["posterior_width"],
        "command": f"asbnn eval {source} --all-test-images --samples {samples}{flags} --out {folder / 'eval'}"
                   + ("; the same with --bn-recalibrate --out " + str(folder / "eval-recalibrated")
                      if "recalibrated" in exp.protocols else ""),
    }


def _evaluate_ensemble(out: Path, exp: Experiment, data_root: str | None, device: str,
                       progress: bool) -> dict[str, Any]:
    """Evaluate the finished members of `exp` as one deep ensemble (`asbnn eval ... --ensemble`),
    into the files a run's evaluation writes (RUN/eval), so the report reads it as it reads a run.
    Its training time is its members' together: what the ensemble cost to train."""
    members = [run_dir(out, m) / "run" for m in exp.members]
    folder = run_dir(out, exp) / "run"
    result = evaluate_ensemble(members, out=folder, ood=list(exp.ood), data_root=data_root, device=device,
                               progress=False)
    member_meta = [json.loads((run_dir(out, m) / "done.json").read_text()) for m in exp.members]
    logs = [r for run in members for r in read_jsonl(run / LOG)]
    ood = "".join(f" --ood {name}" for name in exp.ood)
    return {
        "machine": f"{machine()}, members' training steps in {_precision(logs)}",
        "train_seconds": sum(m["train_seconds"] for m in member_meta),
        "eval_seconds": {"running": result["timing"]["seconds"]},
        "posterior_width": {},
        "command": f"asbnn eval {' '.join(map(str, members))} --ensemble{ood} --out {folder}",
    }


def _precision(log: list[dict[str, Any]]) -> str:
    """The precisions the training steps of a log ran in: 'bf16', 'fp32', 'bf16 and fp32'."""
    return " and ".join(sorted({r.get("precision", "unknown precision") for r in log}))


def posterior_width(run: Path) -> dict[str, float]:
    """sigma / |mu| of a trained posterior by kind of parameter (mean sigma over mean |mu|): how
    wide the posterior is relative to its weights. Empty for a deterministic run."""
    net, _, _ = load_run(run)
    if not isinstance(net, Posterior):
        return {}
    modules = dict(net.model.named_modules())
    kinds: dict[str, list[Tensor]] = {}
    for name, mu, sigma in zip(net.names, net.mu.detach().split(net.sizes), net.sigma().detach().split(net.sizes)):
        module = modules[name.rpartition(".")[0]]
        kind = "conv" if isinstance(module, nn.modules.conv._ConvNd) else (
            "linear" if isinstance(module, nn.Linear) else
            "batchnorm" if isinstance(module, nn.modules.batchnorm._BatchNorm) else "other")
        kinds.setdefault(kind, []).append(torch.stack([sigma.sum(), mu.abs().sum()]))
    return {kind: float(sum(parts)[0] / sum(parts)[1]) for kind, parts in sorted(kinds.items())}


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"{cpu_name()}, {os.cpu_count()} cores (torch {torch.__version__})"


def cpu_name() -> str:
    """The CPU model and the bf16 features that decide its speed (AMX, AVX-512 bf16), from /proc/cpuinfo."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.machine()} CPU"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 f"{platform.machine()} CPU")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    features = [name for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 bf16"), ("avx2", "AVX2"))
                if flag in flags]
    return f"{model} ({', '.join(features) or 'no AVX2'})"


def reproduce(tables: list[str], scale: str, out: str | Path, seeds: int | None = None,
              data_root: str | None = None, device: str = "auto", progress: bool = True,
              report_only: bool = False) -> Path:
    """Run (or resume, or share with other workers) every run of `tables`, then write the report.

    `report_only` runs nothing: the report is written from the runs that have finished."""
    unknown = [t for t in tables if t not in (*TABLES, "all")]
    if unknown:
        raise ConfigError(f"unknown table {unknown[0]}; valid: {', '.join((*TABLES, 'all'))}")
    if scale not in SCALES:
        raise ConfigError(f"unknown scale '{scale}'; valid: {', '.join(SCALES)}")
    if "map" in tables and SCALES[scale].regime_map is None:
        raise ConfigError(f"scale '{scale}' has no regime map; use --scale cpu (or smoke)")
    if seeds is not None and seeds <= 0:
        raise ConfigError(f"--seeds must be > 0, got {seeds}")
    out = Path(out)
    code_fingerprint()  # the code this process runs, before anything can change on disk
    experiments = plan(tables, scale, seeds)
    pending = [] if report_only else list(experiments)
    while pending:
        progressed = False
        for exp in list(pending):
            if progress and not is_done(out, exp):
                print(f"[{len(experiments) - len(pending) + 1}/{len(experiments)}] {exp.name}", file=sys.stderr)
            if run_experiment(out, exp, scale, data_root, device, progress):
                pending.remove(exp)
                progressed = True
        if pending and not progressed:  # the rest is being run by other workers: wait for them
            time.sleep(10)
    wanted = (set(tables) - {"all"}) | (set(PAPER_TABLES) if "all" in tables else set())
    finished = [(exp, run_dir(out, exp)) for exp in experiments if is_done(out, exp)]
    grid = SCALES[scale].regime_map
    notes = {"paper": SCALES[scale].note, "map": grid.note if grid is not None else ""}
    return write_report(out, wanted, scale, notes, code_fingerprint(), finished, len(experiments), seeds)
