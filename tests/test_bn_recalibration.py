"""Per-sample BatchNorm recalibration: exact statistics, restored state, reproducible evaluation."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from asbnn.bn_recalibration import Recalibration, batchnorms, recalibrated
from asbnn.config import make_config
from asbnn.data import ArrayDataset
from asbnn.errors import ConfigError
from asbnn.build import build_data
from asbnn.evaluate import sampled_predictions, summarize
from asbnn.models import create_model
from asbnn.posterior import Posterior, PosteriorConfig
from asbnn.results import evaluate_run
from asbnn.runfolder import load_run
from asbnn.train import train


def test_statistics_are_those_of_the_sampled_network_on_the_images():
    torch.manual_seed(0)
    posterior = Posterior(create_model("allconv", in_channels=1), PosteriorConfig(init_sigma=0.3))
    eps = posterior.sample_eps(torch.Generator().manual_seed(1))
    batches = [torch.randn(50, 1, 28, 28) for _ in range(3)]
    first_bn = batchnorms(posterior.model)[0]
    trained = (first_bn.running_mean.clone(), first_bn.running_var.clone())
    weights = posterior.weights(eps)
    with recalibrated(posterior, eps, batches):
        assert not posterior.training
        conv = nn.functional.conv2d(torch.cat(batches), weights["convs.0.weight"], padding=1)
        per_batch = conv.split(50)
        mean = torch.stack([b.mean((0, 2, 3)) for b in per_batch]).mean(0)
        var = torch.stack([b.var((0, 2, 3), unbiased=True) for b in per_batch]).mean(0)
        torch.testing.assert_close(first_bn.running_mean, mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(first_bn.running_var, var, rtol=1e-4, atol=1e-5)
    assert torch.equal(first_bn.running_mean, trained[0]) and torch.equal(first_bn.running_var, trained[1])
    assert first_bn.momentum == 0.1


def test_recalibration_settings_are_checked():
    for bad in (dict(batches=0), dict(batch_size=-1), dict(seed=-2), dict(batches=2.5)):
        with pytest.raises(ConfigError, match="recalibration"):
            Recalibration(**bad)
    data = ArrayDataset(np.zeros((30, 4, 4, 1), np.uint8), np.arange(30) % 3, ["a", "b", "c"])
    chosen = Recalibration(batches=2, batch_size=10, seed=5).images(data)
    assert len(chosen) == 20 and np.array_equal(chosen.labels, Recalibration(2, 10, 5).images(data).labels)
    assert len(Recalibration(batches=10, batch_size=10).images(data)) == 30  # small sets are used whole


@pytest.fixture(scope="module")
def wide_run(shared_data, tmp_path_factory):
    """A VI run whose sampled networks spread widely, so running statistics fit them badly."""
    cfg = make_config(overrides=dict(
        model="allconv", dataset="fashion-mnist", method="vi", data_root=str(shared_data), epochs=1,
        train_subset=3000, test_subset=500, schedule="constant", init_sigma=0.15, eval_samples=4))
    return train(cfg, tmp_path_factory.mktemp("runs") / "vi", progress=False)


@pytest.mark.slow  # trains a run and evaluates it under both protocols
def test_recalibrated_evaluation_is_reproducible_and_differs_from_running_statistics(wide_run):
    recal = Recalibration(batches=4, batch_size=100)
    a = evaluate_run(wide_run, num_samples=4, bn_recalibrate=recal, progress=False)
    b = evaluate_run(wide_run, num_samples=4, bn_recalibrate=recal, progress=False)
    running = evaluate_run(wide_run, num_samples=4, progress=False)
    assert a["per_sample_accuracy"] == b["per_sample_accuracy"] and a["ensemble"] == b["ensemble"]
    assert a["per_sample_accuracy"] != running["per_sample_accuracy"]
    saved = json.loads((wide_run / "eval-recalibrated" / "eval.json").read_text())
    assert saved["protocol"]["batchnorm"] == "recalibrated per sampled network"
    assert saved["protocol"]["recalibration_images"] == 400
    assert json.loads((wide_run / "eval" / "eval.json").read_text())["protocol"] == {"batchnorm": "running statistics"}
    # the trained statistics are untouched by the recalibrated evaluation
    net, cfg, _ = load_run(wide_run)
    test = build_data(cfg, torch.device("cpu")).test
    again = sampled_predictions(net, test, num_samples=4)
    assert summarize(again)["per_sample_accuracy"] == running["per_sample_accuracy"]


def test_the_fast_evaluation_folds_each_network_s_own_recalibrated_statistics():
    from asbnn.data import DeviceLoader

    torch.manual_seed(0)
    posterior = Posterior(create_model("allconv", in_channels=3), PosteriorConfig(init_sigma=0.2))
    rng = np.random.default_rng(0)
    data = ArrayDataset(rng.integers(0, 256, (60, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 60),
                        [str(i) for i in range(10)])
    loader = DeviceLoader(data, 30, train=False, mean=(0.5,) * 3, std=(0.25,) * 3, augment=False)
    batches = [torch.randn(20, 3, 32, 32) for _ in range(2)]
    exact = sampled_predictions(posterior, loader, num_samples=3, recalibration=batches)
    fast = sampled_predictions(posterior, loader, num_samples=3, recalibration=batches, fast=True)
    running = sampled_predictions(posterior, loader, num_samples=3, fast=True)
    assert torch.allclose(fast.ensemble_probs, exact.ensemble_probs, atol=1e-5)
    assert torch.allclose(fast.mean_probs, exact.mean_probs, atol=1e-5)
    assert not torch.allclose(running.ensemble_probs, exact.ensemble_probs, atol=1e-3)
    # bf16 with every pair rechecked in fp32: each network's own recalibrated statistics there too
    for way, fp32 in (("fast", fast), ("exact", exact)):
        checked = sampled_predictions(posterior, loader, num_samples=3, recalibration=batches, fast=way == "fast",
                                      amp=True, tau=float("inf"))
        assert torch.equal(checked.sample_correct, fp32.sample_correct)
        assert torch.allclose(checked.ensemble_probs, fp32.ensemble_probs, atol=1e-5)
