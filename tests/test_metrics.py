import math

import pytest
import torch

from asbnn import metrics as M
from asbnn.errors import ConfigError

# Five inputs, three classes, shared by several hand computations below.
#   input  probs                label  conf  pred  correct  p(label)
#   0      [0.9, 0.05, 0.05]    0      0.9   0     yes      0.9
#   1      [0.8, 0.1, 0.1]      1      0.8   0     no       0.1
#   2      [0.6, 0.3, 0.1]      0      0.6   0     yes      0.6
#   3      [0.4, 0.35, 0.25]    1      0.4   0     no       0.35
#   4      [0.3, 0.5, 0.2]      1      0.5   1     yes      0.5
PROBS = torch.tensor(
    [[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.4, 0.35, 0.25], [0.3, 0.5, 0.2]],
    dtype=torch.float64,
)
LABELS = torch.tensor([0, 1, 0, 1, 1])


def test_accuracy():
    assert M.accuracy(PROBS, LABELS).item() == pytest.approx(3 / 5)


def test_nll():
    # -(ln .9 + ln .1 + ln .6 + ln .35 + ln .5) / 5 = 4.6617405 / 5
    assert M.nll(PROBS, LABELS).item() == pytest.approx(0.9323481, abs=1e-7)


def test_brier():
    # per input: .01+.0025+.0025 = .015 | .64+.81+.01 = 1.46 | .16+.09+.01 = .26
    #            .16+.4225+.0625 = .645 | .09+.25+.04 = .38 ; sum 2.76 / 5
    assert M.brier(PROBS, LABELS).item() == pytest.approx(0.552)


def test_per_sample_metrics_match_single_model():
    # sample 1 is a confident perfect predictor: accuracy 1, nll -ln .97
    perfect = torch.nn.functional.one_hot(LABELS, 3).double() * 0.96 + 0.01
    sample_probs = torch.stack([PROBS, perfect])
    expected_acc = torch.tensor([0.6, 1.0], dtype=torch.float64)
    expected_nll = torch.tensor([M.nll(PROBS, LABELS).item(), -math.log(0.97)], dtype=torch.float64)
    torch.testing.assert_close(M.per_sample_accuracy(sample_probs, LABELS), expected_acc)
    torch.testing.assert_close(M.per_sample_nll(sample_probs, LABELS), expected_nll)


