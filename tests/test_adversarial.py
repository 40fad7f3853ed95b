"""Adversarial Sampling: Algorithm 1 step by step, eq. 3, and the BatchNorm policies."""

import pytest
import torch
import torch.nn.functional as F

from asbnn.adversarial import (
    ASConfig, FreeAdversarialSampler, adversarial_eps, bayes_loss, frozen_bn_stats, normalised_mask,
)
from asbnn.data import load_dataset
from asbnn.errors import ConfigError
from asbnn.models import create_model
from asbnn.posterior import Posterior, PosteriorConfig


@pytest.fixture(scope="module")
def batch(shared_data):
    data = load_dataset("fashion-mnist", "test", shared_data)
    x = torch.tensor(data.images[:64], dtype=torch.float32).permute(0, 3, 1, 2) / 255
    return (x - 0.286) / 0.353, torch.tensor(data.labels[:64])


@pytest.fixture
def posterior():
    torch.manual_seed(0)
    return Posterior(create_model("lenet5", in_channels=1), PosteriorConfig(init_sigma=0.1)).train()


def bn_stats(post):
    return torch.cat([b.flatten().float() for n, b in post.model.named_buffers() if "running" in n])


def test_each_step_moves_eps_by_alpha_and_raises_the_loss(posterior, batch):
    x, y = batch
    eps = posterior.sample_eps(torch.Generator().manual_seed(1))
    losses = []
    with frozen_bn_stats(posterior.model):
        for _ in range(5):
            with torch.no_grad():
                losses.append(F.cross_entropy(posterior(x, eps), y).item())
            leaf = eps.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(posterior(x, leaf), y), leaf)
            new = adversarial_eps(posterior, x, y, eps, steps=1, step_size=0.02)
            moved = (new - eps).abs()
            # every element with a gradient moves by exactly alpha, in the gradient's direction;
            # only weights into dead ReLU units (gradient exactly 0) stay put
            assert torch.allclose(moved[grad != 0], torch.tensor(0.02), atol=1e-6)
            assert torch.equal(torch.sign(new - eps)[moved > 1e-3], torch.sign(grad)[moved > 1e-3])
            assert (grad != 0).float().mean() > 0.5 and torch.all(moved[grad == 0] == 0)
            eps = new
        with torch.no_grad():
            losses.append(F.cross_entropy(posterior(x, eps), y).item())
    assert all(b >= a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] > losses[0]


def test_n_steps_equal_n_single_steps(posterior, batch):
    x, y = batch
    eps = posterior.sample_eps(torch.Generator().manual_seed(2))
    five = adversarial_eps(posterior, x, y, eps, steps=5, step_size=0.02)
    one_by_one = eps
    for _ in range(5):
        one_by_one = adversarial_eps(posterior, x, y, one_by_one, steps=1, step_size=0.02)
    assert torch.allclose(five, one_by_one)


def test_lambda_zero_is_plain_vi(posterior, batch):
    x, y = batch
    vi = bayes_loss(posterior, x, y, kl_weight=1e-4, generator=torch.Generator().manual_seed(3))
    lam0 = bayes_loss(posterior, x, y, kl_weight=1e-4, config=ASConfig(lam=0.0),
                      generator=torch.Generator().manual_seed(3))
    eps = posterior.sample_eps(torch.Generator().manual_seed(3))
    manual = F.cross_entropy(posterior(x, eps), y) + 1e-4 * posterior.kl()
    assert lam0.adv is None and torch.allclose(vi.total, lam0.total) and torch.allclose(vi.total, manual)


def test_loss_is_equation_3_and_gradients_reach_mu_and_rho(posterior, batch):
    x, y = batch
    for convention, kl_scale in (("paper", 1.0), ("authors", 0.2)):
        parts = bayes_loss(posterior, x, y, kl_weight=1e-3, config=ASConfig(kl_convention=convention),
                           generator=torch.Generator().manual_seed(4))
        expected = 0.2 * parts.pred + 0.8 * parts.adv + kl_scale * 1e-3 * parts.kl
        assert torch.allclose(parts.total, expected)
        assert parts.adv > parts.pred  # the adversarial sample is worse than a regular one
    posterior.zero_grad()
    parts.total.backward()
    assert posterior.mu.grad.abs().sum() > 0 and posterior.rho.grad.abs().sum() > 0


