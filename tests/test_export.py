"""Model files (.safetensors) round-trip exactly and fail with one clear line; eval results as CSV."""

import csv
import io

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from asbnn import CheckpointError, ConfigError, Posterior, PosteriorConfig, make_config
from asbnn.data import dataset_info
from asbnn.data.idx import FASHION_MNIST_CLASSES
from asbnn.evaluate import Predictions, summarize
from asbnn.build import build_network
from asbnn.export import load_model, read_metadata, save_model
from asbnn.results import results_csv


def trained_like(net: nn.Module) -> nn.Module:
    """Move every parameter and buffer off its initial value, so a lost tensor shows in the outputs."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in [*net.parameters(), *net.buffers()]:
            if t.is_floating_point():
                t.add_(0.1 * torch.randn(t.shape, generator=gen)).abs_()
    return net.eval()


@pytest.fixture
def posterior_and_config(shared_data):
    cfg = make_config(overrides=dict(model="lenet5", dataset="fashion-mnist", method="as",
                                     data_root=str(shared_data), sigma_param="softplus"))
    return trained_like(build_network(cfg, dataset_info(cfg.dataset))), cfg


def test_posterior_round_trip_is_exact(tmp_path, posterior_and_config):
    net, cfg = posterior_and_config
    path = save_model(net, tmp_path / "model.safetensors", config=cfg)
    rng = torch.get_rng_state()
    loaded = load_model(path)
    assert torch.equal(torch.get_rng_state(), rng)  # loading leaves the caller's random stream alone
    assert isinstance(loaded, Posterior) and not loaded.training
    assert loaded.config == net.config and loaded.names == net.names
    x = torch.randn(5, 1, 28, 28)
    eps = net.sample_eps(torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x, "mean"), net(x, "mean"))
        assert torch.equal(loaded(x, eps), net(x, eps))
    meta = read_metadata(path)
    assert meta["config"] == cfg.to_dict() and meta["model"] == "lenet5" and meta["dataset"] == "fashion-mnist"
    assert (meta["num_classes"], meta["channels"], meta["image_size"]) == (10, 1, 28)
    assert meta["classes"] == list(FASHION_MNIST_CLASSES) and meta["kind"] == "posterior"
    assert meta["asbnn_version"] and meta["format"] == "pt"


def test_deterministic_round_trip(tmp_path):
    cfg = make_config(overrides=dict(model="lenet5", dataset="cifar10", method="deterministic"))
    net = trained_like(build_network(cfg, dataset_info("cifar10")))
    loaded = load_model(save_model(net, tmp_path / "det.safetensors", config=cfg, classes=list("abcdefghij")))
    assert type(loaded) is type(net) and not loaded.training
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    assert read_metadata(tmp_path / "det.safetensors")["classes"] == list("abcdefghij")


def own_net() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))


def test_own_module_round_trip_needs_the_module(tmp_path):
    net = trained_like(Posterior(own_net(), PosteriorConfig(init_sigma=0.1), exclude=["1.bias"]))
    path = save_model(net, tmp_path / "own.safetensors")
    with pytest.raises(CheckpointError, match=r"outside the model registry; load it in Python with load_model\("):
        load_model(path)
    loaded = load_model(path, model=own_net())
    assert loaded.names == net.names == ["1.weight", "3.weight", "3.bias"]
    x, eps = torch.randn(4, 12), net.sample_eps()
    with torch.no_grad():
        assert torch.equal(loaded(x, eps), net(x, eps))
    with pytest.raises(CheckpointError, match="does not fit the network"):
        load_model(path, model=nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4)))


def test_config_must_match_the_network(tmp_path, posterior_and_config):
    net, cfg = posterior_and_config
    det = make_config(overrides=dict(model="lenet5", dataset="fashion-mnist", method="deterministic"))
    with pytest.raises(ConfigError, match="method deterministic, the network is a posterior"):
        save_model(net, tmp_path / "x.safetensors", config=det)
    with pytest.raises(ConfigError, match="3 class names given for 10 classes"):
        save_model(net, tmp_path / "x.safetensors", config=cfg, classes=["a", "b", "c"])


def test_missing_corrupt_and_foreign_files(tmp_path, posterior_and_config):
    net, cfg = posterior_and_config
    good = save_model(net, tmp_path / "good.safetensors", config=cfg).read_bytes()
    truncated, garbage, foreign = (tmp_path / n for n in ("truncated.safetensors", "garbage.safetensors",
                                                         "foreign.safetensors"))
    truncated.write_bytes(good[: len(good) // 2])
    garbage.write_bytes(b"not a model at all" * 10)
    save_file({"w": torch.zeros(2)}, foreign, metadata={"format": "pt"})
    incomplete = tmp_path / "incomplete.safetensors"
    save_file({"w": torch.zeros(2)}, incomplete, metadata={"asbnn_format": "1", "model": "lenet5"})
    cases = [
        (incomplete, "has incomplete or invalid metadata (KeyError: 'num_classes')"),
        (tmp_path / "missing.safetensors", "model file not found"),
        (truncated, "is not a readable safetensors file"),
        (garbage, "is not a readable safetensors file"),
        (foreign, "not an asbnn model"),
    ]
    for path, message in cases:
        with pytest.raises(CheckpointError) as err:
            load_model(path)
        assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def fake_eval(shift: float, ood: bool) -> dict:
    gen = torch.Generator().manual_seed(int(10 * shift))
    probs = torch.rand(20, 3, generator=gen).softmax(1)
    pred = Predictions(labels=torch.arange(20) % 3, ensemble_probs=probs, aleatoric=torch.full((20,), 0.5),
                       sample_correct=torch.tensor([10.0, 12.0]), sample_nll=torch.tensor([15.0, 14.0]))
    result = {"run": "x", "config": {"seed": 1}, **summarize(pred), "timing": {"seconds": 1.0}}
    if ood:
        result["ood"] = {"mnist": {"total": {"auroc": 0.9}}}
    return result


def test_results_csv():
    text = results_csv({"VI s1": fake_eval(1, ood=False), "VI + AS s1": fake_eval(2, ood=True)})
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["run"] for r in rows] == ["VI s1", "VI + AS s1"]
    assert float(rows[0]["sampled.lowest"]) == 0.5 and float(rows[0]["sampled.highest"]) == pytest.approx(0.6)
    assert rows[0]["ood.mnist.total.auroc"] == "" and float(rows[1]["ood.mnist.total.auroc"]) == 0.9
    assert "ensemble.ece" in rows[0] and "selective.total.0.8" in rows[0]
    assert not any(k.startswith(("config", "timing", "per_sample")) for k in rows[0])


def test_model_without_the_saved_bayesian_parameters(tmp_path):
    net = Posterior(own_net())
    path = save_model(net, tmp_path / "own.safetensors")
    other = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 3)))
    with pytest.raises(CheckpointError, match=r"does not fit the network: it has no parameters 3.bias, 3.weight$"):
        load_model(path, model=other)
