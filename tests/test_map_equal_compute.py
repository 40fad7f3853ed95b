"""The regime map's equal-compute arms at the smoke scale: deterministic networks, their deep
ensembles and VI trained longer, run by `reproduce`, checked against the members, reported and
never redone."""

import json

import pytest
import torch

import asbnn.experiments.reproduce as reproduce_module
from asbnn.build import build_test_loader
from asbnn.experiments.map_report import cost_series, training_passes
from asbnn.experiments.reproduce import plan, reproduce, run_dir
from asbnn.experiments.reproduce_report import _load
from asbnn.runfolder import load_run

pytestmark = pytest.mark.slow  # one module fixture trains and evaluates the whole smoke map (a minute or two)


@pytest.fixture(scope="module")
def smoke_map(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("map")
    report = reproduce(["map"], "smoke", out, data_root=str(shared_data), progress=False)
    return out, report.read_text()


def _of(method):
    return [e for e in plan(["map"], "smoke") if e.columns["method"] == method]


def _eval(out, exp, folder="eval"):
    return json.loads((run_dir(out, exp) / "run" / folder / "eval.json").read_text())


def test_an_ensemble_evaluation_agrees_with_its_members(smoke_map):
    out, _ = smoke_map
    exp = max(_of("ensemble"), key=lambda e: len(e.members))
    result = _eval(out, exp)
    members = [_eval(out, m) for m in exp.members]
    accuracies = [m["ensemble"]["accuracy"] for m in members]  # one deterministic network: its accuracy
    assert result["method"] == "deep_ensemble" and result["num_samples"] == len(exp.members)
    assert result["sampled"]["lowest"] == min(accuracies) and result["sampled"]["highest"] == max(accuracies)
    assert "mnist" in result["ood"]
    # the ensemble recomputed from the members' networks: the mean of their softmax outputs
    probs, labels = [], None
    for member in exp.members:
        net, cfg, info = load_run(run_dir(out, member) / "run", torch.device("cpu"))
        net.eval()
        with torch.no_grad():
            batches = list(build_test_loader(cfg, info, torch.device("cpu")).batches())
            probs.append(torch.cat([net(x).double().softmax(-1) for x, _ in batches]))
        labels = torch.cat([y for _, y in batches])
    mean = torch.stack(probs).mean(0)
    assert result["ensemble"]["accuracy"] == pytest.approx((mean.argmax(1) == labels).double().mean().item())
    nll = -mean[torch.arange(len(labels)), labels].log().mean().item()
    assert result["ensemble"]["nll"] == pytest.approx(nll, abs=1e-4)
    meta = json.loads((run_dir(out, exp) / "done.json").read_text())
    member_seconds = [json.loads((run_dir(out, m) / "done.json").read_text())["train_seconds"] for m in exp.members]
    assert meta["train_seconds"] == pytest.approx(sum(member_seconds))
    assert "--ensemble --ood mnist" in meta["command"]


def test_deterministic_members_use_running_statistics_and_vi_longer_both_protocols(smoke_map):
    out, _ = smoke_map
    member = _of("deterministic")[0]
    assert not (run_dir(out, member) / "run" / "eval-recalibrated").exists()
    assert _eval(out, member)["num_samples"] == 1
    longer = _of("vi-longer")[0]
    for folder in ("eval", "eval-recalibrated"):
        result = _eval(out, longer, folder)
        assert result["config"]["epochs"] == 4 and result["config"]["method"] == "vi"


def test_report_rows_and_equal_compute_lines_of_the_arms(smoke_map):
    out, text = smoke_map
    n = len(plan(["map"], "smoke"))
    assert f"{n} of {n} runs finished" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    for label in ("deterministic", "deep ensemble (2)", "deep ensemble (3)", "VI, 4 epochs"):
        assert sum(f" {label} " in row for row in rows) == 2 * 2  # 2 models, in both protocols' cell tables
    assert sum(" AS, normalised layers " in row for row in rows) == 2 * 2 + 2  # and a gain row per model
    gains = [line for line in text.split("### AS - VI per cell")[1].split("###")[0].splitlines()
             if line.startswith("| ")][2:]  # the rows below the header and its alignment line
    variants = {line.split("|")[4].strip() for line in gains}
    # at equal epochs, against VI; the cheaper AS and lambda 0.2 in the all-conv cell only (AS from the last of 2 epochs)
    assert variants == {"AS", "free AS", "AS, normalised layers", "AS, one step of 0.1", "AS from epoch 2",
                        "AS, lambda 0.2", "AS, search on 1/4 of the batch"}
    assert {line.split("|")[1].strip() for line in gains
            if "one step" in line or "from epoch" in line or "lambda" in line or "1/4" in line} == {"allconv"}
    # the sweep's constant-schedule cell has its own VI to compare AS with
    assert [line.split("|")[4].strip() for line in gains if line.split("|")[2].strip() == "constant"] == ["AS"]
    # AS has 3 cells (2 of the grid, the sweep's one): a rank correlation per predictor and protocol
    predicts = [line for line in text.split("### What predicts the gain")[1].split("###")[0].splitlines()
                if line.startswith("| ")][2:]
    assert [line.split("|")[1].strip() for line in predicts] == ["AS"]
    rhos = [cell.strip() for cell in predicts[0].split("|")[3:-1]]
    assert len(rhos) == 6 and all(r == "–" or -1 <= float(r) <= 1 for r in rhos) and any(r != "–" for r in rhos)
    assert (out / "plots" / "map_gain_vs_vi_bn_lift.png").read_bytes()[:4] == b"\x89PNG"
    for plot in ("map_cost_lowest.png", "map_cost_nll.png"):
        assert (out / "plots" / plot).read_bytes()[:4] == b"\x89PNG"
    assert "deep-ensemble line" in text and "VI trained longer" in text and "`as_layers: normalised`" in text
    runs = _load([(e, run_dir(out, e)) for e in plan(["map"], "smoke")])
    series = cost_series(runs, "recalibrated", ("ensemble", "nll"), 1.0)
    member = _eval(out, _of("deterministic")[0])
    vi = next(r for r in runs if r["exp"].columns["method"] == "vi" and r["exp"].columns["model"] == "lenet5")
    assert series["lenet5, multistep, deep ensemble"][0] == [m * training_passes(member["config"]) for m in (1, 2, 3)]
    vi_cost = training_passes(vi["evals"]["running"]["config"])
    assert series["lenet5, multistep, σ0 0.05, VI longer"][0] == [vi_cost, 2 * vi_cost]  # 4 epochs against 2
    assert series["lenet5, multistep, σ0 0.05, AS normalised layers"][0] == [4 * vi_cost]  # N + 2 = 4 passes, as AS
    # one step: 3 passes a step; AS from epoch 2 of 2: VI's 1 pass in epoch 1, N + 2 = 4 in epoch 2
    assert series["allconv, multistep, σ0 0.05, AS one step"][0] == [3 * vi_cost]
    assert series["allconv, multistep, σ0 0.05, AS late"][0] == [(1 + 4) / 2 * vi_cost]
    assert series["allconv, multistep, σ0 0.05, AS search on 1/4"][0] == [(2 * 0.25 + 2) * vi_cost]  # N = 2 here
    ensemble = next(r for r in runs if r["exp"].name.endswith("lenet5-multistep-ensemble-x3"))
    assert series["lenet5, multistep, deep ensemble"][1][-1] == ensemble["evals"]["running"]["ensemble"]["nll"]  # running stats


def test_a_second_reproduce_call_does_no_work(smoke_map, shared_data, monkeypatch):
    out, _ = smoke_map
    experiments = plan(["map"], "smoke")
    stamps = {e.name: (run_dir(out, e) / "done.json").stat().st_mtime_ns for e in experiments}

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was redone")

    for name in ("train", "evaluate_run", "evaluate_ensemble"):
        monkeypatch.setattr(reproduce_module, name, refuse)
    reproduce(["map"], "smoke", out, data_root=str(shared_data), progress=False)
    assert stamps == {e.name: (run_dir(out, e) / "done.json").stat().st_mtime_ns for e in experiments}
