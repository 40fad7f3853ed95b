"""The training loop on real data: it learns, it resumes exactly, and fine-tune starts from the means."""

import json

import pytest
import torch

import asbnn.hardware as hardware
import asbnn.train as train_module
from asbnn.config import make_config
from asbnn.errors import CheckpointError, ConfigError
from asbnn.build import build_network
from asbnn.data import dataset_info
from asbnn.runfolder import deterministic_weights, load_run
from asbnn.train import train


def small(shared_data, **overrides):
    values = dict(model="lenet5", dataset="fashion-mnist", data_root=str(shared_data), epochs=2,
                  train_subset=6000, test_subset=1000, batch_size=100, schedule="cosine", eval_samples=5)
    return make_config(overrides={**values, **overrides})


@pytest.mark.parametrize("method", ["deterministic", "vi", "as"])
def test_short_training_clearly_beats_chance(shared_data, tmp_path, method):
    run = train(small(shared_data, method=method, as_steps=2, train_subset=3000), tmp_path / method, progress=False)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert log[-1]["test_acc"] > 0.4  # chance is 0.1
    assert log[-1]["precision"] in ("bf16", "fp32")  # measured (amp: auto); the policy: test_hardware.py
    if method != "deterministic":
        assert log[-1]["test_acc_sample"] > 0.4
        assert {"kl", "mean_sigma", "train_loss", "train_acc", "epoch_time"} <= set(log[-1])


@pytest.mark.parametrize("variant", ["standard", "free"])
def test_resume_after_a_kill_ends_with_the_same_weights(shared_data, tmp_path, monkeypatch, variant):
    cfg = small(shared_data, method="as", as_steps=2, epochs=3, train_subset=600, test_subset=200, as_variant=variant)
    train(cfg, tmp_path / "whole", progress=False)

    real_save = train_module.save_checkpoint

    def save_then_die(state, path):
        real_save(state, path)
        if state["epoch"] == 2:
            raise KeyboardInterrupt  # killed right after the second epoch's checkpoint

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "killed", progress=False)
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    train(cfg, tmp_path / "killed", resume=True, progress=False)

    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)["net"]
    resumed = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)["net"]
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    log = (tmp_path / "killed" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log] == [1, 2, 3]


def test_existing_run_needs_resume_and_the_same_config(shared_data, tmp_path):
    cfg = small(shared_data, method="vi", epochs=1)
    train(cfg, tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg, tmp_path / "run", progress=False)
    with pytest.raises(CheckpointError, match=r"different config \(lr\)"):
        train(small(shared_data, method="vi", epochs=1, lr=0.1), tmp_path / "run", resume=True, progress=False)


def test_resume_accepts_speed_switches_and_older_checkpoints_but_not_another_precision(
        shared_data, tmp_path, monkeypatch):
    cfg = small(shared_data, method="vi", epochs=2, train_subset=1000)
    real_save = train_module.save_checkpoint

    def save_then_die(state, path):
        real_save(state, path)
        raise KeyboardInterrupt  # killed right after the first epoch's checkpoint

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "run", progress=False)
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    first = torch.load(ckpt, weights_only=False)

    monkeypatch.setattr(hardware, "cpu_features", lambda: frozenset({"avx2"}))  # a CPU without native bf16
    torch.save({**first, "precision": "bf16"}, ckpt)
    with pytest.raises(CheckpointError, match="trained in bf16"):
        train(cfg, tmp_path / "run", resume=True, progress=False)
    monkeypatch.undo()

    older = {**first, "config": {k: v for k, v in first["config"].items() if k not in ("channels_last", "compile")}}
    del older["precision"]  # as written before these keys existed
    torch.save(older, ckpt)
    faster = small(shared_data, method="vi", epochs=2, train_subset=1000, channels_last=True)
    train(faster, tmp_path / "run", resume=True, progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]

    state = torch.load(ckpt, weights_only=False)
    state["config"]["from_the_future"] = 1  # a key only a newer version knows
    torch.save(state, ckpt)
    with pytest.raises(CheckpointError, match="from_the_future"):
        train(faster, tmp_path / "run", resume=True, progress=False)


