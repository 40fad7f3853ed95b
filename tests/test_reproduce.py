"""`asbnn reproduce` at the smoke scale: the whole pipeline, resumability and shared work."""

import os
import socket

import pytest

from asbnn.errors import ConfigError
from asbnn.experiments.reproduce import is_done, plan, reproduce, run_dir, run_experiment


@pytest.mark.slow  # trains and evaluates every smoke-scale run
def test_smoke_pipeline_writes_every_table_and_never_redoes_a_run(shared_data, tmp_path):
    out = tmp_path / "repro"
    report = reproduce(["all"], "smoke", out, data_root=str(shared_data), progress=False)
    text = report.read_text()
    for heading in ("## Table 1", "### The gain of AS over VI", "## Table 2", "## Table 3", "## Lambda sweep",
                    "## Training curves", "## Cheaper AS", "## Runs"):
        assert heading in text
    n = len(plan(["all"], "smoke"))
    assert n >= 10 and f"{n} of {n} runs finished" in text
    for plot in ("lambda.png", "curves.png", "sample_accuracies.png"):
        assert (out / "plots" / plot).read_bytes()[:4] == b"\x89PNG"
    experiments = plan(["all"], "smoke")
    stamps = {e.name: (run_dir(out, e) / "done.json").stat().st_mtime_ns for e in experiments}
    reproduce(["all"], "smoke", out, data_root=str(shared_data), progress=False)
    assert stamps == {e.name: (run_dir(out, e) / "done.json").stat().st_mtime_ns for e in experiments}


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