@pytest.mark.parametrize("policy, extra_updates", [("freeze", 0), ("update", 6)])
def test_batchnorm_policy(posterior, batch, policy, extra_updates):
    """freeze: only the regular sample's pass moves the running statistics; update: all N + 2 do."""
    x, y = batch
    tracked = [m for m in posterior.model.modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
    before, count = bn_stats(posterior), tracked.num_batches_tracked.item()
    bayes_loss(posterior, x, y, kl_weight=0.0, config=ASConfig(bn_policy=policy),
               generator=torch.Generator().manual_seed(5))
    assert tracked.num_batches_tracked.item() - count == 1 + extra_updates
    assert not torch.equal(before, bn_stats(posterior))
    assert all(m.track_running_stats for m in posterior.model.modules() if hasattr(m, "track_running_stats"))


@pytest.mark.parametrize("kwargs, message", [
    ({"lam": 1.5}, "as_lambda"), ({"lam": -0.1}, "as_lambda"), ({"step_size": -0.01}, "alpha"),
    ({"steps": -1}, "as_steps"), ({"steps": 2.5}, "integer"), ({"bn_policy": "eval"}, "bn_policy"),
    ({"layers": "conv"}, "as_layers"), ({"search_fraction": 0.0}, "as_search_fraction"),
    ({"search_fraction": 1.5}, "as_search_fraction"), ({"search_fraction": float("nan")}, "as_search_fraction"),
])
def test_bad_as_configs(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ASConfig(**kwargs)


def test_free_as_carries_eps_one_sign_step_per_training_step(posterior, batch):
    from asbnn.adversarial import FreeAdversarialSampler

    x, y = batch
    sampler = FreeAdversarialSampler(posterior, ASConfig(steps=2, step_size=0.02))
    gen = torch.Generator().manual_seed(6)
    seen = []
    for _ in range(4):
        parts = sampler.loss(x, y, kl_weight=1e-4, generator=gen)
        parts.total.backward()
        seen.append((sampler.eps.clone(), sampler._grad.clone()))
    (e0, g0), (e1, g1), (e2, _), (e3, _) = seen
    assert torch.allclose(e1, e0 + 0.02 * g0.sign())  # one step along the last backward's gradient
    assert torch.allclose(e2, e1 + 0.02 * g1.sign())
    assert (e3 - e2).abs().max() > 0.1  # after `steps` steps eps_adv is redrawn
    assert parts.adv is not None and torch.isfinite(parts.total)


@pytest.mark.parametrize("kwargs, message", [
    ({"step_size": float("inf")}, r"as_step_size \(alpha\) must be >= 0 and finite, got inf"),
    ({"step_size": float("nan")}, "alpha"), ({"step_size": "0.02"}, "alpha"), ({"steps": True}, "integer"),
])
def test_non_finite_as_configs(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ASConfig(**kwargs)


@pytest.mark.parametrize("kl_weight", [-1.0, float("nan"), float("inf"), torch.tensor(0.1)])
def test_bad_kl_weights_are_refused(posterior, batch, kl_weight):
    from asbnn.adversarial import FreeAdversarialSampler

    x, y = batch
    with pytest.raises(ConfigError, match="kl_weight must be >= 0 and finite"):
        bayes_loss(posterior, x[:4], y[:4], kl_weight=kl_weight)
    with pytest.raises(ConfigError, match="kl_weight must be >= 0 and finite"):
        FreeAdversarialSampler(posterior).loss(x[:4], y[:4], kl_weight=kl_weight)


def test_adversarial_search_refuses_bad_eps_and_settings(posterior, batch):
    x, y = batch
    eps = posterior.sample_eps()
    for bad in (eps[:1], eps[:-1], eps.double()):  # eps[:1] would broadcast silently over every weight
        with pytest.raises(ConfigError, match="eps must be a torch.float32 tensor of shape"):
            adversarial_eps(posterior, x[:4], y[:4], bad, steps=1, step_size=0.02)
    with pytest.raises(ConfigError, match="alpha"):
        adversarial_eps(posterior, x[:4], y[:4], eps, steps=1, step_size=float("inf"))
    with pytest.raises(ConfigError, match="as_steps"):
        adversarial_eps(posterior, x[:4], y[:4], eps, steps=-1, step_size=0.02)


# ---------------------------------------------------------------- as_layers "normalised"


def mask_by_name(posterior):
    """Each Bayesian parameter's mask value, which must be the same over the whole tensor."""
    parts = normalised_mask(posterior).split(posterior.sizes)
    assert all(part.min() == part.max() for part in parts)
    return {name: int(part[0]) for name, part in zip(posterior.names, parts)}


def test_normalised_mask_of_lenet5_is_its_convs_and_batchnorms(posterior):
    masked = {name for name, flag in mask_by_name(posterior).items() if flag}
    # the convs have no bias (each feeds a BatchNorm): their weights and both BatchNorms' affine parameters
    assert masked == {"conv1.weight", "bn1.weight", "bn1.bias", "conv2.weight", "bn2.weight", "bn2.bias"}
    assert {n.split(".")[0] for n in posterior.names} - {n.split(".")[0] for n in masked} == {"fc1", "fc2", "fc3"}


def test_normalised_mask_of_the_allconv_network_is_all_but_its_last_layer():
    post = Posterior(create_model("allconv", in_channels=1))
    assert {name for name, flag in mask_by_name(post).items() if not flag} == {"fc.weight", "fc.bias"}
    assert {n.split(".")[0] for n, flag in mask_by_name(post).items() if flag} == {"convs", "bns"}


class Branches(torch.nn.Module):
    """A linear layer feeding only a BatchNorm (normalised), one whose output is also read elsewhere
    (not), and one feeding a BatchNorm only after a ReLU (not)."""

    def __init__(self):
        super().__init__()
        self.only, self.bn1 = torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)
        self.shared, self.bn2 = torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)
        self.late, self.bn3 = torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)

    def forward(self, x):
        x = self.bn1(self.only(x))
        h = self.shared(x)
        x = self.bn2(h) + h
        return self.bn3(torch.relu(self.late(x)))


