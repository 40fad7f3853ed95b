"""benchmarks/as_search_probe.py: the loss at AS's adversarial sample where a fine-tune starts."""

import importlib.util
import json
from pathlib import Path

import pytest

from asbnn.config import make_config, save_yaml
from asbnn.train import train

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "as_search_probe.py"


def load_script(path: Path = SCRIPT):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_search_raises_the_loss_more_the_wider_the_posterior(shared_data, tmp_path):
    small = {"dataset": "fashion-mnist", "model": "lenet5", "train_subset": 400, "test_subset": 200,
             "data_root": str(shared_data)}
    start = train(make_config(overrides={**small, "method": "deterministic", "epochs": 2}), tmp_path / "det",
                  progress=False)
    script = load_script()
    results = {}
    for sigma in (1e-4, 0.05):
        config = tmp_path / f"finetune-{sigma:g}.yaml"
        save_yaml(make_config(overrides={**small, "method": "as", "init_from": str(start), "init_sigma": sigma}),
                  config)
        results[sigma] = script.probe(*script.posterior_of(str(config), None), 2)
    narrow, wide = results[1e-4], results[0.05]
    assert narrow["loss_mean"] == pytest.approx(wide["loss_mean"])  # the same start, the same batches
    assert narrow["loss_regular"] == pytest.approx(narrow["loss_mean"], abs=1e-2)  # sigma ~ 0: a draw is mu
    assert wide["loss_adversarial"] > wide["loss_regular"] > wide["loss_mean"]
    assert wide["loss_adversarial"] - wide["loss_regular"] > narrow["loss_adversarial"] - narrow["loss_regular"]
    assert all(0 <= r[f"acc_{at}"] <= 1 for r in results.values() for at in ("mean", "regular", "adversarial"))


def test_a_trained_run_is_probed_at_its_posterior_and_a_deterministic_one_refused(shared_data, tmp_path):
    small = {"dataset": "fashion-mnist", "model": "lenet5", "train_subset": 400, "test_subset": 200,
             "data_root": str(shared_data), "epochs": 1}
    script = load_script()
    run = train(make_config(overrides={**small, "method": "vi"}), tmp_path / "vi", progress=False)
    net, cfg = script.posterior_of(str(run), None)
    assert cfg.method == "vi" and net.sigma().mean().item() > 0
    result = script.probe(net, cfg, 2)
    assert result["loss_adversarial"] > result["loss_regular"]
    det = train(make_config(overrides={**small, "method": "deterministic"}), tmp_path / "det", progress=False)
    with pytest.raises(SystemExit, match="holds no posterior"):
        script.posterior_of(str(det), None)


def test_search_cost_is_set_beside_the_gain_cell_by_cell(tmp_path):
    module = load_script(SCRIPT.with_name("as_search_vs_gain.py"))
    probe_output = tmp_path / "probe.txt"
    probe_output.write_text("header\n" + "".join(
        f"map-x-{cell}-vi-s{seed}-{seed:012d} | trained | 0.05 | 5 x 0.02 | 0.3 / 0.3 / 0.5 | 90.0 / {regular} / "
        f"{adversarial}\n" for cell, seed, regular, adversarial in
        (("a", 0, 88.0, 80.0), ("a", 1, 86.0, 82.0), ("b", 0, 80.0, 60.0))))
    assert module.drops(probe_output) == {"map-x-a": [8.0, 4.0], "map-x-b": [20.0]}
    for cell, method, seed, lowest, ensemble in (("a", "vi", 0, 0.5, 0.8), ("a", "as", 0, 0.7, 0.7),
                                                  ("a", "vi", 1, 0.5, 0.8), ("a", "as", 1, 0.6, 0.9),
                                                  ("b", "as", 0, 0.1, 0.1)):  # b has no VI: no gain
        for folder in ("eval", "eval-recalibrated"):
            path = tmp_path / "map" / "runs" / f"map-x-{cell}-{method}-s{seed}-{seed:012d}" / "run" / folder
            path.mkdir(parents=True)
            (path / "eval.json").write_text(json.dumps({"sampled": {"lowest": lowest},
                                                        "ensemble": {"accuracy": ensemble}}))
    gains = module.gains(tmp_path / "map")
    assert set(gains) == {"map-x-a"}
    assert gains["map-x-a"]["lowest recalibrated"] == pytest.approx(15.0)  # (20 + 10) / 2 points
    assert gains["map-x-a"]["ensemble recalibrated"] == pytest.approx(0.0)  # (-10 + 10) / 2
