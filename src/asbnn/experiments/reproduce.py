"""Reproduce the paper's tables and figures at a chosen scale, as ordinary resumable runs.

Every experiment is a normal training + evaluation run in its own folder,
`OUT/runs/<name>-<key>`, where the key hashes the full config and a fingerprint of the code, so
results from different configs or code versions never mix and a finished run is never redone.
A worker claims a run with an exclusive lock file; several `reproduce` processes on the same
folder (one per GPU, or a job array) share the work, and a lock left by a dead process on this
host is taken over. `report.md` is rewritten from whatever has finished.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import socket
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import make_config
from ..errors import ConfigError
from ..fileio import atomic_write_text, read_jsonl
from ..results import evaluate_run
from ..runfolder import CHECKPOINT, LOG
from ..train import train
from .reproduce_report import write_report

TABLES = ("table1", "table2", "table3", "lambda", "curves", "cheap")
CHEAP_EPOCH_FACTOR = 3  # free AS (2 passes) at 3x the epochs costs about what standard AS (N + 2) does
AUTHORS_SIGMA = math.exp(0.15)


@dataclass(frozen=True)
class Variant:
    """One row of a table: the method and the two settings the paper does not discuss."""

    method: str  # vi | as
    bn_policy: str = "freeze"
    init: str = "ours"  # ours (init_sigma 0.05) | authors (exp(0.15) ~ 1.16)

    def overrides(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method}
        if self.method == "as":
            out["bn_policy"] = self.bn_policy
        if self.init == "authors":
            out["init_sigma"] = AUTHORS_SIGMA
        return out

    @property
    def label(self) -> str:
        name = "VI" if self.method == "vi" else f"VI + AS, BN {self.bn_policy}"
        return f"{name}, init {self.init}"


OURS_VI, OURS_AS = Variant("vi"), Variant("as")
OURS_LAMBDA = 0.8  # the default lambda, written out so that the same run gets the same key
FACTOR_STUDY = (
    OURS_VI, OURS_AS, Variant("as", "update"),
    Variant("vi", init="authors"), Variant("as", init="authors"), Variant("as", "update", "authors"),
)


@dataclass(frozen=True)
class Scale:
    pairs: tuple[tuple[str, str], ...]  # (dataset, model)
    base: dict[str, Any]
    seeds: int
    variants: tuple[Variant, ...]
    lambdas: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    note: str = ""


def _milestones(epochs: int) -> list[int]:
    """The paper's lr drops at epochs 80, 140, 180 of 200, scaled to a shorter schedule."""
    return sorted({max(1, round(epochs * f)) for f in (0.4, 0.7, 0.9)})


