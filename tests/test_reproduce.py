"""`asbnn reproduce` at the smoke scale: the whole pipeline, resumability and shared work."""

import dataclasses
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest

import asbnn.experiments.reproduce as reproduce_module
from asbnn.config import make_config
from asbnn.errors import ConfigError
from asbnn.experiments.reproduce import SCALES, is_done, plan, reproduce, run_dir, run_experiment


@pytest.mark.slow  # trains and evaluates every smoke-scale run
def test_smoke_pipeline_writes_every_table_and_never_redoes_a_run(shared_data, tmp_path):
    out = tmp_path / "repro"
    report = reproduce(["all"], "smoke", out, data_root=str(shared_data), progress=False)
    text = report.read_text()
    for heading in ("## Table 1", "### The gain of AS over VI", "## Table 2", "### Equal compute: the fine-tunes",
                    "## Table 3", "## Lambda sweep", "## Training curves", "## Cheaper AS", "## Runs"):
        assert heading in text
    # Table 2 at equal cost: VI fine-tuned 3 epochs (AS's variants are not cheaper at this scale's N = 2)
    # beside the 2-epoch VI (cost 2) and AS (2 x (N + 2) = 8)
    section = text.split("### Equal compute: the fine-tunes")[1].split("\n## ")[0]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines()
             if line.startswith(("| VI, ", "| AS, "))]
    rows = {row[0]: row for row in cells}
    assert rows["VI, 2 epochs"][2] == "2" and rows["VI, 3 epochs"][2] == "3" and rows["AS, 2 epochs"][2] == "8"
    n = len(plan(["all"], "smoke"))
    assert n >= 10 and f"{n} of {n} runs finished" in text
    for plot in ("lambda.png", "curves.png", "sample_accuracies.png", "finetune_cost_lowest.png",
                 "finetune_cost_nll.png"):
        assert (out / "plots" / plot).read_bytes()[:4] == b"\x89PNG"
    experiments = plan(["all"], "smoke")
    stamps = {e.name: (run_dir(out, e) / "done.json").stat().st_mtime_ns for e in experiments}
    reproduce(["all"], "smoke", out, data_root=str(shared_data), progress=False)
    assert stamps == {e.name: (run_dir(out, e) / "done.json").stat().st_mtime_ns for e in experiments}
    # one table alone names its runs its own way (lambda 0.8, not Table 1's AS): still the same runs
    folders = sorted((out / "runs").iterdir())
    lam = plan(["lambda"], "smoke")
    assert {e.name for e in lam} - set(stamps)  # names Table 1 does not use ...
    reproduce(["lambda"], "smoke", out, data_root=str(shared_data), progress=False)
    assert sorted((out / "runs").iterdir()) == folders  # ... found by their keys: nothing trained again
    assert all(stamps[next(e.name for e in experiments if e.key == x.key)] ==
               (run_dir(out, x) / "done.json").stat().st_mtime_ns for x in lam)


def test_runs_are_shared_between_tables_and_keyed_by_config():
    experiments = plan(["table1", "lambda"], "smoke")
    names = [e.name for e in experiments]
    assert len(set(e.key for e in experiments)) == len(experiments)
    vi = next(e for e in experiments if e.name.endswith("-vi-initours-s0"))
    assert vi.tables == {"table1", "lambda"} and vi.columns["lambda"] == 0.0  # lambda 0 is the VI run
    assert not any("lambda0-" in n for n in names)
    two_seeds = plan(["table1"], "smoke", seeds=2)
    assert {e.columns["seed"] for e in two_seeds} == {0, 1}


def test_locks_of_live_workers_are_respected_and_dead_ones_taken_over(shared_data, tmp_path):
    out = tmp_path / "repro"
    exp = next(e for e in plan(["table1"], "smoke") if e.overrides["method"] == "vi")
    folder = run_dir(out, exp)
    folder.mkdir(parents=True)
    (folder / "lock").write_text(f"{socket.gethostname()} {os.getpid()}")  # a live worker (us)
    assert not run_experiment(out, exp, "smoke", str(shared_data), "cpu", progress=False)
    assert not is_done(out, exp)
    (folder / "lock").write_text(f"{socket.gethostname()} 999999999")  # a worker that died
    assert run_experiment(out, exp, "smoke", str(shared_data), "cpu", progress=False)
    assert is_done(out, exp) and not (folder / "lock").exists()


def test_bad_reproduce_arguments(tmp_path):
    with pytest.raises(ConfigError, match="unknown table"):
        reproduce(["table9"], "smoke", tmp_path)
    with pytest.raises(ConfigError, match="unknown scale"):
        reproduce(["table1"], "huge", tmp_path)
    with pytest.raises(ConfigError, match="seeds"):
        reproduce(["table1"], "smoke", tmp_path, seeds=0)


