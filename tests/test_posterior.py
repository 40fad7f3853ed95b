"""The posterior: KL, sampling, gradients and wrapping of arbitrary modules."""

import math

import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

from asbnn.errors import ConfigError
from asbnn.models import create_model
from asbnn.posterior import Posterior, PosteriorConfig, gaussian_kl


def small_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )


def test_closed_form_kl_matches_torch_and_monte_carlo():
    torch.manual_seed(0)
    mu, sigma, prior = torch.randn(50) * 0.3, torch.rand(50) * 0.5 + 0.05, 0.15
    ours = gaussian_kl(mu, sigma, prior)
    reference = kl_divergence(Normal(mu, sigma), Normal(torch.zeros(50), torch.full((50,), prior))).sum()
    assert torch.allclose(ours, reference, rtol=1e-5)
    q = Normal(mu, sigma)
    w = q.sample((200_000,))
    mc = (q.log_prob(w) - Normal(0.0, prior).log_prob(w)).sum(1).mean()
    assert abs(mc.item() - ours.item()) / ours.item() < 0.01


@pytest.mark.parametrize("sigma_param", ["exp", "softplus"])
def test_posterior_kl_and_initial_sigma(sigma_param):
    post = Posterior(small_net(), PosteriorConfig(sigma_param=sigma_param, init_sigma=0.07))
    assert torch.allclose(post.sigma(), torch.full_like(post.mu, 0.07), atol=1e-6)
    assert torch.allclose(post.kl(), gaussian_kl(post.mu, post.sigma(), 0.15))


def test_zero_eps_and_mean_give_the_mean_network():
    torch.manual_seed(0)
    net = small_net().eval()
    x = torch.randn(8, 1, 8, 8)
    expected = net(x)
    post = Posterior(net, PosteriorConfig(mu_init="module")).eval()
    assert torch.allclose(post(x, torch.zeros(post.num_bayesian)), expected, atol=1e-6)
    assert torch.allclose(post(x, "mean"), expected, atol=1e-6)
    assert not torch.allclose(post(x), expected, atol=1e-3)  # a fresh sample differs


def test_pretrained_weights_become_the_means():
    model = create_model("resnet20")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    post = Posterior(model, PosteriorConfig(mu_init="module"))
    means = post.weights("mean")
    for name in post.names:
        assert torch.equal(means[name], original[name])
    assert set(post.names) == {n for n, _ in create_model("resnet20").named_parameters()}
    restored = create_model("resnet20")
    restored.load_state_dict(post.mean_state_dict())
    for k, v in restored.state_dict().items():
        assert torch.equal(v, original[k])


def test_paper_init_of_the_means():
    post = Posterior(small_net(), PosteriorConfig(mu_init="paper"))
    w = post.weights("mean")
    bound = 1 / math.sqrt(9)
    assert w["0.weight"].abs().max() <= bound and w["0.weight"].std() > bound / 4
    assert (w["1.weight"] >= 0).all() and (w["1.weight"] <= 1).all()
    assert torch.equal(w["1.bias"], torch.zeros(4))


def test_eps_gradient_is_sigma_times_weight_gradient():
    torch.manual_seed(0)
    post = Posterior(small_net(), PosteriorConfig(init_sigma=0.3))
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    eps = post.sample_eps().requires_grad_(True)
    weights = post.weights(eps)
    for w in weights.values():
        w.retain_grad()
    loss = nn.functional.cross_entropy(torch.func.functional_call(post.model, weights, (x,)), y)
    loss.backward()
    flat_wgrad = torch.cat([weights[n].grad.reshape(-1) for n in post.names])
    assert torch.allclose(eps.grad, post.sigma().detach() * flat_wgrad, atol=1e-7)


def test_gradients_reach_mu_rho_and_deterministic_parameters():
    net = small_net()
    post = Posterior(net, exclude=["4.bias"])  # the last bias stays deterministic
    assert "4.bias" not in post.names
    names = {n for n, _ in post.named_parameters()}
    assert names == {"mu", "rho", "model.4.bias"}
    loss = post(torch.randn(4, 1, 8, 8)).sum() + post.kl()
    loss.backward()
    for p in post.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_bad_posterior_configs():
    with pytest.raises(ConfigError, match="init_sigma"):
        PosteriorConfig(init_sigma=0)
    with pytest.raises(ConfigError, match="sigma_param"):
        PosteriorConfig(sigma_param="tanh")
    with pytest.raises(ConfigError, match="no Bayesian parameters"):
        Posterior(small_net(), exclude=["*"])


def test_any_module_with_buffers_and_vmap():
    """A user's own module works, and batched samples (vmap) equal one-by-one forwards."""
    torch.manual_seed(0)
    post = Posterior(create_model("lenet5", in_channels=1)).eval()
    x = torch.randn(5, 1, 28, 28)
    eps = post.sample_eps(num_samples=3)
    batched = torch.func.vmap(lambda e: post(x, e))(eps)
    looped = torch.stack([post(x, e) for e in eps])
    assert torch.allclose(batched, looped, atol=1e-5)


def test_hand_written_kl_gradient_matches_autograd():
    from asbnn.posterior import _ExpSigmaKL

    torch.manual_seed(1)
    mu = torch.randn(30, dtype=torch.float64, requires_grad=True)
    rho = (torch.rand(30, dtype=torch.float64) * -3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda m, r: _ExpSigmaKL.apply(m, r, 0.15**2), (mu, rho))
    post = Posterior(small_net(), PosteriorConfig(init_sigma=0.1))
    with torch.no_grad():
        post.mu.normal_()
        post.rho.uniform_(-4, 0)
    post.kl().backward()
    mu2, rho2 = post.mu.detach().clone().requires_grad_(), post.rho.detach().clone().requires_grad_()
    reference = gaussian_kl(mu2, rho2.exp(), 0.15)
    reference.backward()
    assert torch.allclose(post.kl(), reference, rtol=1e-5)
    assert torch.allclose(post.mu.grad, mu2.grad, rtol=1e-5) and torch.allclose(post.rho.grad, rho2.grad, rtol=1e-4)
