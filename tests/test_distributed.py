"""Data-parallel training with torchrun on the CPU (gloo backend, 2 processes)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from asbnn.build import build_network
from asbnn.cli import resolve_config
from asbnn.config import make_config, parse_overrides
from asbnn.data import dataset_info

TORCHRUN = Path(sys.executable).with_name("torchrun")
pytestmark = pytest.mark.slow  # multi-process


def command(shared_data, out, *overrides, processes=2):
    args = ["train", "quickstart", "train_subset=1000", "test_subset=200", "batch_size=100",
            *overrides, "--data-root", str(shared_data), "--no-eval", "--quiet", "--out", str(out)]
    if processes == 1:
        return [sys.executable, "-m", "asbnn.cli", *args]
    return [str(TORCHRUN), "--standalone", f"--nproc_per_node={processes}", "-m", "asbnn.cli", *args]


def run(cmd, array_cache):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ASBNN_CACHE": str(array_cache)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def weights(run_dir):
    return torch.load(Path(run_dir) / "checkpoint.pt", weights_only=True)["net"]


@pytest.fixture(autouse=True)
def needs_torchrun():
    if not TORCHRUN.exists():
        pytest.fail(f"torchrun not found next to {sys.executable}")


def test_two_processes_equal_one_process_with_the_same_global_batch(shared_data, tmp_path, array_cache):
    """One step of plain SGD on one global batch of 100 images, as 1 x 100 and as 2 x 50.

    Exact by construction, on any CPU: w1 = w0 - lr * g, and the two runs differ only in the order
    in which fp32 sums the gradient g (one matmul over 100 images, or two over 50 and an all-reduce).
    Each such sum is within about sqrt(n) * 2^-24 of its terms' size, far below 2^-12 of the largest
    gradient entry of a tensor, so the weights agree within lr * 2^-12 * max|g| plus a few units in
    the last place of w. No Adam: it divides by sqrt(v), which turns rounding noise in a
    near-zero gradient into a full-size step.
    """
    overrides = ("model=mlp", "method=deterministic", "epochs=1", "amp=false", "train_subset=100",
                 "optimizer=sgd", "momentum=0", "lr=0.1", "schedule=constant")
    run(command(shared_data, tmp_path / "one", *overrides, processes=1), array_cache)
    run(command(shared_data, tmp_path / "two", *overrides), array_cache)
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    cfg = make_config(resolve_config("quickstart"), parse_overrides(list(overrides)))
    initial = build_network(cfg, dataset_info(cfg.dataset)).state_dict()  # seeded: the runs' starting point
    ulp = torch.finfo(torch.float32).eps
    for key in one:
        step = (one[key] - initial[key]).abs().max().item()  # lr * max|g|
        tolerance = step * 2**-12 + 4 * ulp * initial[key].abs().max().item()
        assert (one[key] - two[key]).abs().max().item() <= tolerance, key
        assert step > 100 * tolerance, key  # the step is large enough for a wrong one to show


def test_bayesian_data_parallel_training_learns_and_resumes(shared_data, tmp_path, array_cache):
    overrides = ("model=lenet5", "method=as", "as_steps=2", "epochs=2", "train_subset=4000")
    run(command(shared_data, tmp_path / "whole", *overrides), array_cache)
    log = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and log[-1]["test_acc"] > 0.3  # chance is 0.1

    env = {**os.environ, "OMP_NUM_THREADS": "1", "ASBNN_CACHE": str(array_cache)}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(shared_data, killed, *overrides), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "log.jsonl").exists() or not (killed / "log.jsonl").read_text():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers
    proc.wait()
    run(command(shared_data, killed, *overrides) + ["--resume"], array_cache)
    whole, resumed = weights(tmp_path / "whole"), weights(killed)
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    shutil.rmtree(killed)