def _in_cross_product(exp, grid) -> bool:
    """A run of the grid's own cells and methods (not an equal-compute arm, a cheaper AS or a sweep cell)."""
    c = exp.columns
    return (c["method"] in grid.methods and c["schedule"] in grid.schedules and c["init_sigma"] in grid.init_sigmas
            and c["model"] in grid.models and "prior_sigma" not in c and "kl_weight" not in c)


@pytest.mark.slow  # trains and evaluates every smoke-scale map run
def test_regime_map_runs_every_cell_under_both_batchnorm_protocols(shared_data, tmp_path):
    grid = SCALES["smoke"].regime_map
    experiments = [e for e in plan(["map"], "smoke") if _in_cross_product(e, grid)]  # the cells' own
    assert len(experiments) == len(grid.models) * len(grid.init_sigmas) * len(grid.schedules) * len(grid.methods)
    assert all(e.protocols == ("running", "recalibrated") and e.ood == ("mnist",) for e in experiments)
    assert [e.columns["method"] for e in experiments[:2]] == ["vi", "vi"]  # every cell's VI first
    own = [e.columns["method"] for e in plan(["map"], "smoke", seeds=2) if _in_cross_product(e, grid)]
    assert own[8:] == 2 * (2 * ["free"] + 2 * ["asnorm"])  # the other variants after all seeds' VI and AS
    assert not any("map" in e.tables for e in plan(["all"], "smoke"))  # all = the paper's tables
    exp = next(e for e in experiments if e.columns["method"] == "free" and e.columns["model"] == "allconv")
    assert exp.overrides["as_variant"] == "free" and exp.overrides["method"] == "as"
    assert run_experiment(tmp_path, exp, "smoke", str(shared_data), "cpu", progress=False)
    run = run_dir(tmp_path, exp) / "run"
    for folder in ("eval", "eval-recalibrated"):
        result = json.loads((run / folder / "eval.json").read_text())
        assert result["num_samples"] == grid.base["eval_samples"] and "mnist" in result["ood"]
    meta = json.loads((run_dir(tmp_path, exp) / "done.json").read_text())
    assert set(meta["eval_seconds"]) == {"running", "recalibrated"}
    assert set(meta["posterior_width"]) == {"conv", "linear", "batchnorm"}
    assert all(w > 0 for w in meta["posterior_width"].values())
    with pytest.raises(ConfigError, match="no regime map"):
        reproduce(["map"], "full", tmp_path)


@pytest.mark.slow  # trains a smoke run and evaluates it five times
def test_a_resumed_worker_reuses_the_evaluations_a_killed_one_finished(shared_data, tmp_path, monkeypatch):
    exp = next(e for e in plan(["map"], "smoke") if e.columns["method"] == "vi" and e.columns["model"] == "lenet5")
    assert run_experiment(tmp_path, exp, "smoke", str(shared_data), "cpu", progress=False)
    run = run_dir(tmp_path, exp) / "run"
    running = json.loads((run / "eval" / "eval.json").read_text())
    evaluated = []
    real = reproduce_module.evaluate_run
    monkeypatch.setattr(reproduce_module, "evaluate_run",
                        lambda *a, **kw: evaluated.append(kw.get("bn_recalibrate", False)) or real(*a, **kw))
    # killed while it wrote the recalibrated evaluation's plots: eval.json there, eval.md not yet
    (run_dir(tmp_path, exp) / "done.json").unlink()
    (run / "eval-recalibrated" / "eval.md").unlink()
    assert run_experiment(tmp_path, exp, "smoke", str(shared_data), "cpu", progress=False)
    assert evaluated == [True]  # only the unfinished protocol again
    meta = json.loads((run_dir(tmp_path, exp) / "done.json").read_text())
    assert meta["eval_seconds"]["running"] == running["timing"]["seconds"]
    # an evaluation older than the checkpoint is of another network: made again
    (run_dir(tmp_path, exp) / "done.json").unlink()
    os.utime(run / "eval" / "eval.json", (1, 1))
    assert run_experiment(tmp_path, exp, "smoke", str(shared_data), "cpu", progress=False)
    assert evaluated == [True, False]
    # a scale that evaluates fast (eval --amp) makes again what the exact evaluation made
    (run_dir(tmp_path, exp) / "done.json").unlink()
    assert run_experiment(tmp_path, dataclasses.replace(exp, fast_eval=True), "smoke", str(shared_data), "cpu",
                          progress=False)
    assert evaluated == [True, False, False, True]
    assert json.loads((run / "eval" / "eval.json").read_text())["timing"]["fast"] is True
    # an evaluation of other sampled networks (a user's `asbnn eval --seed 1` in the run folder) is not reused
    reproduce_module.evaluate_run(run, num_samples=exp.overrides["eval_samples"], seed=1, ood=["mnist"], amp=True,
                                  device="cpu", progress=False)
    (run_dir(tmp_path, exp) / "done.json").unlink()
    assert run_experiment(tmp_path, dataclasses.replace(exp, fast_eval=True), "smoke", str(shared_data), "cpu",
                          progress=False)
    assert evaluated == [True, False, False, True, False, False]  # the user's call, then the running protocol again


