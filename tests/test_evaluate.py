"""Sampled-model evaluation on a real (small) trained run: consistency, determinism and outputs."""

import json

import pytest
import torch

from asbnn import metrics
from asbnn.config import make_config
from asbnn.build import build_data
from asbnn.evaluate import sampled_predictions, summarize
from asbnn.results import compare_runs, evaluate_run
from asbnn.runfolder import load_run
from asbnn.train import train


@pytest.fixture(scope="module")
def run(shared_data, tmp_path_factory):
    cfg = make_config(overrides=dict(
        model="lenet5", dataset="fashion-mnist", method="vi", data_root=str(shared_data), epochs=2,
        train_subset=6000, test_subset=600, schedule="constant", eval_samples=8))
    return train(cfg, tmp_path_factory.mktemp("runs") / "vi", progress=False)


@pytest.fixture(scope="module")
def loaded(run):
    net, cfg, _ = load_run(run)
    return net, build_data(cfg, torch.device("cpu")).test


def test_batched_and_looped_evaluation_agree(loaded):
    net, test = loaded
    batched = sampled_predictions(net, test, num_samples=7, seed=3, mode="batched", chunk=3, keep_probs=True)
    looped = sampled_predictions(net, test, num_samples=7, seed=3, mode="loop", chunk=5, keep_probs=True)
    assert torch.equal(batched.sample_correct, looped.sample_correct)
    assert torch.allclose(batched.ensemble_probs, looped.ensemble_probs, atol=1e-5)
    assert torch.allclose(batched.sample_nll, looped.sample_nll, rtol=1e-4)
    # the reductions match the full [K, N, C] tensor
    probs = looped.sample_probs.float()
    assert torch.allclose(probs.mean(0), looped.ensemble_probs, atol=2e-3)
    acc = metrics.per_sample_accuracy(probs, looped.labels) * len(looped.labels)
    assert torch.allclose(acc, looped.sample_correct, atol=2)


def test_bf16_evaluation_is_close_to_fp32(loaded):
    net, test = loaded
    fp32 = sampled_predictions(net, test, num_samples=4, seed=3)
    bf16 = sampled_predictions(net, test, num_samples=4, seed=3, amp=True)
    assert not torch.equal(bf16.ensemble_probs, fp32.ensemble_probs)  # the forward passes really ran in bf16
    assert (bf16.ensemble_probs - fp32.ensemble_probs).abs().max() < 0.05
    assert (bf16.sample_correct - fp32.sample_correct).abs().max() <= 0.01 * len(fp32.labels)
    assert (bf16.ensemble_probs.argmax(1) == fp32.ensemble_probs.argmax(1)).float().mean() > 0.98


def test_same_seed_same_numbers_and_other_seed_other_samples(loaded):
    net, test = loaded
    a = summarize(sampled_predictions(net, test, num_samples=5, seed=1))
    b = summarize(sampled_predictions(net, test, num_samples=5, seed=1))
    c = summarize(sampled_predictions(net, test, num_samples=5, seed=2))
    assert a == b
    assert a["per_sample_accuracy"] != c["per_sample_accuracy"]


def test_summary_is_consistent(loaded):
    net, test = loaded
    s = summarize(sampled_predictions(net, test, num_samples=10, seed=0))
    acc = s["per_sample_accuracy"]
    assert s["sampled"]["lowest"] == min(acc) < s["sampled"]["highest"] == max(acc)
    assert s["sampled"]["lowest"] > 0.5  # a trained network, chance is 0.1
    assert s["selective"]["total"]["0.2"] >= s["selective"]["total"]["0.8"] >= s["ensemble"]["accuracy"] - 1e-9
    u = s["uncertainty"]
    assert u["total"] == pytest.approx(u["aleatoric"] + u["epistemic"], abs=1e-5) and u["epistemic"] > 0


def test_evaluate_run_writes_json_markdown_and_plots(run, shared_data, tmp_path):
    result = evaluate_run(run, num_samples=6, ood=["mnist"], data_root=str(shared_data), out=tmp_path / "eval",
                          progress=False)
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["sampled"] == result["sampled"] and saved["num_samples"] == 6
    assert 0.5 < saved["ood"]["mnist"]["total"]["auroc"] <= 1.0
    assert "| VI s42 |" in (tmp_path / "eval" / "eval.md").read_text()
    for name in ("sample_accuracies", "reliability", "risk_coverage", "ood_mnist", "training_curves"):
        assert (tmp_path / "eval" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_needs_evaluated_runs(run, tmp_path):
    from asbnn.errors import ConfigError

    with pytest.raises(ConfigError, match="asbnn eval"):
        compare_runs([tmp_path], out=tmp_path / "cmp")
    evaluate_run(run, num_samples=3, progress=False)
    text = compare_runs([run, run], out=tmp_path / "cmp")
    assert text.count("VI s42") == 2 and (tmp_path / "cmp" / "sample_accuracies.png").exists()


def test_tensorboard_events_and_csv_export(shared_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_config(overrides=dict(
        model="lenet5", dataset="fashion-mnist", method="vi", data_root=str(shared_data), epochs=2,
        train_subset=1000, test_subset=300, eval_samples=4, tensorboard=True))
    run = train(cfg, tmp_path / "tb", progress=False)
    evaluate_run(run, num_samples=4, progress=False)
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"histograms": 0}).Reload()
    assert [e.step for e in events.Scalars("test_acc")] == [1, 2]
    assert {"sigma", "sampled_model_accuracy"} <= set(events.Tags()["histograms"])
    csv_file = tmp_path / "table.csv"
    compare_runs([run], out=tmp_path / "cmp", csv_path=csv_file)
    header, row = csv_file.read_text().splitlines()[:2]
    assert "sampled.lowest" in header.split(",") and row.startswith("VI s42")


