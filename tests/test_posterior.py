"""The posterior: KL, sampling, gradients and wrapping of arbitrary modules."""

import math

import pytest
import torch
import torch.nn.functional as F
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


class TiedLM(nn.Module):
    """A language model whose output layer reuses the embedding matrix (weight tying)."""

    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.emb(tokens))))


def test_tied_weights_get_one_mu_and_one_sample_used_everywhere():
    torch.manual_seed(0)
    post = Posterior(TiedLM(), PosteriorConfig(init_sigma=0.1))
    assert post.names == ["emb.weight", "mix.weight", "mix.bias"]  # chosen through the Linear head
    assert post.num_bayesian == 11 * 6 + 6 * 6 + 6
    assert {n for n, _ in post.named_parameters()} == {"mu", "rho"}  # no stale copy left to train
    tokens, eps = torch.tensor([[1, 4, 7, 4]]), post.sample_eps()
    w = post.weights(eps)
    assert w["head.weight"] is w["emb.weight"]
    leaf = w["emb.weight"].detach().requires_grad_(True)
    expected = F.linear(torch.tanh(F.linear(F.embedding(tokens, leaf), w["mix.weight"], w["mix.bias"])), leaf)
    assert torch.allclose(post(tokens, eps), expected)
    # the gradient of the one shared mu slice sums both uses (embedding lookup and output layer)
    expected.sum().backward()
    post(tokens, eps).sum().backward()
    assert torch.allclose(post.mu.grad[: 66].view(11, 6), leaf.grad)
    fresh = TiedLM()
    fresh.load_state_dict(post.mean_state_dict())
    assert fresh.head.weight is fresh.emb.weight and torch.equal(fresh.emb.weight, post.weights("mean")["emb.weight"])