def test_run_keys_follow_the_config_and_results_version_not_the_source(monkeypatch):
    before = {e.name: e.key for e in plan(["table1"], "smoke")}
    monkeypatch.setattr(reproduce_module, "code_fingerprint", lambda: "moved-code")
    assert {e.name: e.key for e in plan(["table1"], "smoke")} == before
    monkeypatch.setattr(reproduce_module, "RESULTS_VERSION", reproduce_module.RESULTS_VERSION + 1)
    assert all(before[e.name] != e.key for e in plan(["table1"], "smoke"))


def test_run_keys_of_running_experiments_survive_new_config_fields():
    """Fields added to TrainConfig (dropout) are hashed only when set: these keys were computed before."""
    keys = {e.name: e.key for e in plan(["map"], "cpu", 2)}
    assert keys["map-fashion-mnist-lenet5-multistep-sigma0.05-vi-s0"] == "b57158d5e6d6"
    assert keys["map-fashion-mnist-allconv-multistep-sigma0.15-free-s1"] == "f3cfd18bf95c"
    keys = {e.name: e.key for e in plan(["table2"], "mid")}
    assert keys["cifar10-resnet20-det-s0"] == "8848050a51e7"
    assert keys["cifar10-resnet20-finetune-as-s1"] == "04c7875d05b7"


def test_every_run_key_of_the_running_experiments_survives_amp_auto():
    """`amp: auto` became the default; the cpu map and the mid scale set amp: true, so all their keys
    (not only the sampled ones above) are those computed before, when amp: true was the default."""
    import hashlib

    def digest(experiments):
        return hashlib.sha256(json.dumps(sorted(e.key for e in experiments)).encode()).hexdigest()[:16]

    grid = SCALES["cpu"].regime_map
    map_runs = [e for e in plan(["map"], "cpu", 2) if e.columns["method"] in ("vi", "as", "free")
                and _in_cross_product(e, grid)]  # the sweep cells came later too
    assert len(map_runs) == 24 and digest(map_runs) == "0708c9c7a13cb052"  # the equal-compute arms came later
    assert digest([e for e in plan(["table2"], "mid") if e.tables == {"table2"} or e.name.endswith("-det-s0")]) \
        == "d471e995ee584e8b"  # the deep-ensemble members (det-s1, ...) came later


def test_quickstart_trade_summary_names_each_difference():
    from asbnn.experiments.quickstart import trade_summary

    vi = {"sampled": {"lowest": 0.80, "std": 0.010}, "ensemble": {"accuracy": 0.85, "nll": 0.40},
          "config": {"method": "vi", "as_steps": 5, "as_variant": "standard"}}
    adv = {"sampled": {"lowest": 0.82, "std": 0.004}, "ensemble": {"accuracy": 0.84, "nll": 0.45},
           "config": {"method": "as", "as_steps": 5, "as_variant": "standard"}}
    line = trade_summary(vi, adv, 10.0, 70.0)
    assert "lowest sampled model +2.00 points" in line and "-0.60" in line and "ensemble -1.00" in line
    assert "+0.050 nats" in line and "7x the forward-backward passes (70 s against 10 s" in line
    free = {**adv, "config": {**adv["config"], "as_variant": "free"}}
    assert "2x the forward-backward passes" in trade_summary(vi, free, 10.0, 20.0)


