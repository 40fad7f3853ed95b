import math

import pytest
import torch
import torch.nn.functional as F

from asbnn import metrics as M
from asbnn.calibration import T_MAX, T_MIN, apply_temperature, fit_temperature, logits_from_probs
from asbnn.errors import ConfigError


def sampled_labels(z: torch.Tensor, seed: int) -> torch.Tensor:
    """Labels drawn from softmax(z): z are the true logits."""
    return torch.multinomial(torch.softmax(z, -1), 1, generator=torch.Generator().manual_seed(seed)).squeeze(1)


def true_logits(n: int, classes: int = 10, scale: float = 1.5, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, classes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def temperature_standard_error(outputs: torch.Tensor, temperature: float) -> float:
    """Asymptotic standard error of the maximum-likelihood T.

    With b = 1/T the model is softmax(b * outputs); the Fisher information about b of one input
    is the variance of its output at the label, outputs[y], under y ~ softmax(b * outputs).
    So SE(b) = 1 / sqrt(sum of those variances), and SE(T) = T^2 SE(b) by the delta method.
    """
    s = outputs.double()
    p = torch.softmax(s / temperature, -1)
    variance = (p * s**2).sum(-1) - (p * s).sum(-1) ** 2
    return temperature**2 / variance.sum().sqrt().item()


@pytest.mark.parametrize("factor", [3.0, 1.0, 0.5])
def test_recovers_known_temperature(factor):
    # a network whose outputs are factor * (true logits) is undone by T = factor; factor 1 is
    # already calibrated and must come back as T = 1
    z = true_logits(20_000)
    labels = sampled_labels(z, seed=1)
    outputs = factor * z
    fitted = fit_temperature(outputs, labels)
    tolerance = 4 * temperature_standard_error(outputs, factor)
    assert tolerance < 0.05 * factor  # the test is sharp enough to mean something
    assert fitted == pytest.approx(factor, abs=tolerance)


@pytest.mark.parametrize("seed", range(4))
def test_fit_never_increases_nll_and_beats_a_grid(seed):
    # over- and underconfident outputs, and outputs unrelated to the labels
    z = true_logits(500, classes=5, seed=seed)
    for outputs, labels in ((4 * z, sampled_labels(z, seed)), (0.3 * z, sampled_labels(z, seed)),
                            (z, torch.randint(0, 5, (500,), generator=torch.Generator().manual_seed(seed)))):
        fitted = fit_temperature(outputs, labels)
        nll_fitted = F.cross_entropy(outputs / fitted, labels).item()
        assert nll_fitted <= F.cross_entropy(outputs, labels).item()
        grid = torch.logspace(math.log10(T_MIN), math.log10(T_MAX), 300).tolist()
        assert nll_fitted <= min(F.cross_entropy(outputs / t, labels).item() for t in grid) + 1e-9


def test_fit_is_deterministic_and_stays_in_range():
    z = true_logits(300, seed=5)
    labels = z.argmax(-1)  # every prediction right: NLL keeps falling as T -> 0
    assert fit_temperature(z, labels) == fit_temperature(z.clone(), labels.clone())
    assert fit_temperature(z, labels) == pytest.approx(T_MIN, rel=1e-6)
    assert fit_temperature(z, (labels + 1) % 10) == pytest.approx(T_MAX, rel=1e-6)  # every one wrong


def test_apply_temperature():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    # softmax([1, 0]) = [e / (e + 1), 1 / (e + 1)]
    expected = torch.tensor([[math.e / (math.e + 1), 1 / (math.e + 1)], [0.5, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(apply_temperature(logits, 2.0), expected)
    # temperature never changes the prediction
    z = true_logits(100, seed=2)
    assert torch.equal(apply_temperature(z, 7.0).argmax(-1), z.argmax(-1))


def test_ensemble_convention_log_probabilities_as_logits():
    # K overconfident members; their mean is the Bayesian prediction that gets calibrated
    z = true_logits(5000, seed=3)
    labels = sampled_labels(z, seed=4)
    noise = torch.randn(4, *z.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    probs = torch.softmax(4 * (z + 0.3 * noise), -1).mean(0)
    logits = logits_from_probs(probs)
    torch.testing.assert_close(apply_temperature(logits, 1.0), probs)  # T = 1 is the identity
    fitted = fit_temperature(logits, labels)
    assert fitted > 1  # overconfident: softened
    assert M.nll(apply_temperature(logits, fitted), labels) < M.nll(probs, labels)
    assert M.ece(apply_temperature(logits, fitted), labels) < M.ece(probs, labels)
    # zero probabilities stay finite
    assert torch.isfinite(logits_from_probs(torch.tensor([[1.0, 0.0]]))).all()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: fit_temperature(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long)), "labels"),
        (lambda: fit_temperature(torch.zeros(3), torch.zeros(3, dtype=torch.long)), r"\[N, C\]"),
        (lambda: fit_temperature(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)), "N > 0"),
        (lambda: fit_temperature(torch.zeros(2, 2), torch.tensor([0, 2])), r"\[0, 2\)"),
        (lambda: fit_temperature(torch.tensor([[0.0, -math.inf]]), torch.tensor([0])), "finite"),
        (lambda: apply_temperature(torch.zeros(2, 2), 0.0), "temperature"),
        (lambda: apply_temperature(torch.zeros(2, 2), math.nan), "temperature"),
    ],
)
def test_bad_arguments_raise_config_error(call, match):
    with pytest.raises(ConfigError, match=match):
        call()
