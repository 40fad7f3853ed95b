"""The baselines beside VI and AS, on real Fashion-MNIST subsets: deep ensembles, MC dropout,
temperature scaling on training data, logit OOD scores, corruption shift and the saved probabilities."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from asbnn import metrics
from asbnn.build import build_data, subset
from asbnn.calibration import fit_temperature, holdout_indices, logits_from_probs
from asbnn.cli import main
from asbnn.config import make_config
from asbnn.data import load_dataset
from asbnn.data.corruptions import CORRUPTIONS
from asbnn.dropout import MCDropout, dropout_hooks, set_training_generator
from asbnn.errors import CheckpointError, ConfigError
from asbnn.export import load_model, read_metadata, save_model
from asbnn.evaluate import sampled_predictions
from asbnn.models import create_model
from asbnn.predict import load_classifier, predict_images
from asbnn.results import compare_runs, evaluate_ensemble, evaluate_run
from asbnn.runfolder import load_run
from asbnn.train import train

TINY = dict(model="lenet5", dataset="fashion-mnist", epochs=1, train_subset=2000, test_subset=300,
            schedule="constant", eval_samples=4)


@pytest.fixture(scope="module")
def runs(shared_data, tmp_path_factory):
    """Two deterministic runs (seeds 0 and 1) and an MC-dropout run."""
    root = tmp_path_factory.mktemp("baselines")
    made = {}
    for name, extra in (("det0", dict(method="deterministic", seed=0)), ("det1", dict(method="deterministic", seed=1)),
                        ("mcd", dict(method="mc_dropout", dropout=0.2, seed=0))):
        cfg = make_config(overrides={**TINY, "data_root": str(shared_data), **extra})
        made[name] = train(cfg, root / name, progress=False)
    return made


# ---------------------------------------------------------------- MC dropout


def test_a_sampled_dropout_network_is_one_network_for_every_input():
    torch.manual_seed(0)
    net = MCDropout(create_model("lenet5", 10, 1, dropout=0.3)).eval()
    x = torch.randn(16, 1, 28, 28)
    gen = torch.Generator().manual_seed(5)
    mask_a, mask_b = net.sample_eps(gen), net.sample_eps(gen)
    # one mask entry per input channel / feature of every dropped layer (conv2, fc1, fc2, fc3)
    assert mask_a.shape == (6 + 400 + 120 + 84,) and set(mask_a.unique().tolist()) == {0.0, 1.0}
    whole = net(x, mask_a)
    assert torch.equal(whole, net(x, mask_a))  # two passes agree
    assert torch.allclose(whole, torch.cat([net(x[:5], mask_a), net(x[5:], mask_a)]), atol=1e-4)  # any batching
    assert torch.allclose(whole[3], net(x[3:4], mask_a)[0], atol=1e-4)  # per input as in the whole set
    assert not torch.equal(mask_a, mask_b) and not torch.allclose(whole, net(x, mask_b))
    assert torch.equal(net(x, "mean"), net.model(x))  # no mask: the plain network in eval mode


def test_dropout_adds_no_parameters_and_zero_dropout_is_the_plain_model():
    torch.manual_seed(0)
    plain = create_model("resnet20", 10, 3)
    torch.manual_seed(0)
    dropped = create_model("resnet20", 10, 3, dropout=0.1)
    assert plain.state_dict().keys() == dropped.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), dropped.state_dict().values()))
    assert not dropout_hooks(plain) and len(dropout_hooks(dropped)) == sum(
        isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in dropped.modules()) - 1


def test_training_dropout_draws_come_from_the_seeded_stream():
    net = create_model("mlp", 10, 1, dropout=0.5).train()
    x = torch.randn(8, 1, 28, 28)
    outputs = []
    for _ in range(2):
        set_training_generator(net, torch.Generator().manual_seed(3))
        outputs.append(net(x))
    assert torch.equal(*outputs)
    assert not torch.equal(outputs[0], net.eval()(x))


@pytest.mark.parametrize("overrides, message", [
    (dict(method="mc_dropout"), "method mc_dropout needs 0 < dropout < 1"),
    (dict(method="mc_dropout", dropout=1.0), "method mc_dropout needs 0 < dropout < 1"),
    (dict(method="vi", dropout=0.2), "dropout is a setting of method mc_dropout"),
])
def test_dropout_config_is_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_config(overrides=overrides)


def test_mc_dropout_run_is_evaluated_like_a_bayesian_one(runs, shared_data, tmp_path):
    result = evaluate_run(runs["mcd"], num_samples=5, data_root=str(shared_data), out=tmp_path, progress=False)
    assert result["num_samples"] == 5 and len(set(result["per_sample_accuracy"])) > 1
    assert 0.3 < result["sampled"]["lowest"] < result["sampled"]["highest"]  # chance is 0.1
    assert result["uncertainty"]["epistemic"] > 0 and "posterior_mean" in result
    net, cfg, _ = load_run(runs["mcd"])
    assert isinstance(net, MCDropout)  # a run of method mc_dropout loads as a distribution over masks
    plain = sampled_predictions(net.model, build_data(cfg, torch.device("cpu")).test)  # no masks: the mean network
    assert result["posterior_mean"]["accuracy"] == pytest.approx(float(metrics.accuracy(plain.ensemble_probs,
                                                                                        plain.labels)))
    assert "MC dropout (p 0.2) s0" in (tmp_path / "eval.md").read_text()


def test_mc_dropout_run_predicts_and_exports_as_sampled_networks(runs, shared_data, tmp_path):
    """`asbnn predict` and the .safetensors export see the masks, not only the mean network."""
    test = load_dataset("fashion-mnist", "test", shared_data)
    files = []
    for i in range(6):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(test.images[i, ..., 0]).save(files[-1])
    from_run = predict_images(load_classifier(runs["mcd"]), files, num_samples=8, seed=3)
    assert all(p.epistemic > 0 for p in from_run)  # masks disagree on every image
    model_file = save_model(runs["mcd"], tmp_path / "mcd.safetensors")
    loaded = load_model(model_file)
    assert isinstance(loaded, MCDropout) and read_metadata(model_file)["dropout"] == 0.2
    assert set(loaded.model.state_dict()) == set(create_model("lenet5", 10, 1).state_dict())  # plain keys
    from_file = predict_images(load_classifier(model_file), files, num_samples=8, seed=3)
    for a, b in zip(from_run, from_file):
        assert [c for c, _ in a.top] == [c for c, _ in b.top]
        assert a.epistemic == pytest.approx(b.epistemic, rel=1e-4, abs=1e-6)
    with pytest.raises(CheckpointError, match="MC-dropout network"):
        load_model(model_file, model=create_model("lenet5", 10, 1))  # a bare model without dropout layers


# ---------------------------------------------------------------- deep ensembles


def test_deep_ensemble_members_play_the_sampled_networks(runs, shared_data, tmp_path):
    members = [runs["det0"], runs["det1"]]
    result = evaluate_ensemble(members, out=tmp_path / "ens", data_root=str(shared_data), ood=["mnist"],
                               progress=False)
    assert result["method"] == "deep_ensemble" and result["num_samples"] == 2
    singles = []
    for run in members:
        net, cfg, _ = load_run(run)
        singles.append(sampled_predictions(net, build_data(cfg, torch.device("cpu")).test))
    n = len(singles[0].labels)
    assert result["per_sample_accuracy"] == pytest.approx([float(s.sample_correct[0]) / n for s in singles])
    mean = (singles[0].ensemble_probs + singles[1].ensemble_probs) / 2
    assert result["ensemble"]["accuracy"] == pytest.approx(float(metrics.accuracy(mean, singles[0].labels)))
    assert result["ensemble"]["nll"] == pytest.approx(float(metrics.nll(mean, singles[0].labels)), rel=1e-5)
    assert result["uncertainty"]["epistemic"] > 0
    assert set(result["ood"]["mnist"]) == {"total", "epistemic", "energy", "max_logit"}
    for key in ("lowest", "highest", "mean"):
        assert key in result["sampled"]
    for key in ("brier", "ece"):
        assert key in result["ensemble"]
    assert "selective" in result and "aurc" in result
    evaluate_run(runs["mcd"], num_samples=3, data_root=str(shared_data), progress=False)
    text = compare_runs([tmp_path / "ens", runs["mcd"]], out=tmp_path / "cmp")
    assert "deep ensemble x2" in text and "MC dropout (p 0.2) s0" in text


def test_ensembles_need_distinct_deterministic_members(runs, shared_data, capsys):
    with pytest.raises(ConfigError, match="deep ensemble is made of deterministic runs"):
        evaluate_ensemble([runs["det0"], runs["mcd"]], data_root=str(shared_data), progress=False)
    with pytest.raises(ConfigError, match="the same network twice"):
        evaluate_ensemble([runs["det0"], runs["det0"]], data_root=str(shared_data), progress=False)
    assert main(["eval", str(runs["det0"]), str(runs["det1"])]) == 2
    assert "--ensemble" in capsys.readouterr().err


# ---------------------------------------------------------------- calibration, OOD, shift, saved files


def test_holdout_is_a_fixed_tenth_of_the_training_set():
    a = holdout_indices(2000)
    assert len(a) == 200 and np.array_equal(a, holdout_indices(2000)) and np.all(np.diff(a) > 0)
    assert len(holdout_indices(60000)) == 5000 and a.max() < 2000


def test_every_reported_number_can_be_recomputed_from_the_saved_files(runs, shared_data, tmp_path):
    result = evaluate_ensemble([runs["det0"], runs["det1"]], out=tmp_path, data_root=str(shared_data),
                               ood=["mnist"], calibrate=True, shift=True, shift_samples=2, shift_subset=100,
                               save_probs=True, progress=False)
    out = tmp_path / "eval"
    assert json.loads((out / "eval.json").read_text())["calibration"] == result["calibration"]
    test, ood = np.load(out / "probs.npz"), np.load(out / "ood-mnist.npz")
    assert test["probs"].dtype == np.float16 and not test["ood"].any() and ood["ood"].all()
    probs, labels = torch.from_numpy(test["probs"]).float().mean(0), torch.from_numpy(test["labels"])
    assert float(metrics.accuracy(probs, labels)) == pytest.approx(result["ensemble"]["accuracy"], abs=2 / len(labels))
    assert float(metrics.nll(probs, labels)) == pytest.approx(result["ensemble"]["nll"], abs=2e-3)
    # OOD by energy of the mean logits, AUPR both ways
    e_in = metrics.energy_score(torch.from_numpy(test["mean_logits"]))
    e_out = metrics.energy_score(torch.from_numpy(ood["mean_logits"]))
    by_energy = result["ood"]["mnist"]["energy"]
    assert by_energy["auroc"] == pytest.approx(float(metrics.auroc(e_in, e_out)))
    assert by_energy["aupr_in"] == pytest.approx(float(metrics.aupr_in(e_in, e_out)))
    assert by_energy["aupr"] == pytest.approx(float(metrics.aupr(e_in, e_out)))
    # temperature fitted on training images only: the saved hold-out is the training set at holdout_indices
    cal = np.load(out / "calibration.npz")
    train = subset(load_dataset("fashion-mnist", "train", str(shared_data)), TINY["train_subset"])
    indices = holdout_indices(TINY["train_subset"])
    assert np.array_equal(cal["labels"], train.labels[indices]) and result["calibration"]["holdout"]["images"] == 200
    held = torch.from_numpy(cal["probs"]).float().mean(0)
    assert fit_temperature(logits_from_probs(held), torch.from_numpy(cal["labels"])) == pytest.approx(
        result["calibration"]["temperature"], rel=1e-2)
    assert set(result["calibration"]["before"]) == set(result["calibration"]["after"]) == {"nll", "ece"}
    # shift: every corruption and severity, recomputable, with its plot
    shift = result["shift"]
    assert shift["num_samples"] == 2 and shift["num_inputs"] == 100
    assert set(shift["corruptions"]) == set(CORRUPTIONS)
    assert all(set(by) == {"1", "2", "3", "4", "5"} for by in shift["corruptions"].values())
    noisy = np.load(out / "shift-gaussian_noise-5.npz")
    acc = float(metrics.accuracy(torch.from_numpy(noisy["probs"]).float().mean(0), torch.from_numpy(noisy["labels"])))
    assert acc == pytest.approx(shift["corruptions"]["gaussian_noise"]["5"]["accuracy"], abs=0.02)
    assert shift["mean_by_severity"]["5"]["accuracy"] < shift["clean"]["accuracy"]
    assert (out / "shift.png").stat().st_size > 0
    text = (out / "eval.md").read_text()
    assert "AUPR-in" in text and "ECE after" in text and "sev. 5" in text