def test_equal_compute_arms_come_after_the_map_and_build_on_their_members():
    grid = SCALES["smoke"].regime_map
    sweep = {(c.model, c.schedule, c.init_sigma, m) for c in grid.sweep_cells for m in c.methods}

    def cell_method(e):
        return e.columns["model"], e.columns["schedule"], e.columns["init_sigma"], e.columns["method"]

    experiments = [e for e in plan(["map"], "smoke")  # the cheaper AS and the sweep cells are planned last
                   if e.columns["method"] not in grid.cheaper_as and cell_method(e) not in sweep]
    methods = [e.columns["method"] for e in experiments]
    arms = ("deterministic", "ensemble", "vi-longer")
    first_arm = min(methods.index(m) for m in arms)
    assert set(methods[:first_arm]) == set(grid.methods) and set(methods[first_arm:]) == set(arms)
    assert methods[first_arm:] == sorted(methods[first_arm:], key=arms.index)  # members, ensembles, VI longer
    dets = [e for e in experiments if e.columns["method"] == "deterministic"]
    assert len(dets) == grid.ensemble_members * len(grid.models) * len(grid.schedules)  # no init sigma
    assert all(e.overrides["method"] == "deterministic" and e.protocols == ("running",) for e in dets)
    for model in grid.models:
        members = [e for e in dets if e.columns["model"] == model]
        assert [e.overrides["seed"] for e in members] == list(range(grid.ensemble_members))
        ensembles = [e for e in experiments if e.columns["method"] == "ensemble" and e.columns["model"] == model]
        assert [len(e.members) for e in ensembles] == list(range(2, grid.ensemble_members + 1))
        assert all(e.members == tuple(members[:len(e.members)]) and e.ood == grid.ood for e in ensembles)
    longer = [e for e in experiments if e.columns["method"] == "vi-longer"]
    assert len(longer) == (len(grid.longer_epochs) * len(grid.models) * len(grid.schedules) * len(grid.init_sigmas)
                           * grid.longer_seeds)
    assert all(e.overrides["method"] == "vi" and e.protocols == ("running", "recalibrated") for e in longer)
    assert {(e.overrides["epochs"], tuple(e.overrides["lr_milestones"])) for e in longer} == {(4, (2, 3, 4))}
    assert len({e.key for e in experiments}) == len(experiments)


def test_a_map_without_the_arms_plans_what_it_did_before_them(monkeypatch):
    """The arms default to nothing; the cpu map adds 7 members x 2 models, 6 ensembles x 2, 2 x 4 VI runs."""
    smoke = SCALES["smoke"]
    before = [(e.name, e.key) for e in plan(["map"], "smoke") if _in_cross_product(e, smoke.regime_map)]
    bare = dataclasses.replace(smoke.regime_map, ensemble_members=0, longer_epochs=(), cheaper_as=(), sweep_cells=())
    monkeypatch.setitem(SCALES, "smoke", dataclasses.replace(smoke, regime_map=bare))
    assert [(e.name, e.key) for e in plan(["map"], "smoke")] == before
    # + 8: AS on normalised layers; + 4: cheaper AS; + 27 + 23: the sweep cells (two of them have one seed);
    # + 6: the prior's sweep cells (one seed); + 2: VI trained longer beside the constant-lr all-conv cell;
    # + 6: the KL weight's sweep cells (one seed)
    assert len(plan(["map"], "cpu", 2)) == 24 + 8 + 14 + 12 + 8 + 4 + 27 + 23 + 6 + 2 + 6


def test_vi_trained_longer_must_be_longer():
    with pytest.raises(ConfigError, match="longer_epochs"):
        dataclasses.replace(SCALES["smoke"].regime_map, longer_epochs=(2,))


def test_training_cost_counts_a_deterministic_step_as_one_pass_and_an_ensemble_as_its_members():
    from asbnn.experiments.map_report import _cost, passes_per_step, training_passes

    config = {"method": "deterministic", "epochs": 5, "train_subset": 20000, "batch_size": 100, "as_steps": 5}
    assert passes_per_step(config) == 1 and training_passes(config) == 1000
    exp = next(e for e in plan(["map"], "smoke") if e.columns["method"] == "ensemble")
    ensemble = {"exp": exp, "evals": {"running": {"method": "deep_ensemble", "members": ["a", "b", "c"],
                                                  "config": config}}}
    assert _cost(ensemble) == 3000


def test_as_on_normalised_layers_only_adds_map_runs(monkeypatch):
    """asnorm came after the map's first 24 runs and its equal-compute arms: it adds 4 cells x seeds runs,
    each seed's after that seed's free AS, and moves no planned run ahead of another or changes its key."""
    planned = plan(["map"], "cpu", 2)
    kept = [(e.name, e.key) for e in planned if e.columns["method"] != "asnorm"]
    new = [e for e in planned if e.columns["method"] == "asnorm"]
    assert len(new) == 8 and all(e.protocols == ("running", "recalibrated") for e in new)
    assert all(e.overrides["method"] == "as" and e.overrides["as_layers"] == "normalised" for e in new)
    assert {e.columns["label"] for e in new} == {"AS, normalised layers"}
    cpu = SCALES["cpu"]
    without = dataclasses.replace(cpu.regime_map, methods=("vi", "as", "free"))
    monkeypatch.setitem(SCALES, "cpu", dataclasses.replace(cpu, regime_map=without))
    assert kept == [(e.name, e.key) for e in plan(["map"], "cpu", 2)]
    methods = [e.columns["method"] for e in planned]
    assert methods[16:32] == 4 * ["free"] + 4 * ["asnorm"] + 4 * ["free"] + 4 * ["asnorm"]


