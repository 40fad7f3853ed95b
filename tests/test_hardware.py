"""The precision policy: amp true / false force, amp auto measures (the timer is faked here, so the
outcome is forced either way), the decision is cached per machine and workload, and a run keeps it."""

import json

import pytest
import torch

import asbnn.hardware as hardware
from asbnn.config import make_config
from asbnn.hardware import Workload, choose_precision
from asbnn.models import create_model
from asbnn.train import train

CPU = torch.device("cpu")
AVX512_BF16 = frozenset({"avx512_bf16", "avx2"})  # e.g. Cooper Lake or Zen 4: bf16 dot products, no AMX


def fake_timer(monkeypatch, bf16_seconds: float, fp32_seconds: float) -> list[bool]:
    """Replace the step timer; returns the list of precisions it was asked to time (True: bf16)."""
    calls: list[bool] = []

    def timed(step, bf16, device):
        calls.append(bf16)
        step(bf16)  # the step itself still runs: it must work in both precisions
        return bf16_seconds if bf16 else fp32_seconds

    monkeypatch.setattr(hardware, "time_step", timed)
    return calls


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "precision.json"
    monkeypatch.setenv("ASBNN_PRECISION_CACHE", str(path))
    return path


def cifar_run(shared_data, **overrides):
    """The default training step of ResNet-20 (VI + AS, batch 100), one step only."""
    return make_config(overrides={"data_root": str(shared_data), "epochs": 1, "train_subset": 100,
                                  "test_subset": 100, "eval_samples": 2, **overrides})


@pytest.mark.parametrize("bf16_seconds, expected", [(0.5, "bf16"), (2.0, "fp32")])
def test_auto_on_an_avx512_bf16_cpu_keeps_bf16_only_where_it_measured_faster(
        shared_data, tmp_path, monkeypatch, cache, bf16_seconds, expected):
    monkeypatch.setattr(hardware, "cpu_features", lambda: AVX512_BF16)
    calls = fake_timer(monkeypatch, bf16_seconds, fp32_seconds=1.0)
    cfg = cifar_run(shared_data)
    assert cfg.amp == "auto" and cfg.model == "resnet20"
    run = train(cfg, tmp_path / "run", progress=False)
    assert json.loads((run / "log.jsonl").read_text())["precision"] == expected
    assert torch.load(run / "checkpoint.pt", weights_only=False)["precision"] == expected
    assert True in calls and False in calls
    (key, decision), = json.loads(cache.read_text()).items()
    assert decision["precision"] == expected and decision["bf16_s"] == bf16_seconds
    assert {"model": "resnet20", "batch_size": 100, "bayesian": True, "input_shape": [3, 32, 32],
            "task": "train", "torch": torch.__version__}.items() <= json.loads(key).items()
    assert "avx512_bf16" in json.loads(key)["machine"]


def test_a_measured_decision_is_cached_per_machine_and_workload(monkeypatch, cache):
    monkeypatch.setattr(hardware, "cpu_features", lambda: AVX512_BF16)
    calls = fake_timer(monkeypatch, 0.5, 1.0)
    net = create_model("mlp", in_channels=1)
    workload = Workload("mlp", (1, 28, 28), 16, bayesian=False)
    assert choose_precision(CPU, "auto", workload, net) == "bf16"
    measured = len(calls)
    assert choose_precision(CPU, "auto", workload, net) == "bf16" and len(calls) == measured  # from the cache
    fake_timer(monkeypatch, 2.0, 1.0)
    assert choose_precision(CPU, "auto", Workload("mlp", (1, 28, 28), 32, bayesian=False), net) == "fp32"
    monkeypatch.setattr(hardware, "cpu_features", lambda: frozenset({"amx_bf16", *AVX512_BF16}))
    assert choose_precision(CPU, "auto", workload, net) == "fp32"  # another machine: measured again
    assert len(json.loads(cache.read_text())) == 3
    cache.write_text("{not json")  # a damaged cache is measured again, not an error
    assert choose_precision(CPU, "auto", workload, net) == "fp32"
    assert len(json.loads(cache.read_text())) == 1


def test_bf16_far_from_fp32_is_refused_however_fast(monkeypatch, cache):
    monkeypatch.setattr(hardware, "cpu_features", lambda: AVX512_BF16)
    fake_timer(monkeypatch, 0.1, 1.0)
    monkeypatch.setattr(hardware, "MIN_COSINE", 1.1)  # no bf16 result is that close
    assert choose_precision(CPU, "auto", Workload("mlp", (1, 28, 28), 16, False), create_model("mlp", in_channels=1)) == "fp32"


@pytest.mark.parametrize("features, amp, expected", [
    (AVX512_BF16, True, "bf16"), (AVX512_BF16, False, "fp32"),
    (frozenset({"avx2"}), True, "fp32"), (frozenset({"avx2"}), "auto", "fp32"),  # bf16 emulated: never
])
def test_forced_settings_and_emulated_bf16_measure_nothing(monkeypatch, cache, features, amp, expected):
    monkeypatch.setattr(hardware, "cpu_features", lambda: features)
    monkeypatch.setattr(hardware, "time_step", lambda *args: pytest.fail("measured"))
    assert choose_precision(CPU, amp, Workload("mlp", (1, 28, 28), 16, False), create_model("mlp", in_channels=1)) == expected
    assert not cache.exists()


def test_auto_that_measures_fp32_computes_bitwise_what_amp_false_does(shared_data, tmp_path, monkeypatch, cache):
    """Measuring works on a copy with its own random numbers: the run itself is untouched by it."""
    fake_timer(monkeypatch, 2.0, 1.0)
    values = {"model": "lenet5", "dataset": "fashion-mnist", "method": "vi", "train_subset": 500,
              "test_subset": 200, "eval_samples": 2, "batch_size": 50}
    auto = train(cifar_run(shared_data, **values), tmp_path / "auto", progress=False)
    off = train(cifar_run(shared_data, **values, amp=False), tmp_path / "off", progress=False)
    assert cache.exists()
    a, b = (torch.load(run / "checkpoint.pt", weights_only=False) for run in (auto, off))
    assert a["precision"] == b["precision"] == "fp32"
    for key in a["net"]:
        assert torch.equal(a["net"][key], b["net"][key]), key


def test_a_run_never_changes_precision_on_resume(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_features", lambda: AVX512_BF16)
    assert hardware.can_resume(CPU, True, "bf16") and not hardware.can_resume(CPU, True, "fp32")
    assert hardware.can_resume(CPU, "auto", "fp32") and hardware.can_resume(CPU, "auto", "bf16")
    assert hardware.can_resume(CPU, False, "fp32") and not hardware.can_resume(CPU, False, "bf16")
    monkeypatch.setattr(hardware, "cpu_features", lambda: frozenset({"avx2"}))
    assert not hardware.can_resume(CPU, "auto", "bf16") and not hardware.can_resume(CPU, True, "bf16")