def test_labels_beyond_the_networks_classes_get_a_clear_error(loaded):
    import numpy as np

    from asbnn.data import ArrayDataset, DeviceLoader
    from asbnn.errors import ConfigError

    net, _ = loaded
    data = ArrayDataset(np.zeros((4, 28, 28, 1), np.uint8), np.array([0, 1, 2, 17]), [str(i) for i in range(18)])
    loader = DeviceLoader(data, 4, train=False, mean=(0.5,), std=(0.5,), augment=False)
    with pytest.raises(ConfigError, match="labels go up to 17 but the network has 10 classes"):
        sampled_predictions(net, loader, num_samples=2)


@pytest.mark.parametrize("bf16_seconds, expected", [(0.5, "bf16"), (2.0, "fp32")])
def test_eval_amp_follows_the_precision_policy_of_training(run, tmp_path, monkeypatch, bf16_seconds, expected):
    """`--amp` measures the evaluation's forward pass as `amp: auto` does a training step (the timer
    faked here): bf16 where it is faster; without `--amp`, fp32 and nothing measured."""
    import asbnn.hardware as hardware

    monkeypatch.setenv("ASBNN_PRECISION_CACHE", str(tmp_path / "precision.json"))
    monkeypatch.setattr(hardware, "cpu_features", lambda: frozenset({"avx512_bf16", "avx2"}))
    monkeypatch.setattr(hardware, "time_step", lambda step, bf16, device: bf16_seconds if bf16 else 1.0)
    result = evaluate_run(run, num_samples=2, amp=True, out=tmp_path / "eval", device="cpu", progress=False)
    assert result["timing"]["precision"] == expected
    (key,) = json.loads((tmp_path / "precision.json").read_text())
    assert json.loads(key)["task"] == "eval"
    monkeypatch.setattr(hardware, "time_step", lambda *args: pytest.fail("measured"))
    result = evaluate_run(run, num_samples=2, out=tmp_path / "eval", device="cpu", progress=False)
    assert result["timing"]["precision"] == "fp32"


def test_fast_evaluation_gives_the_exact_numbers_up_to_rounding(loaded):
    """BatchNorm folded, NHWC batches, weights formed once per network: the same predictions."""
    net, test = loaded
    exact = sampled_predictions(net, test, num_samples=4, seed=3, keep_probs=True)
    fast = sampled_predictions(net, test, num_samples=4, seed=3, keep_probs=True, fast=True)
    assert (fast.sample_correct - exact.sample_correct).abs().max() <= 1
    assert torch.allclose(fast.ensemble_probs, exact.ensemble_probs, atol=1e-5)
    assert torch.allclose(fast.mean_probs, exact.mean_probs, atol=1e-5)
    assert torch.allclose(fast.sample_nll, exact.sample_nll, rtol=1e-4)


def test_recheck_recomputes_exactly_the_near_ties_with_one_forward_per_network():
    from asbnn.evaluate import recheck_near_ties

    logits = torch.tensor([[[1.0, 0.95, 0.0], [2.0, 0.0, 0.0], [0.5, 0.4, 0.7], [3.0, 1.0, 0.0]],
                           [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0], [4.0, 0.0, 0.0]],
                           [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0], [2.0, 2.0, 2.0]]]).bfloat16()
    top2 = logits.float().topk(2, -1).values
    near = top2[..., 0] - top2[..., 1] < 0.5
    images = torch.arange(4.0)[:, None]  # each "image" is its index
    calls = []

    def forward(s: int, x: torch.Tensor) -> torch.Tensor:
        calls.append((s, x[:, 0].tolist()))
        return (100.0 * (s + 1) + x).expand(-1, 3)

    checked, count = recheck_near_ties(logits, images, 0.5, forward)
    assert checked.dtype == torch.float32 and count == int(near.sum())
    assert calls == [(s, near[s].nonzero().flatten().float().tolist()) for s in range(3) if near[s].any()]
    for s, b in near.nonzero().tolist():
        assert torch.equal(checked[s, b], torch.full((3,), 100.0 * (s + 1) + b))
    assert torch.equal(checked[~near], logits.float()[~near])