def test_gains_compare_each_as_variant_with_vi_seed_by_seed():
    from asbnn.experiments.map_report import _sigma_text, gains, passes_per_step

    def run(method, seed, lowest, **prior):
        columns = {"model": "lenet5", "schedule": "multistep", "init_sigma": 0.15, "method": method, "seed": seed,
                   "label": reproduce_module.MAP_METHODS[method][0], **prior}
        result = {"sampled": {"lowest": lowest, "mean": lowest + 0.1, "std": 0.01},
                  "ensemble": {"accuracy": lowest + 0.2, "nll": 0.5}}
        return {"exp": reproduce_module.Experiment("x", {}, columns), "evals": {"running": result, "recalibrated": result},
                "meta": {"train_seconds": 7.0 if method != "vi" else 1.0, "posterior_width": {"conv": 0.5}}}

    runs = [run("vi", 0, 0.6), run("vi", 1, 0.6), run("as", 0, 0.1), run("asnorm", 0, 0.65), run("asnorm", 1, 0.7)]
    rows = {r["method"]: r for r in gains(runs)}
    assert set(rows) == {"as", "asnorm"}  # free AS has no runs: no row
    assert rows["as"]["seeds"] == 1 and rows["as"]["lowest_running"] == pytest.approx(-50)
    assert rows["asnorm"]["seeds"] == 2 and rows["asnorm"]["lowest_recalibrated"] == pytest.approx(7.5)
    assert rows["asnorm"]["label"] == "AS, normalised layers" and rows["asnorm"]["cost"] == 7.0
    config = {"method": "as", "as_steps": 5, "as_variant": "standard", "as_layers": "normalised"}
    assert passes_per_step(config) == 7
    # a cell of another prior sigma is a cell of its own: its AS is compared with its own VI, listed after
    wide = [run("vi", 0, 0.8, prior_sigma=1.0), run("as", 0, 0.7, prior_sigma=1.0)]
    rows = gains(runs + wide)
    assert [(r["method"], r["setting"]) for r in rows] == [("as", ()), ("asnorm", ()), ("as", (("prior_sigma", 1.0),))]
    assert rows[0]["lowest_running"] == pytest.approx(-50) and rows[2]["lowest_running"] == pytest.approx(-10)
    # so is a cell of another KL weight, and the init σ column names what the cell moved
    strong = [run("vi", 0, 0.5, kl_weight=5e-5), run("as", 0, 0.55, kl_weight=5e-5)]
    rows = gains(runs + wide + strong)
    assert [r["setting"] for r in rows][2:] == [(("kl_weight", 5e-5),), (("prior_sigma", 1.0),)]
    assert rows[2]["lowest_running"] == pytest.approx(5)
    assert [_sigma_text(r["init_sigma"], r["setting"]) for r in rows][1:] == ["0.15", "0.15, KL weight 5e-05",
                                                                          "0.15, prior 1"]


def test_vi_fine_tuned_longer_builds_on_seed_0s_network_and_keeps_table_2s_keys():
    table2 = {e.name: e for e in plan(["table2"], "mid")}
    longer = [e for e in table2.values() if "table2-cost" in e.tables and not e.members]
    assert sorted(e.overrides["epochs"] for e in longer) == [6, 21]
    for exp in longer:
        assert exp.init_from is table2["cifar10-resnet20-det-s0"] and exp.overrides["method"] == "vi"
        assert exp.protocols == ("running", "recalibrated") and exp.ood == ("tiny-imagenet-val",)
        assert "lr_milestones" not in exp.overrides  # cosine: the schedule stretches with the epochs
    smoke = next(e for e in plan(["table2"], "smoke") if "table2-cost" in e.tables and not e.members)
    assert smoke.overrides["lr_milestones"] == [1, 2, 3]  # multistep: milestones scaled like the map's