class Twice(nn.Module):
    """One block applied twice, and also registered under a second name."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(4, 4)
        self.again = self.block
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.again(torch.relu(self.block(x)))))


def test_a_module_used_twice_uses_one_sample():
    torch.manual_seed(0)
    post = Posterior(Twice(), PosteriorConfig(init_sigma=0.2))
    assert post.names == ["block.weight", "block.bias", "out.weight", "out.bias"]
    x, eps = torch.randn(5, 4), post.sample_eps()
    w = post.weights(eps)
    hidden = torch.relu(F.linear(torch.relu(F.linear(x, w["block.weight"], w["block.bias"])), w["block.weight"], w["block.bias"]))
    assert torch.allclose(post(x, eps), F.linear(hidden, w["out.weight"], w["out.bias"]))
    fresh = Twice()
    fresh.load_state_dict(post.mean_state_dict())  # strict: both names of the block are there
    assert torch.equal(fresh.again.weight, post.weights("mean")["block.weight"])


def mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_the_modules_dtype_is_kept(dtype):
    torch.manual_seed(0)
    net = mlp(dtype)
    post = Posterior(net, PosteriorConfig(mu_init="module"))
    assert post.mu.dtype == post.rho.dtype == post.sample_eps().dtype == dtype
    x = torch.randn(4, 5, dtype=dtype)
    assert torch.equal(post(x, "mean"), net(x))
    kl = post.kl()  # summed in at least float32, whatever the module's dtype
    assert kl.dtype == torch.promote_types(dtype, torch.float32) and torch.isfinite(kl)
    (post(x).float().sum() + kl).backward()
    assert post.mu.grad.dtype == dtype and post.rho.grad.abs().sum() > 0
    paper = Posterior(mlp(dtype), PosteriorConfig(mu_init="paper"))
    assert paper.mu.dtype == dtype


def test_mixed_or_complex_dtypes_are_refused_by_name():
    net = mlp()
    net[2].double()
    with pytest.raises(ConfigError, match=r"one dtype and device: 0.weight is torch.float32 on cpu, 2.weight is torch.float64"):
        Posterior(net)
    with pytest.raises(ConfigError, match="real floating point.*complex64"):
        Posterior(nn.Linear(3, 2, dtype=torch.complex64))


class Normed(nn.Module):
    """Layers beyond conv / linear / BatchNorm, and a free parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.gn = nn.GroupNorm(2, 8)
        self.lstm = nn.LSTM(8, 5, batch_first=True)
        self.ln = nn.LayerNorm(5)
        self.rms = nn.RMSNorm(5)
        self.emb = nn.Embedding(9, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gn(self.conv(x)).mean((2, 3))[:, None]
        return self.rms(self.ln(self.lstm(h)[0][:, 0])) + self.emb.weight.sum()


def test_paper_init_of_every_parameter_kind():
    torch.manual_seed(0)
    post = Posterior(Normed(), PosteriorConfig(mu_init="paper"), layer_types=(nn.Module,))
    w = post.weights("mean")
    for gain in ("gn.weight", "ln.weight", "rms.weight"):  # norm gains U(0, 1), like BatchNorm's
        assert (w[gain] >= 0).all() and (w[gain] <= 1).all() and w[gain].std() > 0.1, gain
    for bias in ("gn.bias", "ln.bias", "lstm.bias_ih_l0", "lstm.bias_hh_l0"):
        assert torch.equal(w[bias], torch.zeros_like(w[bias])), bias
    for name, fan_in in (("conv.weight", 9), ("conv.bias", 9), ("lstm.weight_ih_l0", 8), ("lstm.weight_hh_l0", 5),
                         ("emb.weight", 5)):
        bound = 1 / math.sqrt(fan_in)
        assert w[name].abs().max() <= bound and w[name].std() > bound / 4, name
    assert torch.isfinite(post(torch.randn(2, 1, 6, 6))).all()


def test_paper_init_refuses_a_parameter_it_has_no_rule_for():
    net = nn.Sequential(nn.Linear(3, 3), nn.PReLU(3))
    with pytest.raises(ConfigError, match=r"mu_init='paper' has no rule for 1.weight \(PReLU"):
        Posterior(net, PosteriorConfig(mu_init="paper"), layer_types=(nn.Module,))


def test_paper_init_of_conv_linear_and_batchnorm_is_unchanged():
    """The same random draws, in the same order, as the initialisation the published runs used."""
    torch.manual_seed(3)
    post = Posterior(small_net(), PosteriorConfig(mu_init="paper"))
    torch.manual_seed(3)
    small_net()  # building the layers draws their own initial weights first
    conv, lin = 1 / math.sqrt(9), 1 / math.sqrt(4 * 6 * 6)
    expected = torch.cat([
        torch.empty(4 * 9).uniform_(-conv, conv), torch.empty(4).uniform_(-conv, conv),
        torch.rand(4), torch.zeros(4),
        torch.empty(3 * 144).uniform_(-lin, lin), torch.empty(3).uniform_(-lin, lin),
    ])
    assert torch.equal(post.mu, expected)


class Scaled(nn.Module):
    """A linear layer followed by a free learnable scale (a parameter outside any layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.full((3,), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale


def test_include_selects_parameters_by_name():
    assert Posterior(Scaled()).names == ["lin.weight", "lin.bias"]
    post = Posterior(Scaled(), include=["scale"])
    assert post.names == ["scale", "lin.weight", "lin.bias"]  # named_parameters order
    assert torch.equal(post.weights("mean")["scale"], torch.full((3,), 2.0))
    assert Posterior(Scaled(), include=["*"], layer_types=()).names == post.names
    assert Posterior(Scaled(), include=["scale"], exclude=["lin.*"]).names == ["scale"]
    assert Posterior(Scaled(), include=["*"], exclude=["*.bias"]).names == ["scale", "lin.weight"]
    with pytest.raises(ConfigError, match=r"exclude takes a list of globs, got the string 'lin.bias'; write \['lin.bias'\]"):
        Posterior(Scaled(), exclude="lin.bias")


def test_the_users_module_is_left_untouched():
    torch.manual_seed(0)
    net = small_net().eval()
    x = torch.randn(2, 1, 8, 8)
    state, out = {k: v.clone() for k, v in net.state_dict().items()}, net(x)
    post = Posterior(net).eval()
    with torch.no_grad():
        post.mu.add_(1.0)  # as training would
    assert [n for n, _ in net.named_parameters()] == ["0.weight", "0.bias", "1.weight", "1.bias", "4.weight", "4.bias"]
    assert net.state_dict().keys() == state.keys() and all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert torch.equal(net(x), out)
    with pytest.raises(ConfigError, match=r"posterior.model holds no Bayesian weights.*posterior\(x"):
        post.model(x)  # would otherwise run stale weights
    twice = Posterior(net).eval()  # the same module again: another, independent posterior
    assert torch.equal(twice(x, "mean"), out)
    for wrapped in (post.model, post, nn.Sequential(post)):
        with pytest.raises(ConfigError, match="already wrapped"):
            Posterior(wrapped)


def test_non_finite_sigmas_are_refused():
    for kwargs in ({"init_sigma": math.inf}, {"prior_sigma": math.inf}, {"init_sigma": math.nan},
                   {"prior_sigma": -1.0}, {"init_sigma": "0.1"}, {"prior_sigma": 1e200}):
        with pytest.raises(ConfigError, match=next(iter(kwargs))):
            PosteriorConfig(**kwargs)
    big = Posterior(mlp(), PosteriorConfig(sigma_param="softplus", init_sigma=1000.0))
    assert torch.allclose(big.sigma(), torch.full_like(big.mu, 1000.0))


def test_eps_of_the_wrong_length_shape_dtype_or_device_is_refused():
    post = Posterior(small_net())
    x, eps = torch.randn(2, 1, 8, 8), post.sample_eps()
    message = rf"eps must be a torch.float32 tensor of shape \[{post.num_bayesian}\] on cpu \(see sample_eps\), got "
    for bad in (eps[:-1], eps[:1], eps[None], eps.double(), torch.zeros(post.num_bayesian, device="meta"), [0.0]):
        with pytest.raises(ConfigError, match=message):
            post(x, bad)
    with pytest.raises(ConfigError, match="weights must be"):
        post(x, weights=post.mu[:-1])


def test_a_module_that_cannot_be_copied_is_refused_clearly():
    import threading

    net = mlp()
    net.lock = threading.Lock()  # e.g. a module that holds a lock or an open file
    with pytest.raises(ConfigError, match="own copy of the module, and this Sequential cannot be deep-copied"):
        Posterior(net)