def test_only_a_layer_whose_output_goes_straight_and_only_into_a_batchnorm_counts():
    flags = mask_by_name(Posterior(Branches()))
    assert {n for n, f in flags.items() if f} == {"only.weight", "only.bias", *(f"bn{i}.{p}" for i in (1, 2, 3)
                                                                                 for p in ("weight", "bias"))}


class DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn = torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.fc(x)) if x.sum() > 0 else self.fc(x)


def test_normalised_layers_need_batchnorm_and_a_traceable_model(batch):
    x, y = batch
    plain = Posterior(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)))
    with pytest.raises(ConfigError, match="no Bayesian BatchNorm layer"):
        normalised_mask(plain)
    with pytest.raises(ConfigError, match="no Bayesian BatchNorm layer"):
        bayes_loss(plain, x[:4], y[:4], kl_weight=0.0, config=ASConfig(layers="normalised"))
    with pytest.raises(ConfigError, match="no Bayesian BatchNorm layer"):
        FreeAdversarialSampler(plain, ASConfig(layers="normalised"))
    with pytest.raises(ConfigError, match="needs a model torch.fx can trace"):
        normalised_mask(Posterior(DataDependent()))
    # the default moves every parameter's noise and never traces the model
    bayes_loss(Posterior(DataDependent()), torch.randn(4, 4), torch.arange(4), kl_weight=0.0, config=ASConfig(steps=1))


def test_the_mask_is_traced_once_and_follows_mu(posterior):
    mask = normalised_mask(posterior)
    assert normalised_mask(posterior) is mask and mask.dtype == posterior.mu.dtype
    posterior.double()
    moved = normalised_mask(posterior)
    assert moved.dtype == torch.float64 and torch.equal(moved, mask.double())
    assert normalised_mask(posterior) is moved