def test_table2_fine_tunes_are_evaluated_again_on_every_test_image(shared_data, tmp_path, monkeypatch):
    """A scale with `all_test_images` plans, after every training run, one evaluation-only run per
    fine-tune: its network on the whole test set, keyed apart from it, waiting until it is trained."""
    mid = plan(["table2"], "mid")
    whole = [e for e in mid if "table2-all-test" in e.tables]
    assert [e.evaluates.name for e in whole] == [e.name for e in mid if e.tables == {"table2"}]
    assert mid[-len(whole):] == whole and all(e.ood == () and e.key != e.evaluates.key for e in whole)
    monkeypatch.setitem(SCALES, "smoke", dataclasses.replace(SCALES["smoke"], all_test_images=True))
    planned = plan(["table2"], "smoke")
    exp = next(e for e in planned if "table2-all-test" in e.tables and e.columns["method"] == "vi")
    assert not run_experiment(tmp_path, exp, "smoke", str(shared_data), "cpu", progress=False)  # not trained yet
    for dep in (exp.evaluates.init_from, exp.evaluates):
        assert run_experiment(tmp_path, dep, "smoke", str(shared_data), "cpu", progress=False)
    assert run_experiment(tmp_path, exp, "smoke", str(shared_data), "cpu", progress=False)
    subset = json.loads((run_dir(tmp_path, exp.evaluates) / "run" / "eval" / "eval.json").read_text())
    every = json.loads((run_dir(tmp_path, exp) / "run" / "eval" / "eval.json").read_text())
    assert (subset["num_inputs"], every["num_inputs"]) == (200, 10_000) and every["config"]["test_subset"] is None
    assert every["num_samples"] == subset["num_samples"] == exp.overrides["eval_samples"]
    meta = json.loads((run_dir(tmp_path, exp) / "done.json").read_text())
    assert "--all-test-images" in meta["command"] and set(meta["eval_seconds"]) == {"running"}
    report = reproduce(["table2"], "smoke", tmp_path, report_only=True, progress=False).read_text()
    assert "### The same fine-tunes on the whole test set (10,000 images)" in report


def test_table2_deep_ensembles_of_the_pretraining_recipe_at_their_cost(shared_data, tmp_path, monkeypatch):
    """`pretrain_members` adds deterministic networks of the pretraining recipe (seed 0 is the fine-tunes'
    start) and their deep ensembles to Table 2's equal-compute comparison; `mid-long` is `mid` from a
    longer pretraining, every fine-tune keyed anew (it starts from another network)."""
    mid = plan(["table2"], "mid")
    ensembles = [e for e in mid if e.members]
    assert [e.name for e in ensembles] == ["cifar10-resnet20-ensemble-x2", "cifar10-resnet20-ensemble-x3"]
    start = next(e for e in mid if e.name == "cifar10-resnet20-det-s0")
    assert ensembles[1].members[0] is start and [m.overrides["seed"] for m in ensembles[1].members] == [0, 1, 2]
    assert all(m.overrides["epochs"] == 30 and m.overrides["method"] == "deterministic" for m in ensembles[1].members)
    assert ensembles[0].ood == ("tiny-imagenet-val",) and "table2-cost" in ensembles[0].tables
    long = {e.name: e for e in plan(["table2"], "mid-long")}
    assert long["cifar10-resnet20-det-s0"].overrides["epochs"] == 100 and not any(e.members for e in long.values())
    assert {e.name for e in mid if not e.members and "-det-s1" not in e.name and "-det-s2" not in e.name} == set(long)
    assert not {e.key for e in mid} & {e.key for e in long.values()}
    narrow = plan(["table2"], "mid-narrow", seeds=1)  # the same start, fine-tunes at initial sigma 0.01
    assert narrow[0].key == start.key and [e.overrides.get("init_sigma") for e in narrow] == [None, *[0.01] * 5]
    assert [e.overrides["epochs"] for e in narrow if "table2-cost" in e.tables] == [21, 6]  # VI at AS's passes

    smoke = SCALES["smoke"]
    monkeypatch.setitem(SCALES, "smoke", dataclasses.replace(smoke, pretrain_members=2, all_test_images=True,
                                                             protocols=("running", "recalibrated"), ood=("mnist",),
                                                             base={**smoke.base, "init_sigma": 0.02}))
    planned = plan(["table2"], "smoke")
    pair = next(e for e in planned if e.members)
    assert not run_experiment(tmp_path, pair, "smoke", str(shared_data), "cpu", progress=False)  # members untrained
    wanted = [*pair.members, pair, *(e for e in planned if e.tables & {"table2", "table2-det-all-test"}
                                     and e.columns["method"] in ("deterministic", "vi"))]
    for exp in wanted:
        assert run_experiment(tmp_path, exp, "smoke", str(shared_data), "cpu", progress=False), exp.name
    result = json.loads((run_dir(tmp_path, pair) / "run" / "eval" / "eval.json").read_text())
    members = [json.loads((run_dir(tmp_path, m) / "run" / "eval" / "eval.json").read_text())["ensemble"]["accuracy"]
               for m in pair.members]
    assert result["sampled"]["lowest"] == pytest.approx(min(members))
    report = reproduce(["table2"], "smoke", tmp_path, report_only=True, progress=False).read_text()
    starts = members[0] * 100
    assert "*init ours* starts sigma at 0.02," in report  # the scale's, read from the runs
    assert f"Deterministic starting points: {starts:.2f} % test accuracy; on the whole test set (10,000 images)" \
        in report
    rows = {cells[1]: cells for cells in ([c.strip() for c in line.split("|")] for line in report.splitlines())
            if cells[1:2] in (["deterministic start"], ["deep ensemble (2)"])}
    epochs = pair.members[0].overrides["epochs"]
    assert float(rows["deterministic start"][3]) == 0 and float(rows["deep ensemble (2)"][3]) == epochs
    assert rows["deep ensemble (2)"][4] == f"{100 * result['sampled']['lowest']:.2f}"
    assert rows["deep ensemble (2)"][4:8] == rows["deep ensemble (2)"][8:12]  # one evaluation under both protocols
    assert rows["deep ensemble (2)"][7] == f"{100 * result['ood']['mnist']['total']['auroc']:.2f}"
    second = json.loads((run_dir(tmp_path, pair.members[1]) / "done.json").read_text())["train_seconds"]
    assert rows["deterministic start"][12] == "0" and rows["deep ensemble (2)"][12] == f"{second:.0f}"


