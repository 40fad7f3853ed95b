"""The command line: every bad input gets one clear line and exit code 2, never a traceback."""

import argparse
import gzip
import shutil
from pathlib import Path

import pytest

from asbnn.cli import main
from asbnn.config import make_config, parse_overrides
from asbnn.errors import ConfigError


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("overrides, message", [
    (["model=resnet21"], "unknown model 'resnet21'; valid: allconv, lenet5, mlp, resnet20"),
    (["dataset=cifar11"], "unknown dataset 'cifar11'; valid: cifar10, cifar100"),
    (["as_lambda=1.5"], "as_lambda must be in [0, 1]"),
    (["as_lambda=-0.2"], "as_lambda must be in [0, 1]"),
    (["as_step_size=-0.1"], "as_step_size (alpha) must be >= 0"),
    (["as_steps=-1"], "as_steps (N) must be >= 0"),
    (["as_steps=2.5"], "as_steps must be an integer"),
    (["epochs=0"], "epochs must be > 0"),
    (["batch_size=-5"], "batch_size must be > 0"),
    (["batch_size=100000"], "batch size 100000 is larger than the data set (60000 samples)"),
    (["lr=fast"], "lr must be a finite number"),
    (["epoch=3"], "unknown config key 'epoch' in the overrides; did you mean 'epochs'?"),
    (["method=bayes"], "method must be one of deterministic, vi, as"),
    (["as_layers=conv"], "as_layers must be one of all, normalised"),
    (["model=mlp", "method=as", "as_layers=normalised"], "as_layers 'normalised': this Sequential has no Bayesian BatchNorm"),
    (["epochs"], "not of the form key=value"),
])
def test_bad_train_inputs_give_one_clear_line(capsys, tmp_path, shared_data, overrides, message):
    code, _, err = run_cli(capsys, "train", "quickstart", *overrides, "--data-root", str(shared_data),
                           "--out", str(tmp_path / "run"), "--quiet")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("asbnn: error: ")
    assert message in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_missing_and_corrupt_data_files(capsys, tmp_path, shared_data):
    code, _, err = run_cli(capsys, "train", "quickstart", "--data-root", str(tmp_path), "--quiet")
    assert code == 2 and "fashion-mnist" in err and str(tmp_path) in err and err.count("\n") == 1

    root = tmp_path / "root"
    shutil.copytree(shared_data / "fashion-mnist", root / "fashion-mnist")
    broken = root / "fashion-mnist" / "train-labels-idx1-ubyte.gz"
    broken.chmod(0o644)
    broken.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 10))
    code, _, err = run_cli(capsys, "train", "quickstart", "--data-root", str(root), "--quiet",
                           "--out", str(tmp_path / "run"))
    assert code == 2 and "train-labels-idx1-ubyte.gz" in err and err.count("\n") == 1