def test_a_masked_step_moves_only_the_normalised_noise_and_those_as_an_unmasked_one(posterior, batch):
    x, y = batch
    eps = posterior.sample_eps(torch.Generator().manual_seed(7))
    mask = normalised_mask(posterior)
    everything = adversarial_eps(posterior, x, y, eps, steps=1, step_size=0.02)
    masked = adversarial_eps(posterior, x, y, eps, steps=1, step_size=0.02, mask=mask)
    assert torch.equal(masked[mask == 0], eps[mask == 0])
    assert torch.equal(masked[mask == 1], everything[mask == 1]) and not torch.equal(masked, eps)
    with pytest.raises(ConfigError, match="mask must be a torch.float32 tensor of shape"):
        adversarial_eps(posterior, x, y, eps, steps=1, step_size=0.02, mask=mask.bool())


def test_the_default_step_is_unchanged_bitwise(posterior, batch):
    """layers "all" (the default) is eps + alpha * sign(dL/dw), bit for bit as before the mask existed."""
    x, y = batch
    eps = posterior.sample_eps(torch.Generator().manual_seed(8))
    with frozen_bn_stats(posterior.model):
        weights = posterior.flat_weights(eps).detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(posterior(x, weights=weights), y), weights)
    expected = eps.add(grad.sign(), alpha=0.02)
    assert ASConfig().layers == "all"
    assert torch.equal(adversarial_eps(posterior, x, y, eps, steps=1, step_size=0.02), expected)


def test_bayes_loss_searches_the_normalised_noise_only(posterior, batch):
    x, y = batch
    config = ASConfig(steps=3, layers="normalised")
    parts = bayes_loss(posterior, x, y, kl_weight=1e-4, config=config, generator=torch.Generator().manual_seed(9))
    eps = posterior.sample_eps(torch.Generator().manual_seed(9))
    with frozen_bn_stats(posterior.model):
        eps_adv = adversarial_eps(posterior, x, y, eps, steps=3, step_size=0.02, mask=normalised_mask(posterior))
        assert torch.equal(eps_adv[normalised_mask(posterior) == 0], eps[normalised_mask(posterior) == 0])
        assert torch.equal(parts.adv, F.cross_entropy(posterior(x, eps_adv), y))


def test_free_as_respects_the_mask(posterior, batch):
    x, y = batch
    sampler = FreeAdversarialSampler(posterior, ASConfig(steps=2, step_size=0.02, layers="normalised"))
    mask = normalised_mask(posterior)
    gen = torch.Generator().manual_seed(10)
    seen = []
    for _ in range(2):
        sampler.loss(x, y, kl_weight=1e-4, generator=gen).total.backward()
        seen.append((sampler.eps.clone(), sampler._grad.clone()))
    (e0, g0), (e1, _) = seen
    assert torch.equal(e1, e0 + 0.02 * (g0.sign() * mask))
    assert torch.equal(e1[mask == 0], e0[mask == 0]) and not torch.equal(e1, e0)


def test_the_search_on_part_of_the_batch_sees_only_its_first_share(posterior, batch):
    """as_search_fraction 0.25: the sign steps on the first 16 of 64 images, L_adv on all 64; the search
    differs from one on the whole batch, so the share is really used."""
    x, y = batch
    config = ASConfig(steps=3, search_fraction=0.25)
    assert [len(t) for t in config.search_batch(x, y)] == [16, 16]
    assert len(ASConfig(search_fraction=0.001).search_batch(x, y)[0]) == 1  # at least one image
    parts = bayes_loss(posterior, x, y, kl_weight=1e-4, config=config, generator=torch.Generator().manual_seed(9))
    eps = posterior.sample_eps(torch.Generator().manual_seed(9))
    with frozen_bn_stats(posterior.model):
        part = adversarial_eps(posterior, x[:16], y[:16], eps, steps=3, step_size=0.02)
        whole = adversarial_eps(posterior, x, y, eps, steps=3, step_size=0.02)
        assert torch.equal(parts.adv, F.cross_entropy(posterior(x, part), y))
        assert not torch.equal(part, whole)