SCALES: dict[str, Scale] = {
    "smoke": Scale(
        pairs=(("fashion-mnist", "lenet5"),),
        base=dict(epochs=2, train_subset=400, test_subset=200, eval_samples=4, as_steps=2,
                  lr_milestones=_milestones(2)),
        seeds=1, variants=(OURS_VI, OURS_AS, Variant("as", "update")), lambdas=(0.0, 0.8, 1.0),
        note="seconds; for tests only",
    ),
    "cpu": Scale(
        pairs=(("fashion-mnist", "lenet5"),),
        base=dict(epochs=10, train_subset=10000, lr_milestones=_milestones(10)),
        seeds=3, variants=FACTOR_STUDY,
        note="LeNet-5 on a fixed 10,000-image subset of Fashion-MNIST, 10 epochs (lr / 10 at epochs 4, 7, 9), "
             "full 10,000-image test set, 100 sampled models",
    ),
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


#: Code that only presents results (package-relative paths; a folder counts with all below it):
#: editing it does not make finished runs stale.
PRESENTATION = ("cli.py", "report.py", "results.py", "experiments/")


def code_fingerprint() -> str:
    """A hash of the code that decides results: runs made by other code never count as done."""
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
        wanted = set(TABLES)
    experiments: dict[str, Experiment] = {}

    def add(table: str, name: str, overrides: dict[str, Any], columns: dict[str, Any],
            init_from: Experiment | None = None) -> Experiment:
        exp = Experiment(name, {**scale.base, **overrides}, columns, init_from)
        exp.key = _key(exp)
        exp = experiments.setdefault(exp.key, exp)
        exp.tables.add(table)
        exp.columns.update(columns)
        return exp

    for dataset, model in scale.pairs:
        for seed in range(n_seeds):
            common = {"dataset": dataset, "model": model, "seed": seed}
            cols = {"dataset": dataset, "model": model, "seed": seed}
            if wanted & {"table1", "table3", "curves"}:
                for v in scale.variants:
                    tag = v.method if v.method == "vi" else f"as-bn{v.bn_policy}"
                    add("table1", f"{dataset}-{model}-{tag}-init{v.init}-s{seed}",
                        {**common, **v.overrides()}, {**cols, "variant": v})
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
                det = add("table2-det", f"{dataset}-{model}-det-s{seed}", {**common, "method": "deterministic"}, cols)
                for v in (OURS_VI, OURS_AS):
                    add("table2", f"{dataset}-{model}-finetune-{v.method}-s{seed}", {**common, **v.overrides()},
                        {**cols, "variant": v}, init_from=det)
    return list(experiments.values())


def _key(exp: Experiment) -> str:
    config = make_config(overrides=exp.overrides).to_dict()
    identity = {"config": config, "init_from": exp.init_from.key if exp.init_from else None,
                "code": code_fingerprint()}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def run_dir(out: Path, exp: Experiment) -> Path:
    return out / "runs" / f"{exp.name}-{exp.key}"


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
    """Train and evaluate one experiment unless done or taken; True when it is done afterwards."""
    folder = run_dir(out, exp)
    if is_done(out, exp):
        return True
    if exp.init_from is not None and not is_done(out, exp.init_from):
        return False
    if not _claim(folder):
        return False
    try:
        overrides = {**exp.overrides, "device": device}
        if data_root is not None:
            overrides["data_root"] = data_root
        if exp.init_from is not None:
            overrides["init_from"] = str(run_dir(out, exp.init_from) / "run")
        cfg = make_config(overrides=overrides)
        train_dir = folder / "run"
        began = time.perf_counter()
        train(cfg, train_dir, resume=(train_dir / CHECKPOINT).exists(), progress=progress)
        result = evaluate_run(train_dir, num_samples=cfg.eval_samples, device=device, progress=False)
        log = read_jsonl(train_dir / LOG)
        precision = " and ".join(sorted({r.get("precision", "unknown precision") for r in log}))
        meta = {
            "name": exp.name, "key": exp.key, "tables": sorted(exp.tables), "scale": scale,
            "columns": {k: v.label if isinstance(v, Variant) else v for k, v in exp.columns.items()},
            "code": code_fingerprint(), "machine": f"{machine()}, training steps in {precision}",
            "train_seconds": sum(r["epoch_time"] for r in log), "eval_seconds": result["timing"]["seconds"],
            "this_call_seconds": time.perf_counter() - began,
            "command": f"asbnn train {train_dir / 'config.yaml'} --out {train_dir} --resume",
        }
        atomic_write_text(folder / "done.json", json.dumps(meta, indent=1))
        return True
    finally:
        (folder / "lock").unlink(missing_ok=True)


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, {platform.processor() or platform.system()} (torch {torch.__version__})"


def reproduce(tables: list[str], scale: str, out: str | Path, seeds: int | None = None,
              data_root: str | None = None, device: str = "auto", progress: bool = True) -> Path:
    """Run (or resume, or share with other workers) every run of `tables`, then write the report."""
    unknown = [t for t in tables if t not in (*TABLES, "all")]
    if unknown:
        raise ConfigError(f"unknown table {unknown[0]}; valid: {', '.join((*TABLES, 'all'))}")
    if scale not in SCALES:
        raise ConfigError(f"unknown scale '{scale}'; valid: {', '.join(SCALES)}")
    if seeds is not None and seeds <= 0:
        raise ConfigError(f"--seeds must be > 0, got {seeds}")
    out = Path(out)
    experiments = plan(tables, scale, seeds)
    pending = list(experiments)
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
    wanted = set(TABLES) if "all" in tables else set(tables)
    finished = [(exp, run_dir(out, exp)) for exp in experiments if is_done(out, exp)]
    return write_report(out, wanted, scale, SCALES[scale].note, code_fingerprint(), finished, len(experiments))