def test_ece_equal_width():
    # 2 bins, right-closed: (0, .5] holds inputs 3, 4 (0.5 is on the edge); (.5, 1] holds 0, 1, 2
    # bin 0: conf (.4+.5)/2 = .45, acc 1/2 -> |gap| .05 * 2/5 = .02
    # bin 1: conf 2.3/3, acc 2/3       -> |gap| .1  * 3/5 = .06       ECE = .08
    bins = M.calibration_bins(PROBS, LABELS, n_bins=2)
    torch.testing.assert_close(bins["count"], torch.tensor([2.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(bins["confidence"], torch.tensor([0.45, 2.3 / 3], dtype=torch.float64))
    torch.testing.assert_close(bins["accuracy"], torch.tensor([0.5, 2 / 3], dtype=torch.float64))
    torch.testing.assert_close(bins["edges"], torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    assert M.ece(PROBS, LABELS, n_bins=2).item() == pytest.approx(0.08)


def test_ece_skips_empty_bins():
    # 3 bins (0,1/3], (1/3,2/3], (2/3,1]: the first is empty (max prob of 3 classes >= 1/3)
    # bin 1: inputs 2, 3, 4: conf 1.5/3 = .5, acc 2/3 -> 1/6 * 3/5 = .1
    # bin 2: inputs 0, 1:    conf .85,     acc 1/2 -> .35 * 2/5 = .14     ECE = .24
    bins = M.calibration_bins(PROBS, LABELS, n_bins=3)
    assert bins["count"].tolist() == [0.0, 3.0, 2.0]
    assert bins["confidence"][0] == 0 and bins["accuracy"][0] == 0
    assert M.ece(PROBS, LABELS, n_bins=3).item() == pytest.approx(0.24)


def test_ece_adaptive():
    # sorted confidences .4 .5 .6 | .8 .9 (ranks 0..4, bin = rank * 2 // 5)
    # same split as the 3-bin case above -> ECE .24; inner edge = (.6 + .8) / 2
    bins = M.calibration_bins(PROBS, LABELS, n_bins=2, adaptive=True)
    assert bins["count"].tolist() == [3.0, 2.0]
    torch.testing.assert_close(bins["edges"], torch.tensor([0.0, 0.7, 1.0], dtype=torch.float64))
    assert M.ece(PROBS, LABELS, n_bins=2, adaptive=True).item() == pytest.approx(0.24)


def test_adaptive_bins_have_equal_counts():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(300, 10, generator=g) * 3, -1)
    labels = torch.randint(0, 10, (300,), generator=g)
    bins = M.calibration_bins(probs, labels, n_bins=15, adaptive=True)
    assert bins["count"].tolist() == [20.0] * 15
    assert (bins["edges"].diff() >= 0).all()
    # N not divisible by n_bins: sizes differ by at most one
    counts = M.calibration_bins(probs[:7], labels[:7], n_bins=3, adaptive=True)["count"]
    assert counts.tolist() == [3.0, 2.0, 2.0]


def synthetic_calibrated(n: int, classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 confidence c ~ U(.2, 1), rest spread evenly; the label equals the prediction w.p. c."""
    g = torch.Generator().manual_seed(seed)
    conf = 0.2 + 0.8 * torch.rand(n, generator=g)
    pred = torch.randint(0, classes, (n,), generator=g)
    probs = ((1 - conf) / (classes - 1)).unsqueeze(1).repeat(1, classes)
    probs.scatter_(1, pred.unsqueeze(1), conf.unsqueeze(1))
    correct = torch.rand(n, generator=g) < conf
    labels = torch.where(correct, pred, (pred + 1) % classes)
    return probs, labels


@pytest.mark.parametrize("adaptive", [False, True])
def test_perfectly_calibrated_predictor_has_small_ece(adaptive):
    probs, labels = synthetic_calibrated(200_000)
    assert M.ece(probs, labels, adaptive=adaptive).item() < 0.01
    # and a systematically overconfident one does not
    sharpened = torch.softmax(probs.log() * 3, -1)
    assert M.ece(sharpened, labels, adaptive=adaptive).item() > 0.05


def test_entropy_of_uniform_is_log_c():
    for c in (2, 10, 100):
        torch.testing.assert_close(M.entropy(torch.full((3, c), 1 / c)), torch.full((3,), math.log(c)))
    assert M.entropy(torch.tensor([[1.0, 0.0, 0.0]])).item() == 0.0


def test_uncertainty_identical_samples_have_zero_mutual_information():
    probs = torch.softmax(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), -1)
    u = M.uncertainty(probs.expand(5, 6, 4))
    torch.testing.assert_close(u["epistemic"], torch.zeros(6), atol=1e-6, rtol=0)
    torch.testing.assert_close(u["total"], M.entropy(probs))
    torch.testing.assert_close(u["aleatoric"], M.entropy(probs))


def test_uncertainty_disagreeing_samples():
    # two confident models that disagree: each has entropy 0, their mean is uniform -> MI = ln 2
    u = M.uncertainty(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]))
    torch.testing.assert_close(u["total"], torch.tensor([math.log(2)]))
    torch.testing.assert_close(u["aleatoric"], torch.tensor([0.0]))
    torch.testing.assert_close(u["epistemic"], torch.tensor([math.log(2)]))

    sample_probs = torch.softmax(torch.randn(8, 50, 5, generator=torch.Generator().manual_seed(1)), -1)
    u = M.uncertainty(sample_probs)
    assert (u["epistemic"] > 0).all()
    torch.testing.assert_close(u["total"], u["aleatoric"] + u["epistemic"])


# Selective prediction: correct and uncertainty score for five inputs.
#   sorted by score: idx0 (.1, right) idx2 (.2, right) idx3 (.3, wrong) idx1 (.4, wrong) idx4 (.5, right)
CORRECT = torch.tensor([True, False, True, False, True])
SCORE = torch.tensor([0.1, 0.4, 0.2, 0.3, 0.5], dtype=torch.float64)


def test_risk_coverage_and_aurc():
    # risk at k = 1..5: 0/1, 0/2, 1/3, 2/4, 2/5 ; AURC = (1/3 + 1/2 + 2/5) / 5 = 37/150
    coverage, risk = M.risk_coverage(CORRECT, SCORE)
    torch.testing.assert_close(coverage, torch.tensor([0.2, 0.4, 0.6, 0.8, 1.0], dtype=torch.float64))
    torch.testing.assert_close(risk, torch.tensor([0, 0, 1 / 3, 1 / 2, 2 / 5], dtype=torch.float64))
    assert M.aurc(CORRECT, SCORE).item() == pytest.approx(37 / 150)


def test_selective_accuracy():
    # keep ceil(cov * 5) = 1, 2, 3, 4, 5 inputs -> accuracy 1, 1, 2/3, 1/2, 3/5
    acc = M.selective_accuracy(CORRECT, SCORE, coverages=(0.2, 0.4, 0.6, 0.8, 1.0))
    assert list(acc) == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert [round(v.item(), 6) for v in acc.values()] == [1.0, 1.0, round(2 / 3, 6), 0.5, 0.6]


def test_selective_accuracy_at_full_coverage_is_accuracy():
    probs, labels = synthetic_calibrated(1000, seed=3)
    correct = probs.argmax(-1) == labels
    score = M.entropy(probs)
    assert M.selective_accuracy(correct, score, coverages=(1.0,))[1.0].item() == pytest.approx(
        M.accuracy(probs, labels).item()
    )


def test_selective_ties_broken_stably():
    # equal scores keep input order: the first (wrong) input is kept first
    _, risk = M.risk_coverage(torch.tensor([0, 1, 1]), torch.tensor([0.5, 0.5, 0.5]))
    torch.testing.assert_close(risk, torch.tensor([1.0, 0.5, 1 / 3]))


# OOD detection: in-distribution and OOD scores with ties at .35 and .8.
SCORE_IN = torch.tensor([0.1, 0.4, 0.35, 0.8])
SCORE_OUT = torch.tensor([0.35, 0.8, 0.9])


def test_auroc_with_ties():
    # out .35 beats in .1, ties .35 -> 1.5 ; out .8 beats 3, ties 1 -> 3.5 ; out .9 beats all -> 4
    # (1.5 + 3.5 + 4) / (3 * 4) = .75
    assert M.auroc(SCORE_IN, SCORE_OUT).item() == pytest.approx(0.75)
    assert M.auroc(SCORE_IN, SCORE_IN).item() == pytest.approx(0.5)
    assert M.auroc(torch.zeros(3), torch.ones(2)).item() == 1.0
    assert M.auroc(torch.ones(3), torch.zeros(2)).item() == 0.0
    assert M.auroc(SCORE_IN, SCORE_OUT.double()).item() == pytest.approx(0.75)  # mixed dtypes


def test_aupr():
    # thresholds high -> low: .9 (TP 1, FP 0) .8 (2, 1) .4 (2, 2) .35 (3, 3) .1 (3, 4)
    # recall steps 1/3, 1/3, 0, 1/3, 0 at precision 1, 2/3, 1/2, 1/2, 3/7
    # AP = 1/3 + 2/9 + 1/6 = 13/18
    assert M.aupr(SCORE_IN, SCORE_OUT).item() == pytest.approx(13 / 18)
    assert M.aupr(torch.zeros(3), torch.ones(2)).item() == 1.0



def test_aupr_in():
    # in-distribution positive, ranked by -score, i.e. ascending score:
    # thresholds .1 (TP 1, FP 0) .35 (2, 1) .4 (3, 1) .8 (4, 2) .9 (4, 3)
    # recall steps 1/4 each at precision 1, 2/3, 3/4, 2/3 -> AP = 37/48
    assert M.aupr_in(SCORE_IN, SCORE_OUT).item() == pytest.approx(37 / 48)
    assert M.aupr_in(torch.zeros(3), torch.ones(2)).item() == 1.0
    # swapping roles and negating turns one into the other
    assert M.aupr_in(SCORE_IN, SCORE_OUT).item() == pytest.approx(M.aupr(-SCORE_OUT, -SCORE_IN).item())


def brute_force_average_precision(positive: list[float], negative: list[float]) -> float:
    """Flag every score >= t for each distinct t, high to low; sum recall gain times precision."""
    ap, last_recall = 0.0, 0.0
    for t in sorted(set(positive) | set(negative), reverse=True):
        tp = sum(s >= t for s in positive)
        fp = sum(s >= t for s in negative)
        recall = tp / len(positive)
        ap += (recall - last_recall) * tp / (tp + fp)
        last_recall = recall
    return ap


@pytest.mark.parametrize("seed", range(5))
def test_aupr_and_aupr_in_match_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    # coarse rounding makes many ties within and across the two sets
    score_in = (torch.randn(40, generator=g) * 2).round().double()
    score_out = (torch.randn(25, generator=g) * 2 + 1).round().double()
    expected_out = brute_force_average_precision(score_out.tolist(), score_in.tolist())
    expected_in = brute_force_average_precision((-score_in).tolist(), (-score_out).tolist())
    assert M.aupr(score_in, score_out).item() == pytest.approx(expected_out, abs=1e-12)
    assert M.aupr_in(score_in, score_out).item() == pytest.approx(expected_in, abs=1e-12)


def test_energy_score_hand_values():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
    # -ln(e^0 + e^0) = -ln 2 ; -ln(e + e^2)
    expected = torch.tensor([-math.log(2), -math.log(math.e + math.e**2)], dtype=torch.float64)
    torch.testing.assert_close(M.energy_score(logits), expected)
    # T = 2: -2 ln(e^.5 + e^1)
    assert M.energy_score(logits[1:], temperature=2.0).item() == pytest.approx(
        -2 * math.log(math.exp(0.5) + math.exp(1.0))
    )


def test_energy_score_properties():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 10, generator=g, dtype=torch.float64) * 3
    # a shift of every logit by c shifts the energy by -c
    torch.testing.assert_close(M.energy_score(logits + 5), M.energy_score(logits) - 5)
    # T -> 0 approaches the max-logit score; the gap is at most T ln C
    close = M.energy_score(logits, temperature=1e-3)
    assert ((close - M.max_logit_score(logits)).abs() <= 1e-3 * math.log(10) + 1e-12).all()
    # stable for huge logits
    assert M.energy_score(torch.tensor([[1000.0, 1000.0]])).item() == pytest.approx(-1000 - math.log(2))


def test_logit_scores_rank_confident_inputs_as_in_distribution():
    confident = torch.tensor([[10.0, 0.0, 0.0], [0.0, 8.0, 1.0]])
    flat = torch.tensor([[0.1, 0.0, 0.2], [0.3, 0.3, 0.3]])
    for score in (M.energy_score, M.max_logit_score):
        assert M.auroc(score(confident), score(flat)).item() == 1.0
    torch.testing.assert_close(M.max_logit_score(confident), torch.tensor([-10.0, -8.0]))

def test_fpr_at_tpr():
    # OOD scores 1..20: flagging ceil(.95 * 20) = 19 of them needs threshold 2
    # in-distribution scores >= 2: 2, 2.5, 3, 10 -> 4 / 8
    score_out = torch.arange(1, 21).double()
    score_in = torch.tensor([0, 1, 2, 2.5, 3, 10, -1, 0.5], dtype=torch.float64)
    assert M.fpr_at_tpr(score_in, score_out).item() == pytest.approx(0.5)
    # tpr 1 needs threshold 1: adds the in-distribution 1 -> 5 / 8
    assert M.fpr_at_tpr(score_in, score_out, tpr=1.0).item() == pytest.approx(5 / 8)


def test_float32_inputs_give_float32_outputs():
    probs = PROBS.float()
    for fn in (M.accuracy, M.nll, M.brier, M.ece):
        value = fn(probs, LABELS)
        assert value.dtype == torch.float32 and value.dim() == 0
    assert M.ece(probs, LABELS, n_bins=2).item() == pytest.approx(0.08, abs=1e-6)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: M.ece(PROBS, LABELS, n_bins=0), "n_bins"),
        (lambda: M.nll(PROBS, LABELS[:3]), "labels"),
        (lambda: M.per_sample_nll(PROBS, LABELS), r"\[K, N, C\]"),
        (lambda: M.uncertainty(PROBS), r"\[K, N, C\]"),
        (lambda: M.selective_accuracy(CORRECT, SCORE, coverages=(0.0,)), "coverage"),
        (lambda: M.risk_coverage(CORRECT, SCORE[:2]), "correct"),
        (lambda: M.fpr_at_tpr(SCORE_IN, SCORE_OUT, tpr=1.5), "tpr"),
        (lambda: M.auroc(SCORE_IN, SCORE_OUT[:0]), "non-empty"),
        (lambda: M.aupr_in(SCORE_IN[:0], SCORE_OUT), "non-empty"),
        (lambda: M.energy_score(SCORE_IN), r"\[N, C\]"),
        (lambda: M.energy_score(PROBS, temperature=0.0), "temperature"),
        (lambda: M.max_logit_score(PROBS[:0]), r"\[N, C\]"),
    ],
)
def test_bad_arguments_raise_config_error(call, match):
    with pytest.raises(ConfigError, match=match):
        call()