def test_bayesian_fine_tune_starts_from_the_deterministic_weights(shared_data, tmp_path):
    det = train(small(shared_data, method="deterministic", epochs=1), tmp_path / "det", progress=False)
    det_net, _, _ = load_run(det)
    cfg = small(shared_data, method="vi", epochs=1, init_from=str(det))
    net = build_network(cfg, dataset_info("fashion-mnist"), deterministic_weights(cfg.init_from, cfg.model))
    means = net.weights("mean")
    for name, value in det_net.state_dict().items():
        if name in means:
            assert torch.equal(means[name], value), name
        else:
            assert torch.equal(net.model.state_dict()[name], value), name
    train(cfg, tmp_path / "vi", progress=False)
    with pytest.raises(ConfigError, match="deterministic"):  # only a deterministic run can be the start
        train(small(shared_data, method="vi", epochs=1, init_from=str(tmp_path / "vi")), tmp_path / "vi2", progress=False)


def test_learning_rate_schedules():
    cfg = make_config(overrides={"epochs": 200})
    lrs = [train_module.learning_rate(cfg, e) for e in (0, 79, 80, 139, 140, 180, 199)]
    assert lrs == pytest.approx([0.01, 0.01, 0.001, 0.001, 1e-4, 1e-5, 1e-5])


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_nan_batch_stops_the_run_or_is_skipped(shared_data, tmp_path, monkeypatch, policy):
    from asbnn.data import DeviceLoader
    from asbnn.errors import AsbnnError

    real = DeviceLoader.batches

    def poisoned(self, generator=None):
        for i, (x, y) in enumerate(real(self, generator)):
            yield (torch.full_like(x, float("nan")) if self.train and i == 2 else x), y

    monkeypatch.setattr(DeviceLoader, "batches", poisoned)
    cfg = small(shared_data, method="vi", epochs=1, train_subset=1000, nonfinite=policy)
    if policy == "stop":
        with pytest.raises(AsbnnError, match="epoch 1, step 3"):
            train(cfg, tmp_path / "run", progress=False)
        assert not (tmp_path / "run" / "checkpoint.pt").exists()
    else:
        train(cfg, tmp_path / "run", progress=False)
        record = json.loads((tmp_path / "run" / "log.jsonl").read_text())
        assert record["skipped_steps"] == 1 and record["train_loss"] == pytest.approx(record["train_loss"])
        state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["net"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_test_split_with_classes_the_model_does_not_have(tmp_path):
    from PIL import Image

    from asbnn.errors import DataError

    for split, classes in (("train", ["cat", "dog"]), ("test", ["cat", "dog", "emu"])):
        for name in classes:
            folder = tmp_path / "pets" / split / name
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"{i}.png")
    cfg = make_config(overrides=dict(model="lenet5", dataset=str(tmp_path / "pets"), method="vi", epochs=1,
                                     batch_size=2))
    with pytest.raises(DataError, match="different classes .*emu"):
        train(cfg, tmp_path / "run", progress=False)


@pytest.mark.slow  # torch.compile
def test_compile_and_channels_last_change_speed_not_results(shared_data, tmp_path):
    """A compiled step on NHWC batches computes what the eager NCHW step does, AS passes and BatchNorm
    policy included, and its run is checkpointed and evaluated as a plain one.

    Plain SGD: the two sum in other orders, and Adam would turn that rounding noise in near-zero
    gradients into full-size steps, by an amount that depends on the CPU's kernels."""
    values = dict(dataset="cifar10", method="as", as_steps=2, epochs=1, train_subset=300, test_subset=200,
                  amp=False, eval_samples=2, optimizer="sgd", momentum=0.0)
    eager = train(small(shared_data, **values), tmp_path / "eager", progress=False)
    fast = train(small(shared_data, **values, compile=True, channels_last=True), tmp_path / "fast", progress=False)
    log_eager, log_fast = (json.loads((run / "log.jsonl").read_text()) for run in (eager, fast))
    assert log_fast["train_loss"] == pytest.approx(log_eager["train_loss"], rel=1e-3)
    net_eager, _, _ = load_run(eager)
    net_fast, cfg, _ = load_run(fast)
    assert cfg.compile and cfg.channels_last
    state_eager, state_fast = net_eager.state_dict(), net_fast.state_dict()
    assert state_fast.keys() == state_eager.keys()
    for key in state_eager:
        if "running" in key:  # frozen during the AS passes, updated by the regular one, in both runs
            initial = torch.ones_like if key.endswith("var") else torch.zeros_like
            assert not torch.equal(state_fast[key], initial(state_fast[key]))
            assert torch.allclose(state_fast[key], state_eager[key], rtol=1e-3, atol=1e-4), key


