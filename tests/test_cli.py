"""The command line: every bad input gets one clear line and exit code 2, never a traceback."""

import gzip
import shutil

import pytest

from asbnn.cli import main


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
