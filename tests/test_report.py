import matplotlib
import matplotlib.image
import numpy as np
import pytest
import torch

from asbnn import report
from asbnn.errors import ConfigError

# Any warning (empty-slice means, NaN casts, legends with no artists, log of zero) is a bug here.
pytestmark = pytest.mark.filterwarnings("error")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RNG = np.random.default_rng(0)


def assert_real_png(path, min_width=400, min_height=300):
    """The file is a PNG of a sensible size with visible content, not a blank canvas."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    height, width = image.shape[:2]
    assert width >= min_width and height >= min_height
    rgb = image[..., :3].reshape(-1, 3)
    assert rgb.std() > 0.05
    assert len(np.unique(np.round(rgb, 2), axis=0)) > 10


def calibration_bins(n_bins=10, empty=(0, 1, 2)):
    """Slightly overconfident bins; the low-confidence ones are empty, as for a trained model."""
    conf = (np.arange(n_bins) + 0.5) / n_bins
    acc = np.clip(conf - 0.05, 0, 1)
    count = RNG.integers(5, 500, n_bins).astype(float)
    for i in empty:
        conf[i], acc[i], count[i] = 0.0, np.nan, 0.0
    return {"confidence": conf, "accuracy": acc, "count": count}


def test_sample_accuracies(tmp_path):
    runs = {"VI": RNG.normal(80, 3, 100), "VI + AS": torch.tensor(RNG.normal(85.5, 0.4, 100))}
    path = report.plot_sample_accuracies(runs, tmp_path / "nested" / "dir" / "acc.png")
    assert path == tmp_path / "nested" / "dir" / "acc.png"
    assert_real_png(path)


def test_sample_accuracies_single_model_and_fractions(tmp_path):
    # One sampled model (zero spread) next to a run given as fractions of 1.
    path = report.plot_sample_accuracies({"VI": [0.86], "VI + AS": [0.85, 0.86, 0.87]}, tmp_path / "one.png")
    assert_real_png(path)


def test_reliability_skips_empty_bins(tmp_path):
    runs = {"VI": {**calibration_bins(), "ece": 0.031}, "VI + AS": calibration_bins(empty=(0, 5))}
    assert_real_png(report.plot_reliability(runs, tmp_path / "rel.png"))


def test_reliability_takes_metrics_output(tmp_path):
    from asbnn import metrics

    probs = torch.softmax(torch.randn(200, 10, generator=torch.Generator().manual_seed(0)) * 3, dim=1)
    labels = torch.randint(0, 10, (200,), generator=torch.Generator().manual_seed(1))
    bins = {**metrics.calibration_bins(probs, labels, adaptive=True), "ece": metrics.ece(probs, labels).item()}
    assert_real_png(report.plot_reliability({"VI": bins}, tmp_path / "rel1.png"), min_width=300)


def test_reliability_all_empty_raises(tmp_path):
    bins = calibration_bins(n_bins=3, empty=(0, 1, 2))
    with pytest.raises(ConfigError, match="every bin is empty"):
        report.plot_reliability({"VI": bins}, tmp_path / "x.png")


def test_risk_coverage(tmp_path):
    n = 500
    coverage = np.arange(1, n + 1) / n
    curves = {
        "VI (AURC 3.10)": (coverage, np.sort(RNG.uniform(0, 0.2, n))),
        "VI + AS (AURC 2.40)": (torch.tensor(coverage), torch.tensor(np.sort(RNG.uniform(0, 0.15, n)))),
    }
    assert_real_png(report.plot_risk_coverage(curves, tmp_path / "rc.png"))


def test_risk_coverage_length_mismatch(tmp_path):
    with pytest.raises(ConfigError, match="coverages"):
        report.plot_risk_coverage({"VI": ([0.5, 1.0], [0.1])}, tmp_path / "x.png")


def test_ood_scores(tmp_path):
    scores = {
        "total": (RNG.gamma(1, 0.2, 1000), RNG.gamma(4, 0.3, 800)),
        "epistemic": (torch.tensor(RNG.gamma(1, 0.02, 1000)), torch.tensor(RNG.gamma(3, 0.05, 800))),
    }
    assert_real_png(report.plot_ood_scores(scores, tmp_path / "ood.png"))


def test_ood_scores_reject_nan(tmp_path):
    with pytest.raises(ConfigError, match="NaN"):
        report.plot_ood_scores({"total": ([0.1, float("nan")], [0.5, 0.6])}, tmp_path / "x.png")


def test_training_curves(tmp_path):
    def log(final, seed):
        rng = np.random.default_rng(seed)
        records = [{"epoch": e, "train_loss": 1 / e} for e in range(1, 21)]
        for rec in records[1::2]:  # evaluated every other epoch only
            rec["test_acc"] = final * (1 - np.exp(-rec["epoch"] / 4)) + rng.normal(0, 0.005)
            rec["test_acc_sample"] = rec["test_acc"] - 0.03
        return records

    logs = {"VI seed 0": log(0.86, 0), "VI seed 1": log(0.85, 1), "VI + AS seed 0": log(0.88, 2)}
    logs["VI + AS seed 0"][5]["test_acc_sample"] = None
    assert_real_png(report.plot_training_curves(logs, tmp_path / "curves.png"))


def test_training_curves_without_keys_raises(tmp_path):
    with pytest.raises(ConfigError, match="no record"):
        report.plot_training_curves({"VI": [{"epoch": 1, "loss": 2.0}]}, tmp_path / "x.png")


def test_lambda_sweep(tmp_path):
    lams = [0.0, 0.1, 0.5, 1.0, 2.0]
    series = {
        "lowest": ([70.1, 78.2, 82.0, 83.5, 83.0], [1.2, 0.9, 0.5, 0.4, 0.6]),
        "highest": ([86.0, 86.2, 86.1, 86.3, 85.9], [0.3, 0.2, 0.3, 0.2, 0.4]),
        "ensemble": (np.array([86.5, 86.8, 86.9, 87.0, 86.7]), np.zeros(5)),
    }
    assert_real_png(report.plot_lambda_sweep(lams, series, tmp_path / "sweep.png"))


def test_lambda_sweep_length_mismatch(tmp_path):
    with pytest.raises(ConfigError, match="lambdas"):
        report.plot_lambda_sweep([0.0, 1.0], {"lowest": ([70.0], [1.0])}, tmp_path / "x.png")


def test_colours_stay_with_labels_and_never_repeat_within_a_figure():
    first = report._colours(["colour test A", "colour test B"])
    assert len(set(first.values())) == 2
    assert report._colours(["colour test B", "colour test C"])["colour test B"] == first["colour test B"]
    many = [f"colour test {i}" for i in range(len(report.PALETTE))]
    assert len(set(report._colours(many).values())) == len(report.PALETTE)


def test_plotting_leaves_global_rcparams_alone(tmp_path):
    before = dict(matplotlib.rcParams)
    report.plot_sample_accuracies({"VI": [80.0, 81.0]}, tmp_path / "a.png")
    assert dict(matplotlib.rcParams) == before


def test_markdown_table():
    table = report.markdown_table(
        ["method", "accuracy (%)", "epochs", "ECE"],
        [["VI", 86.333, 100, "2.10 ± 0.30"], ["VI + AS", np.float32(87.5), 100, "1.80 ± 0.20"]],
    )
    lines = table.splitlines()
    assert len(lines) == 4
    assert all(line.startswith("| ") and line.endswith(" |") for line in lines)
    assert all(line.count("|") == 5 for line in lines)
    align = [cell.strip() for cell in lines[1].strip("|").split("|")]
    assert align[0].startswith(":") and not align[0].endswith(":")
    assert all(cell.endswith(":") and not cell.startswith(":") for cell in align[1:])
    assert "| VI      |" in lines[2]
    assert " 86.33 |" in lines[2] and " 87.50 |" in lines[3]
    assert " 100 |" in lines[2]
    assert len({len(line) for line in lines}) == 1  # padded into a rectangle


def test_markdown_table_escapes_pipes_and_checks_rows():
    assert r"a\|b" in report.markdown_table(["x"], [["a|b"]])
    with pytest.raises(ConfigError, match="row 1"):
        report.markdown_table(["a", "b"], [[1, 2], [3]])


def test_markdown_table_without_rows():
    assert report.markdown_table(["a", "b"], []).splitlines() == ["| a   | b   |", "| :-- | :-- |"]


def test_mean_std():
    assert report.mean_std([1, 2, 3]) == "2.00 ± 1.00"
    assert report.mean_std([0.8633]) == "0.86"
    assert report.mean_std([0.8633], scale=100) == "86.33"
    assert report.mean_std(np.array([0.86, 0.87]), scale=100, digits=1) == "86.5 ± 0.7"
    assert report.mean_std(torch.tensor([0.5, 0.5]), scale=100) == "50.00 ± 0.00"
    with pytest.raises(ConfigError):
        report.mean_std([])


def test_scatter_panels_with_companion_lines_and_a_legend_beside_many_lines(tmp_path):
    """A companion is drawn dashed in its partner's colour, also where the partner is missing from a
    panel; with more labels than fit inside a panel, the legend goes beside the panels."""
    cost = [1000.0, 2000.0, 7000.0]
    cells = {f"cell {i}": (cost, list(RNG.uniform(60, 85, 3))) for i in range(4)}
    longer = {f"cell {i}, longer": (cost, list(RNG.uniform(60, 85, 3))) for i in range(4)}
    panels = {"running": {**cells, **longer}, "recalibrated": {"cell 0, longer": (cost, [70.0, 71.0, 72.0])}}
    path = report.plot_scatter_panels(panels, "cost", "lowest (%)", tmp_path / "cost.png", connect=True, log_x=True,
                                      companions={f"cell {i}, longer": f"cell {i}" for i in range(4)})
    assert_real_png(path)