def test_cheaper_as_comes_last_in_its_cells_and_moves_no_earlier_run():
    """The cheaper AS arms (one large sign step; AS only in the last epochs) came after the map's 66 runs:
    planned after all of them, in the all-conv network at sigma 0.05 only, under both protocols."""
    from asbnn.experiments.map_report import epoch_passes

    planned = plan(["map"], "cpu", 2)
    cheaper = planned[66:70]
    assert [e.columns["method"] for e in cheaper] == ["as-n1", "as-late"] * 2
    assert all(e.columns["model"] == "allconv" and e.columns["init_sigma"] == 0.05 for e in cheaper)
    assert all(e.protocols == ("running", "recalibrated") for e in cheaper)
    assert {e.columns["method"] for e in planned[:66]}.isdisjoint({"as-n1", "as-late"})
    one_step, late = cheaper[0], cheaper[1]
    assert (one_step.overrides["as_steps"], one_step.overrides["as_step_size"]) == (1, 0.1)
    assert late.overrides["as_first_epoch"] == 4 and late.columns["label"] == "AS from epoch 4"  # the last 2 of 5
    assert planned[0].key == "b57158d5e6d6"  # a run planned before the arms keeps its key
    # cost in passes over the data: AS 5 x 7, one step 5 x 3, late 3 x 1 + 2 x 7
    assert [epoch_passes(make_config(overrides=e.overrides).to_dict()) for e in (one_step, late)] == [15, 17]


def test_sweep_cells_come_after_every_earlier_run_seed_by_seed_and_keep_their_keys(monkeypatch):
    """The sweep (session 7) added cells beyond the cross product: planned after all 88 runs of 3 seeds,
    wave by wave (session 8's after all of session 7's), within a wave seed 0 of every sweep cell before
    any seed 1, and no earlier run moved or re-keyed."""
    cpu = SCALES["cpu"]
    planned = plan(["map"], "cpu", 3)
    monkeypatch.setitem(SCALES, "cpu", dataclasses.replace(
        cpu, regime_map=dataclasses.replace(cpu.regime_map, sweep_cells=())))
    before = [(e.name, e.key) for e in plan(["map"], "cpu", 3)]
    assert len(before) == 88 and [(e.name, e.key) for e in planned[:88]] == before
    sweep = planned[88:]
    cells = cpu.regime_map.sweep_cells
    assert len(sweep) == sum(min(3, cell.seeds) * len(cell.methods) + len(cell.longer_epochs) for cell in cells)
    waves = [wave for wave in sorted({c.wave for c in cells})
             for c in cells if c.wave == wave for _ in range(min(3, c.seeds) * len(c.methods) + len(c.longer_epochs))]
    by_cell = {(c.model, c.schedule, c.init_sigma, c.prior_sigma, c.kl_weight, m): c.wave
               for c in cells for m in (*c.methods, *("vi-longer" for _ in c.longer_epochs))}
    assert [by_cell[e.columns["model"], e.columns["schedule"], e.columns["init_sigma"],
                    e.columns.get("prior_sigma"), e.columns.get("kl_weight"), e.columns["method"]]
            for e in sweep] == waves
    for wave in set(waves):
        seeds = [e.columns["seed"] for e, w in zip(sweep, waves) if w == wave]
        assert seeds == sorted(seeds)
    assert len([e for e in sweep if e.columns["seed"] == 0]) == sum(len(c.methods) + len(c.longer_epochs) for c in cells)
    longer = [e for e in sweep if e.columns["method"] == "vi-longer"]
    assert [(e.overrides["schedule"], e.overrides["epochs"], e.columns["seed"]) for e in longer] == [
        ("constant", 10, 0), ("constant", 35, 0)] and sweep[-8:-6] == longer  # wave 2, before the KL cells
    priors = [e for e in sweep if "prior_sigma" in e.columns]
    assert {e.overrides["prior_sigma"] for e in priors} == {0.05, 1.0} and len(priors) == 6
    assert all("prior_sigma" not in e.overrides for e in sweep if e not in priors)
    kl = [e for e in sweep if "kl_weight" in e.columns]
    assert sweep[-6:] == kl and {e.overrides["kl_weight"] for e in kl} == {1 / 20_000}  # the last wave
    assert [e.name for e in kl[:3]] == [f"map-fashion-mnist-allconv-multistep-sigma0.05-kl5e-05-{m}-s0"
                                        for m in ("vi", "as", "free")]
    assert all("kl_weight" not in e.overrides for e in sweep if e not in kl)
    one_seed = {(c.model, c.schedule, c.init_sigma, m) for c in cells if c.seeds == 1 for m in c.methods}
    assert one_seed and all(e.columns["seed"] == 0 for e in sweep
                            if (e.columns["model"], e.columns["schedule"], e.columns["init_sigma"],
                                e.columns["method"]) in one_seed)
    assert all(e.protocols == ("running", "recalibrated") and e.ood == ("mnist",) for e in sweep)
    lam = [e for e in sweep if e.columns["method"] == "as-l0.2"]
    assert lam and all(e.overrides["as_lambda"] == 0.2 and e.overrides["method"] == "as" for e in lam)
    constant = [e for e in sweep if e.columns["schedule"] == "constant"]
    assert constant and all(e.overrides["schedule"] == "constant" for e in constant)
    assert {e.columns["init_sigma"] for e in sweep} == {0.02, 0.05, 0.15, 0.3}
    from asbnn.experiments.map_report import epoch_passes

    quarter = [e for e in sweep if e.columns["method"] == "as-quarter"]
    assert len(quarter) == 3 and quarter[0].overrides["as_search_fraction"] == 0.25
    assert epoch_passes(make_config(overrides=quarter[0].overrides).to_dict()) == 5 * (5 / 4 + 2)