def test_compile_without_a_cpu_compiler_is_a_config_error(shared_data, tmp_path, monkeypatch):
    monkeypatch.setattr(hardware.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="C\\+\\+ compiler"):
        train(small(shared_data, compile=True), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_resuming_a_finished_run_with_tensorboard_and_progress(shared_data, tmp_path, capsys):
    """Nothing is left to train: the run ends at once, without a summary of an epoch it did not train."""
    cfg = small(shared_data, method="vi", epochs=1, train_subset=300, test_subset=100, tensorboard=True)
    train(cfg, tmp_path / "run", progress=True)
    assert "epoch 1  train_loss" in capsys.readouterr().out
    log = (tmp_path / "run" / "log.jsonl").read_text()
    train(cfg, tmp_path / "run", resume=True, progress=True)  # an UnboundLocalError before
    assert "train_loss" not in capsys.readouterr().out
    assert (tmp_path / "run" / "log.jsonl").read_text() == log


@pytest.mark.parametrize("terminal", [False, True], ids=["log-file", "terminal"])
def test_progress_is_one_line_per_epoch_unless_on_a_terminal(shared_data, tmp_path, capsys, monkeypatch, terminal):
    """A log file (CI, nohup) gets one line per epoch; carriage-return bar updates only on a terminal."""
    monkeypatch.setattr(train_module, "on_terminal", lambda: terminal, raising=False)
    cfg = small(shared_data, method="vi", epochs=2, train_subset=500, test_subset=100)
    train(cfg, tmp_path / "run", progress=True)
    out, err = capsys.readouterr()
    if terminal:
        assert "\r" in err and "epoch 2/2" in err  # the bar
        assert out.splitlines() == [line for line in out.splitlines() if line.startswith("epoch 2  train_loss")]
    else:
        assert "\r" not in out + err and err == ""
        lines = out.splitlines()
        assert len(lines) == 2 and lines[0].startswith("epoch 1  train_loss") and "test_acc" in lines[1]


@pytest.mark.parametrize("variant", ["standard", "free"])
def test_as_from_a_later_epoch_is_vi_until_then(shared_data, tmp_path, variant):
    """as_first_epoch 2: epoch 1 is the VI run's epoch 1 to the bit (same noise, no adversarial passes),
    epoch 2 is AS (it differs from VI's epoch 2)."""
    common = dict(amp=False, train_subset=2000, as_steps=2)
    vi = train(small(shared_data, method="vi", **common), tmp_path / "vi", progress=False)
    late = train(small(shared_data, method="as", as_variant=variant, as_first_epoch=2, **common), tmp_path / "late",
                 progress=False)
    logs = [[json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()] for run in (vi, late)]
    keys = ("train_loss", "train_acc", "test_acc", "test_acc_sample", "kl")
    assert [logs[0][0][k] for k in keys] == [logs[1][0][k] for k in keys]
    assert logs[0][1]["train_loss"] != logs[1][1]["train_loss"]


def test_as_first_epoch_must_be_an_epoch_of_an_as_run(shared_data):
    with pytest.raises(ConfigError, match="as_first_epoch must be an epoch of the run"):
        small(shared_data, method="as", as_first_epoch=3)
    with pytest.raises(ConfigError, match="as_first_epoch is a setting of method as"):
        small(shared_data, method="vi", as_first_epoch=2)


def test_the_search_on_part_of_the_batch_is_a_setting_of_standard_as(shared_data):
    with pytest.raises(ConfigError, match="as_search_fraction is a setting of standard AS"):
        small(shared_data, method="as", as_variant="free", as_search_fraction=0.5)
    with pytest.raises(ConfigError, match="as_search_fraction is a setting of standard AS"):
        small(shared_data, method="vi", as_search_fraction=0.5)
    with pytest.raises(ConfigError, match=r"as_search_fraction must be in \(0, 1\]"):
        small(shared_data, method="as", as_search_fraction=0)
    assert small(shared_data, method="as", as_search_fraction=0.25).as_config().search_fraction == 0.25