def test_bf16_with_every_pair_rechecked_gives_the_fp32_predictions(loaded):
    """A huge margin sends every (network, image) pair to fp32: the fp32 predictions, folded or not."""
    net, test = loaded
    for fast in (True, False):
        fp32 = sampled_predictions(net, test, num_samples=3, seed=3, fast=fast)
        checked = sampled_predictions(net, test, num_samples=3, seed=3, fast=fast, amp=True, tau=float("inf"))
        assert checked.rechecked == 3 * len(test.labels)
        assert torch.equal(checked.sample_correct, fp32.sample_correct)
        assert torch.allclose(checked.ensemble_probs, fp32.ensemble_probs, atol=1e-6)
        assert torch.allclose(checked.mean_probs, fp32.mean_probs, atol=1e-6)


def test_dropout_and_deterministic_networks_are_rechecked_too():
    """The other networks `sampled_predictions` runs: MC dropout (sampled masks) and one plain network."""
    import numpy as np

    from asbnn.data import ArrayDataset, DeviceLoader
    from asbnn.dropout import MCDropout
    from asbnn.models import create_model

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    data = ArrayDataset(rng.integers(0, 256, (80, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, 80),
                        [str(i) for i in range(10)])
    loader = DeviceLoader(data, 40, train=False, mean=(0.5,), std=(0.25,), augment=False)
    plain = create_model("lenet5", 10, 1, dropout=0.3)
    for net, k in ((MCDropout(plain), 3), (plain, 1)):
        fp32 = sampled_predictions(net, loader, num_samples=k)
        checked = sampled_predictions(net, loader, num_samples=k, amp=True, tau=float("inf"))
        assert checked.rechecked == k * 80
        assert torch.equal(checked.sample_correct, fp32.sample_correct)
        assert torch.allclose(checked.ensemble_probs, fp32.ensemble_probs, atol=1e-6)


def test_a_zero_margin_rechecks_nothing_the_plain_bf16_evaluation(loaded, monkeypatch):
    import asbnn.evaluate as evaluate

    net, test = loaded
    zero = sampled_predictions(net, test, num_samples=3, seed=3, fast=True, amp=True, tau=0.0)
    monkeypatch.setattr(evaluate, "recheck_near_ties", lambda logits, x, tau, forward: (logits.float(), 0))
    plain = sampled_predictions(net, test, num_samples=3, seed=3, fast=True, amp=True)
    assert zero.rechecked == 0 and summarize(zero) == summarize(plain)


def test_the_default_recheck_gives_the_fp32_accuracies_rechecking_a_few_pairs(loaded):
    """Real data, the measured default margin: some pairs are near-ties, most are not, and every
    sampled network's accuracy (and the posterior mean's) is the fp32 one."""
    net, test = loaded
    fp32 = summarize(sampled_predictions(net, test, num_samples=4, seed=3, fast=True))
    pred = sampled_predictions(net, test, num_samples=4, seed=3, fast=True, amp=True)
    checked = summarize(pred)
    assert 0 < pred.rechecked < 4 * len(test.labels) / 2
    assert checked["per_sample_accuracy"] == fp32["per_sample_accuracy"]
    assert checked["posterior_mean"]["accuracy"] == fp32["posterior_mean"]["accuracy"]
    assert abs(checked["ensemble"]["accuracy"] - fp32["ensemble"]["accuracy"]) <= 2 / len(test.labels)


@pytest.mark.parametrize("model", ["resnet20", "vgg16_bn", "allconv"])
def test_folded_batchnorm_computes_what_the_network_does(model):
    from asbnn.evaluate import folded
    from asbnn.models import create_model
    from asbnn.posterior import Posterior

    torch.manual_seed(0)
    posterior = Posterior(create_model(model, in_channels=3)).eval()
    for m in posterior.model.modules():  # statistics unlike the initial ones, so that folding matters
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    network = folded(posterior)
    assert network is not None and network.pairs and network.fused  # every BatchNorm here follows a convolution
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in network.graph.modules())
    x, eps = torch.randn(4, 3, 32, 32), posterior.sample_eps()
    with torch.no_grad():
        for e in (eps, "mean"):
            expected = posterior(x, e)
            assert torch.allclose(network(x, [network.weights(e)])[0], expected, atol=1e-5 * expected.abs().max())


def test_a_network_fx_cannot_trace_is_evaluated_unfolded():
    from asbnn.evaluate import folded
    from asbnn.posterior import Posterior

    class Branchy(torch.nn.Module):  # control flow on a value: no static graph
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else self.conv(x)

    assert folded(Posterior(Branchy())) is None