def test_missing_config_and_checkpoint(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", str(tmp_path / "nope.yaml"))
    assert code == 2 and "config file not found" in err
    code, _, err = run_cli(capsys, "train", "table9")
    assert code == 2 and "shipped: " in err and "quickstart" in err
    code, _, err = run_cli(capsys, "eval", str(tmp_path))
    assert code == 2 and "checkpoint not found" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1, 2\n")
    code, _, err = run_cli(capsys, "train", str(bad))
    assert code == 2 and "not valid YAML" in err


def test_every_shipped_config_is_valid():
    from asbnn.cli import PACKAGE_CONFIGS
    from asbnn.config import make_config

    configs = sorted(PACKAGE_CONFIGS.glob("*.yaml"))
    assert len(configs) >= 31
    for path in configs:
        make_config(path)


# ---------------------------------------------------------------- every flag is checked as it is read


def bad_values(tmp_path):
    """A bad value for every argument of every subcommand, and what the error line must name."""
    file, missing = tmp_path / "a-file", str(tmp_path / "missing")
    file.write_text("x")
    image = tmp_path / "image.png"
    from PIL import Image
    Image.new("RGB", (8, 8)).save(image)
    not_evaluated = tmp_path / "not-evaluated"
    not_evaluated.mkdir()
    return {
        "train": {
            "config": (["nope.yaml"], "nope.yaml"),
            "overrides": (["quickstart", "epochs"], "'epochs'"),
            "out": (["quickstart", "--out", str(file)], "--out"),
            "resume": (["quickstart", "--resume=yes"], "--resume"),
            "overwrite": (["quickstart", "--overwrite=yes"], "--overwrite"),
            "preset": (["quickstart", "--preset", "papr"], "--preset"),
            "data_root": (["quickstart", "--data-root", missing], "--data-root"),
            "device": (["quickstart", "--device", "gpu"], "--device"),
            "no_eval": (["quickstart", "--no-eval=1"], "--no-eval"),
            "quiet": (["quickstart", "--quiet=1"], "--quiet"),
        },
        "eval": {
            "run": ([missing], missing),
            "samples": ([missing, "--samples", "0"], "--samples"),
            "seed": ([missing, "--seed", "-1"], "--seed"),
            "ood": ([missing, "--ood", "cifar11"], "--ood"),
            "data": ([missing, "--data", missing], "--data"),
            "data_root": ([missing, "--data-root", missing], "--data-root"),
            "out": ([missing, "--out", str(file)], "--out"),
            "mode": ([missing, "--mode", "fast"], "--mode"),
            "save_probs": ([missing, "--save-probs=1"], "--save-probs"),
            "device": ([missing, "--device", "cuda:x"], "--device"),
            "amp": ([missing, "--amp=1"], "--amp"),
            "bn_recalibrate": ([missing, "--bn-recalibrate=1"], "--bn-recalibrate"),
            "all_test_images": ([missing, "--all-test-images=1"], "--all-test-images"),
            "ensemble": ([missing, "--ensemble=1"], "--ensemble"),
            "calibrate": ([missing, "--calibrate=1"], "--calibrate"),
            "shift": ([missing, "--shift=1"], "--shift"),
            "shift_samples": ([missing, "--shift-samples", "0"], "--shift-samples"),
            "shift_subset": ([missing, "--shift-subset", "-5"], "--shift-subset"),
        },
        "compare": {
            "runs": ([str(not_evaluated)], str(not_evaluated)),
            "out": ([str(not_evaluated), "--out", str(file)], "--out"),
            "csv": ([str(not_evaluated), "--csv", str(Path(missing) / "table.csv")], "--csv"),
        },
        "predict": {
            "model": ([missing, str(image)], missing),
            "images": ([missing, missing + ".png"], missing + ".png"),
            "samples": ([missing, str(image), "--samples", "-3"], "--samples"),
            "seed": ([missing, str(image), "--seed", "-1"], "--seed"),
            "top": ([missing, str(image), "--top", "0"], "--top"),
            "json": ([missing, str(image), "--json=1"], "--json"),
            "device": ([missing, str(image), "--device", "tpu"], "--device"),
        },
        "quickstart": {
            "out": (["--out", str(file)], "--out"),
            "data_root": (["--data-root", missing], "--data-root"),
            "quiet": (["--quiet=1"], "--quiet"),
        },
        "reproduce": {
            "tables": (["table9"], "table9"),
            "scale": (["table1", "--scale", "huge"], "huge"),
            "seeds": (["table1", "--seeds", "0"], "--seeds"),
            "out": (["table1", "--out", str(file)], "--out"),
            "data_root": (["table1", "--data-root", missing], "--data-root"),
            "device": (["table1", "--device", "cuda:"], "--device"),
            "quiet": (["table1", "--quiet=1"], "--quiet"),
            "report_only": (["table1", "--report-only=1"], "--report-only"),
        },
        "download": {
            "dataset": (["mnist"], "'mnist'"),
            "data_root": (["cifar10", "--data-root", str(file)], "--data-root"),
        },
    }


def test_every_flag_of_every_subcommand_refuses_a_bad_value_in_one_line(capsys, tmp_path):
    from asbnn.cli import build_parser

    cases = bad_values(tmp_path)
    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(subcommands) == set(cases)
    for command, parser in subcommands.items():
        dests = {a.dest for a in parser._actions if not isinstance(a, argparse._HelpAction)}
        assert dests == set(cases[command]), f"asbnn {command}: give each argument a bad value here"
        for dest, (args, named) in cases[command].items():
            code, out, err = run_cli(capsys, command, *args)
            assert code == 2 and err.startswith("asbnn: error: ") and err.count("\n") == 1, (command, args, err)
            assert named in err, (command, args, err)


def test_seed_minus_one_is_one_line_for_eval_and_predict(capsys, tmp_path):
    for command in (["eval", str(tmp_path)], ["predict", str(tmp_path), str(tmp_path)]):
        code, _, err = run_cli(capsys, *command, "--seed", "-1")
        assert code == 2 and err.count("\n") == 1 and "--seed: must be an integer in [0, 2**64), got '-1'" in err


def test_help_still_exits_0(capsys):
    assert main(["eval", "--help"]) == 0 and "--seed" in capsys.readouterr().out


# ---------------------------------------------------------------- an empty config is no config


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n  # and another\n", "{}\n", "---\n"])
def test_an_empty_config_file_is_an_error(capsys, tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    code, _, err = run_cli(capsys, "train", str(path), "--out", str(tmp_path / "run"))
    assert code == 2 and err.count("\n") == 1 and f"config file {path} is empty (or only comments)" in err
    assert not (tmp_path / "run").exists()


def test_train_without_a_config_or_settings_is_an_error(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--out", str(tmp_path / "run"), "--quiet")
    assert code == 2 and err.count("\n") == 1 and "name a config file or a shipped config" in err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- suggestions, by spelling and by meaning


@pytest.mark.parametrize("key, suggested", [
    ("lam", "'as_lambda' (the paper's lambda)"),
    ("lambda", "'as_lambda' (the paper's lambda)"),
    ("as_alpha", "'as_step_size' (the paper's alpha)"),
    ("alpha", "'as_step_size' (the paper's alpha)"),
    ("N", "'as_steps' (the paper's N)"),
    ("as_n", "'as_steps' (the paper's N)"),
    ("sigma0", "'prior_sigma' (the paper's sigma0)"),
    ("beta", "'kl_weight' (the paper's beta)"),
    ("step_size", "'as_step_size' (the paper's alpha)"),
    ("lamda", "'as_lambda' (the paper's lambda)"),
    ("epoch", "'epochs'"),
])
def test_unknown_keys_suggest_the_key_they_mean(key, suggested):
    with pytest.raises(ConfigError) as err:
        make_config(overrides=parse_overrides([f"{key}=0.5"]))
    assert f"unknown config key '{key}' in the overrides; did you mean {suggested}?" in str(err.value)


def test_as_layers_reaches_the_as_settings_and_defaults_to_all():
    assert make_config(overrides={"method": "as"}).as_config().layers == "all"
    assert make_config(overrides=parse_overrides(["as_layers=normalised"])).as_config().layers == "normalised"
    with pytest.raises(ConfigError, match="did you mean 'as_layers'"):
        make_config(overrides={"layers": "normalised"})


def test_a_key_close_to_nothing_lists_the_valid_keys():
    with pytest.raises(ConfigError, match="; valid keys: model, dataset, method"):
        make_config(overrides={"zzz": 1})


def test_settings_may_come_after_the_options(capsys, tmp_path, shared_data):
    base = ["train", "quickstart", "--data-root", str(shared_data), "--out", str(tmp_path / "run")]
    for args in ([*base, "model=resnet21"], [*base, "--quiet", "model=resnet21"],
                 ["train", "quickstart", "model=mlp", "--quiet", "model=resnet21"]):
        code, _, err = run_cli(capsys, *args)
        assert code == 2 and "unknown model 'resnet21'" in err, args
    code, _, err = run_cli(capsys, "download", "cifar10", "epochs=3")  # other subcommands take no settings
    assert code == 2 and "unrecognized arguments: epochs=3" in err