def test_a_map_with_an_unknown_method_is_refused():
    with pytest.raises(ConfigError, match="unknown map methods"):
        dataclasses.replace(SCALES["smoke"].regime_map,
                            sweep_cells=(reproduce_module.SweepCell("lenet5", "constant", 0.1, ("as-typo",)),))


def test_rank_correlation_orders_like_spearman():
    from asbnn.experiments.map_report import rank_correlation

    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 400]) == pytest.approx(1.0)  # monotone, not linear
    assert rank_correlation([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert rank_correlation([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)
    assert np.isnan(rank_correlation([1, 2], [2, 1]))


def test_table1_from_scratch_with_free_as_under_both_protocols(shared_data, tmp_path, monkeypatch):
    """`mid-scratch` plans Table 1 on CIFAR-10 (VI and free AS, the paper's recipe over 10 epochs) evaluated
    as `mid`; Table 1 then reports both BatchNorm protocols. Scales without a second protocol keep their keys."""
    scratch = plan(["table1"], "mid-scratch")
    assert [e.name for e in scratch] == ["cifar10-resnet20-vi-initours-s0", "cifar10-resnet20-freeas-bnfreeze-initours-s0",
                                         "cifar10-resnet20-vi-initours-s1", "cifar10-resnet20-freeas-bnfreeze-initours-s1"]
    assert all(e.protocols == ("running", "recalibrated") and e.ood == ("tiny-imagenet-val",) for e in scratch)
    config = make_config(overrides=scratch[1].overrides)
    assert (config.epochs, config.lr, config.lr_milestones, config.as_variant) == (10, 0.01, [4, 7, 9], "free")
    published = Path(__file__).resolve().parents[1] / "docs" / "results" / "cpu" / "runs"
    cpu = plan(["table1"], "cpu")  # one protocol, no OOD set: the runs the published cpu study made
    assert len(cpu) == 18 and all((published / f"{e.name}-{e.key}").is_dir() for e in cpu)

    smoke = SCALES["smoke"]
    free = reproduce_module.Variant("as", free=True)
    monkeypatch.setitem(SCALES, "smoke", dataclasses.replace(smoke, variants=(reproduce_module.OURS_VI, free),
                                                             protocols=("running", "recalibrated")))
    text = reproduce(["table1"], "smoke", tmp_path, data_root=str(shared_data), progress=False).read_text()
    section = text.split("## Table 1")[1].split("\n## ")[0]
    assert "### Both BatchNorm protocols" in section
    rows = [line for line in section.split("### Both BatchNorm protocols")[1].splitlines() if line.startswith("| ")]
    assert [[cell.strip() for cell in row.split("|")[1:3]] for row in rows[2:]] == [
        [label, protocol] for label in (reproduce_module.OURS_VI.label, free.label)
        for protocol in ("running", "recalibrated")]
    recal = json.loads((run_dir(tmp_path, plan(["table1"], "smoke")[1]) / "run" / "eval-recalibrated" /
                        "eval.json").read_text())
    assert recal["config"]["as_variant"] == "free"
