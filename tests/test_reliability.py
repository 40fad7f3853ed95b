"""Reliability: no lost work, no silent failure, a clear error for every bad input.

Kills are real SIGKILLs of `asbnn train` subprocesses at random moments; damaged files are made
by hand; a full disk is simulated (an fsync that fails with ENOSPC), and so is a read-only folder
when the tests run as root, who ignores permissions. Fuzzing (hypothesis) feeds the config loader
and the data readers arbitrary input. docs/reliability.md lists every fault and the test here.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import gzip
import io
import json
import os
import pickle
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import asbnn.fileio as fileio
import asbnn.runfolder as runfolder
import asbnn.train as train_module
from asbnn.cli import main
from asbnn.config import TrainConfig, make_config, parse_overrides
from asbnn.data import load_dataset
from asbnn.errors import CheckpointError, ConfigError, DataError
from asbnn.runfolder import resume_state
from asbnn.train import train

# The run every kill test interrupts: 3 short epochs of VI + AS on Fashion-MNIST (~1 s each).
TRAIN_ARGS = ["quickstart", "model=lenet5", "dataset=fashion-mnist", "train_subset=1500", "test_subset=300",
              "epochs=3", "method=as", "as_steps=2", "eval_samples=3"]
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def one_line(text: str) -> str:
    assert text.count("\n") <= 1 and text.strip(), text
    return text


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(f"*{fileio.TEMP_SUFFIX}"))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["net"]


def assert_same_weights(a: Path, b: Path, context: str = "") -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{key} differs {context}"


def log_epochs(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "log.jsonl").read_text().splitlines()]


def cli_command(out: Path, shared_data: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "asbnn.cli", "train", *TRAIN_ARGS, "--data-root", str(shared_data),
            "--quiet", "--out", str(out), *extra]


@pytest.fixture
def one_thread():
    """In-process training on one thread, like the subprocesses: on a busy machine two spinning
    OpenMP threads make a tiny run many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cli_env(array_cache) -> dict[str, str]:
    return {**os.environ, "ASBNN_CACHE": str(array_cache), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shared_data, cli_env) -> Path:
    """The uninterrupted run, trained once in a subprocess like the killed ones."""
    run = tmp_path_factory.mktemp("reference") / "run"
    done = subprocess.run(cli_command(run, shared_data, "--no-eval"), env=cli_env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return run


def wait_for(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before the kill point"
        assert time.monotonic() < end, "the kill point never came"
        time.sleep(0.01)


def kill_after(proc: subprocess.Popen, delay: float, latest=lambda: False) -> None:
    """SIGKILL `proc` `delay` seconds from now, or as soon as `latest()` holds if that is sooner: a
    run whose later epochs go faster than the first (a machine that got quieter) is still killed
    before it ends."""
    end = time.monotonic() + delay
    while time.monotonic() < end and not latest():
        time.sleep(0.005)
    assert proc.poll() is None, f"the run ended before the kill, {delay:.2f} s after the kill point"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def lines_in(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def assert_checkpoints_whole(run: Path) -> None:
    """Whatever a kill left under the checkpoint names is a complete checkpoint."""
    for name in (runfolder.CHECKPOINT, runfolder.PREV_CHECKPOINT):
        if (run / name).exists():
            runfolder.load_checkpoint(run / name)


# ----------------------------------------------------------------------------------------------
# 1. Killed at a random moment, then resumed: the same final weights as an uninterrupted run


@pytest.mark.slow  # trains in subprocesses
def test_sigkill_mid_epoch_then_resume_gives_the_same_weights(tmp_path, shared_data, cli_env, reference):
    run = tmp_path / "run"
    proc = subprocess.Popen(cli_command(run, shared_data, "--no-eval"), env=cli_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(proc, lambda: lines_in(run / "log.jsonl") >= 1)
    epoch_time = json.loads((run / "log.jsonl").read_text())["epoch_time"]
    delay = random.uniform(0, 1.5 * epoch_time)  # anywhere in epoch 2, or as its save begins (its log line)
    kill_after(proc, delay, latest=lambda: lines_in(run / "log.jsonl") >= 2)
    assert_checkpoints_whole(run)

    done = subprocess.run(cli_command(run, shared_data, "--no-eval", "--resume"), env=cli_env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert_same_weights(reference / "checkpoint.pt", run / "checkpoint.pt", f"(killed {delay:.2f} s into epoch 2)")
    assert log_epochs(run) == [1, 2, 3]
    assert temp_files(run) == []


@pytest.mark.slow  # trains in subprocesses
def test_sigkill_during_evaluation_then_resume_finishes_it(tmp_path, shared_data, cli_env, reference):
    run = tmp_path / "run"
    proc = subprocess.Popen(cli_command(run, shared_data), env=cli_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(proc, lambda: (run / "eval").is_dir())  # made before any of the evaluation's work
    kill_after(proc, random.uniform(0, 0.05))
    assert_checkpoints_whole(run)
    if (run / "eval" / "eval.json").exists():  # written atomically: whole or absent
        json.loads((run / "eval" / "eval.json").read_text())

    done = subprocess.run(cli_command(run, shared_data, "--resume"), env=cli_env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert_same_weights(reference / "checkpoint.pt", run / "checkpoint.pt")
    assert log_epochs(run) == [1, 2, 3]
    assert json.loads((run / "eval" / "eval.json").read_text())["config"]["epochs"] == 3


def copy_run(reference: Path, to: Path) -> Path:
    shutil.copytree(reference, to)
    return to


@pytest.mark.slow  # trains in subprocesses
def test_killed_while_saving_leftovers_are_harmless_and_cleaned(tmp_path, shared_data, cli_env, reference):
    """A kill inside a save leaves the old checkpoint in place and a partial temp file beside it."""
    run = copy_run(reference, tmp_path / "run")
    shutil.copyfile(run / "checkpoint.prev.pt", run / "checkpoint.pt")  # epoch 3's save never finished
    partial = (reference / "checkpoint.pt").read_bytes()
    (run / ".checkpoint.pt.k1ll3d.tmp").write_bytes(partial[: len(partial) // 2])
    (run / ".checkpoint.prev.pt.k1ll3d.tmp").write_bytes(b"\0" * 100)
    (run / ".log.jsonl.k1ll3d.tmp").write_bytes(b'{"epoch": 1, "lo')
    (run / "log.jsonl").write_text((run / "log.jsonl").read_text() + '{"epoch": 4, "train_lo')  # a cut line

    done = subprocess.run(cli_command(run, shared_data, "--no-eval", "--resume"), env=cli_env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert_same_weights(reference / "checkpoint.pt", run / "checkpoint.pt")
    assert log_epochs(run) == [1, 2, 3]
    assert temp_files(run) == []


# ----------------------------------------------------------------------------------------------
# 2. A damaged checkpoint.pt: resume goes back to checkpoint.prev.pt


@pytest.mark.slow  # trains in subprocesses
def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, shared_data, cli_env, reference):
    run = copy_run(reference, tmp_path / "run")
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 3])

    done = subprocess.run(cli_command(run, shared_data, "--no-eval", "--resume"), env=cli_env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    warning = [line for line in done.stderr.splitlines() if line.startswith("asbnn: warning: ")]
    assert len(warning) == 1 and str(run / "checkpoint.pt") in warning[0] and "truncated or corrupt" in warning[0]
    assert "resuming from" in warning[0] and "checkpoint.prev.pt (epoch 2)" in warning[0]
    assert_same_weights(reference / "checkpoint.pt", run / "checkpoint.pt")
    assert log_epochs(run) == [1, 2, 3]  # epoch 3's line was dropped and written again
    assert torch.load(run / "checkpoint.prev.pt", weights_only=True)["epoch"] == 2  # a good one, kept


def save_state(path: Path, cfg: TrainConfig, epoch: int) -> None:
    runfolder.save_checkpoint({"kind": "posterior", "config": cfg.to_dict(), "epoch": epoch,
                                "net": {"w": torch.full((2,), float(epoch))}, "optimizer": {}}, path)


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


DAMAGE = {
    "truncated": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
    "garbage": lambda data: random.Random(0).randbytes(len(data)),
    "flipped-bytes": lambda data: data[:200] + bytes(b ^ 0xFF for b in data[200:400]) + data[400:],
    "not-a-dict": lambda data: torch_bytes([1, 2, 3]),
    "foreign-dict": lambda data: torch_bytes({"weights": torch.zeros(2)}),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_every_kind_of_damage_is_detected_and_the_previous_checkpoint_used(tmp_path, capsys, damage):
    cfg = make_config(overrides={"model": "lenet5", "dataset": "fashion-mnist", "epochs": 5})
    ckpt = tmp_path / "checkpoint.pt"
    save_state(ckpt, cfg, 1)
    save_state(ckpt, cfg, 2)
    ckpt.write_bytes(DAMAGE[damage](ckpt.read_bytes()))

    with pytest.raises(CheckpointError) as err:  # evaluation has no fallback: it names the file
        runfolder.load_state(ckpt)
    assert str(ckpt) in one_line(str(err.value))

    state = resume_state(tmp_path, cfg, torch.device("cpu"))
    assert state["epoch"] == 1
    warning = one_line(capsys.readouterr().err)
    assert warning.startswith("asbnn: warning: ") and str(ckpt) in warning and "(epoch 1)" in warning
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1  # the damaged file is replaced by the good one
    save_state(ckpt, cfg, 2)  # ... so the next save keeps a good previous checkpoint
    assert torch.load(tmp_path / "checkpoint.prev.pt", weights_only=True)["epoch"] == 1
    assert temp_files(tmp_path) == []


def test_both_checkpoints_damaged_or_missing(tmp_path, capsys):
    cfg = make_config(overrides={"model": "lenet5", "dataset": "fashion-mnist", "epochs": 5})
    cpu = torch.device("cpu")
    assert resume_state(tmp_path, cfg, cpu) is None  # nothing yet: a fresh start
    save_state(tmp_path / "checkpoint.pt", cfg, 1)
    save_state(tmp_path / "checkpoint.pt", cfg, 2)
    (tmp_path / "checkpoint.pt").unlink()
    assert resume_state(tmp_path, cfg, cpu)["epoch"] == 1
    assert "checkpoint.pt is missing" in capsys.readouterr().err
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (tmp_path / name).write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="no good previous checkpoint") as err:
        resume_state(tmp_path, cfg, cpu)
    assert "checkpoint.pt" in one_line(str(err.value)) and "checkpoint.prev.pt" in str(err.value)


def test_a_checkpoint_that_does_not_fit_is_one_line(tmp_path):
    cfg = make_config(overrides={"model": "lenet5", "dataset": "fashion-mnist", "epochs": 5})
    save_state(tmp_path / "checkpoint.pt", cfg, 1)  # its "net" holds one made-up tensor
    with pytest.raises(CheckpointError, match="does not fit the network") as err:
        runfolder.load_run(tmp_path)
    assert str(tmp_path / "checkpoint.pt") in one_line(str(err.value))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    torch.save({**state, "config": {**state["config"], "renamed_setting": 1}}, tmp_path / "newer.pt")
    with pytest.raises(CheckpointError, match="cannot read"):  # written by another version of asbnn
        runfolder.load_run(tmp_path / "newer.pt")


def small_config(shared_data: Path) -> TrainConfig:
    return make_config(overrides={"model": "lenet5", "dataset": "fashion-mnist", "data_root": str(shared_data),
                                  "epochs": 1, "train_subset": 200, "test_subset": 100, "method": "vi"})


def test_a_new_run_never_falls_back_to_an_older_runs_checkpoint(tmp_path, shared_data, one_thread):
    cfg = small_config(shared_data)
    save_state(tmp_path / "checkpoint.prev.pt", cfg, 7)  # left over from a run whose checkpoint.pt is gone
    with pytest.raises(ConfigError, match=r"already holds a run \(checkpoint.prev.pt\); pass --resume"):
        train(cfg, tmp_path, progress=False)  # a resume could still use it: never wiped silently
    assert torch.load(tmp_path / "checkpoint.prev.pt", weights_only=True)["epoch"] == 7
    train(cfg, tmp_path, overwrite=True, progress=False)
    assert not (tmp_path / "checkpoint.prev.pt").exists()


@pytest.mark.parametrize("name", ["config.yaml", "log.jsonl", "checkpoint.pt", "checkpoint.prev.pt", "tensorboard",
                                  "eval", "eval-recalibrated"])
def test_a_folder_with_any_run_file_is_refused_without_resume_or_overwrite(tmp_path, capsys, name):
    run = tmp_path / "run"
    (run / name).parent.mkdir(parents=True)
    if "." in name:
        (run / name).write_bytes(b"x")
    else:
        (run / name / "inner").mkdir(parents=True)
    code = main(["train", "quickstart", "--out", str(run), "--quiet"])
    err = one_line(capsys.readouterr().err)
    assert code == 2 and f"{run} already holds a run ({name}); pass --resume" in err and "--overwrite" in err
    assert sorted(p.name for p in run.iterdir()) == [name]


def test_overwrite_clears_the_old_run_and_its_evaluations(tmp_path, capsys, shared_data, one_thread):
    run = tmp_path / "run"
    for folder in ("eval", "eval-recalibrated", "tensorboard"):
        (run / folder).mkdir(parents=True)
        (run / folder / "eval.json").write_text("{}")
    save_state(run / "checkpoint.prev.pt", small_config(shared_data), 7)
    (run / "notes.txt").write_text("mine")  # not a run file: kept
    args = ["train", "quickstart", "model=lenet5", "train_subset=200", "test_subset=100", "epochs=1",
            "--data-root", str(shared_data), "--out", str(run), "--no-eval", "--quiet"]
    assert main([*args, "--resume", "--overwrite"]) == 2
    assert "pass one of them" in one_line(capsys.readouterr().err)
    assert main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.yaml", "log.jsonl", "notes.txt"]
    assert main(args) == 2  # now this run's files are there
    assert "already holds a run (config.yaml, log.jsonl, checkpoint.pt)" in capsys.readouterr().err


def test_a_folder_with_other_files_only_is_a_new_run(tmp_path, shared_data, one_thread):
    (tmp_path / "README").write_text("my notes")
    train(small_config(shared_data), tmp_path, progress=False)
    assert (tmp_path / "checkpoint.pt").exists() and (tmp_path / "README").read_text() == "my notes"


# ----------------------------------------------------------------------------------------------
# 3. A crafted pickle is refused, and its code never runs


class Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def craft(path: Path, marker: Path, how: str) -> Path:
    if how == "torch-save":  # a zip archive holding the pickle, as torch.save writes it
        torch.save({"kind": "posterior", "config": {}, "epoch": 1, "net": Exploit(marker), "optimizer": {}}, path)
    else:
        path.write_bytes(pickle.dumps({"net": Exploit(marker)}, protocol=int(how.removeprefix("raw-pickle-p"))))
    return path


@pytest.mark.parametrize("how", ["torch-save", "raw-pickle-p2", "raw-pickle-p4"])
def test_crafted_pickle_is_refused_without_running_it(tmp_path, how):
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    path = craft(tmp_path / "evil.pt", marker, how)
    with pytest.raises(CheckpointError) as err:
        runfolder.load_checkpoint(path)
    message = one_line(str(err.value))
    assert str(path) in message
    if how == "raw-pickle-p4":  # torch's unpickler stops at the protocol-4 frame, before any global
        assert "not a checkpoint" in message
    else:
        assert "refusing to load" in message and "system" in message
    assert not marker.exists()


def test_crafted_checkpoint_via_eval_and_resume(tmp_path, capsys, shared_data):
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    evil = craft(tmp_path / "evil.pt", marker, "torch-save")
    assert main(["eval", str(evil)]) == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith("asbnn: error: refusing to load") and str(evil) in err

    run = tmp_path / "run"
    run.mkdir()
    cfg = make_config(overrides={"model": "lenet5", "dataset": "fashion-mnist", "epochs": 3})
    save_state(run / "checkpoint.pt", cfg, 1)  # a good previous checkpoint is no excuse to go on
    shutil.move(run / "checkpoint.pt", run / "checkpoint.prev.pt")
    craft(run / "checkpoint.pt", marker, "torch-save")
    code = main(["train", *TRAIN_ARGS, "--data-root", str(shared_data), "--out", str(run), "--resume", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and one_line(err).startswith("asbnn: error: refusing to load")
    assert str(run / "checkpoint.pt") in err
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# 4. A full disk or a read-only folder: one clear line, earlier results intact


def disk_full(monkeypatch) -> None:
    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)


def test_disk_full_keeps_every_earlier_file(tmp_path, monkeypatch):
    cfg = make_config(overrides={"model": "lenet5", "dataset": "fashion-mnist", "epochs": 5})
    ckpt, log = tmp_path / "checkpoint.pt", tmp_path / "log.jsonl"
    save_state(ckpt, cfg, 1)
    save_state(ckpt, cfg, 2)
    fileio.append_jsonl(log, {"epoch": 1})
    fileio.atomic_write_text(tmp_path / "eval.json", "{}")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    disk_full(monkeypatch)
    result = tmp_path / "eval.json"
    for write, target in [(lambda: save_state(ckpt, cfg, 3), ckpt),
                          (lambda: fileio.atomic_write_text(result, "{...}"), result),
                          (lambda: fileio.append_jsonl(log, {"epoch": 2}), log)]:
        with pytest.raises(CheckpointError) as err:
            write()
        assert one_line(str(err.value)) == f"cannot write {target}: No space left on device"
    monkeypatch.undo()

    assert torch.load(ckpt, weights_only=True)["epoch"] == 2
    assert torch.load(tmp_path / "checkpoint.prev.pt", weights_only=True)["epoch"] == 2  # kept before the write
    assert (tmp_path / "eval.json").read_bytes() == before["eval.json"]
    assert fileio.read_jsonl(log)[0] == {"epoch": 1}
    assert temp_files(tmp_path) == []
    save_state(ckpt, cfg, 3)  # space freed: the next save works and leaves nothing behind
    assert [torch.load(p, weights_only=True)["epoch"] for p in (ckpt, tmp_path / "checkpoint.prev.pt")] == [3, 2]
    assert temp_files(tmp_path) == []


def test_file_systems_without_hard_links_copy_the_previous_checkpoint(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "link", no_links)
    cfg = make_config(overrides={"model": "lenet5", "dataset": "fashion-mnist", "epochs": 5})
    for epoch in (1, 2, 3):
        save_state(tmp_path / "checkpoint.pt", cfg, epoch)
    names = ("checkpoint.pt", "checkpoint.prev.pt")
    assert [torch.load(tmp_path / name, weights_only=True)["epoch"] for name in names] == [3, 2]
    assert temp_files(tmp_path) == []


def test_disk_full_during_training_stops_cleanly_and_resumes(tmp_path, shared_data, monkeypatch, one_thread):
    cfg = make_config(overrides={"model": "lenet5", "dataset": "fashion-mnist", "data_root": str(shared_data),
                                 "epochs": 2, "train_subset": 300, "test_subset": 100, "method": "vi"})
    real_save = train_module.save_checkpoint

    def fill_disk_at_epoch_2(state, path):
        if state["epoch"] == 2:
            disk_full(monkeypatch)
        real_save(state, path)

    monkeypatch.setattr(train_module, "save_checkpoint", fill_disk_at_epoch_2)
    with pytest.raises(CheckpointError, match=re.escape(f"cannot write {tmp_path / 'checkpoint.pt'}: No space left")):
        train(cfg, tmp_path, progress=False)
    monkeypatch.undo()  # space freed
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert log_epochs(tmp_path) == [1, 2]  # epoch 2 was logged before its save failed ...
    train(cfg, tmp_path, resume=True, progress=False)
    assert log_epochs(tmp_path) == [1, 2]  # ... and its line was replaced, not repeated
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 2


def make_read_only(folder: Path, monkeypatch) -> None:
    """chmod 0o555; as root, who may write anyway, refuse every write under `folder` instead."""
    folder.chmod(0o555)
    if os.geteuid() != 0:
        return

    def refuse(real, written=lambda *args, **kwargs: args[:2]):
        """`real`, failing like a read-only folder when a path it would write is inside `folder`."""
        def call(*args, **kwargs):
            for path in written(*args, **kwargs):
                if isinstance(path, (str, os.PathLike)) and Path(os.path.abspath(path)).is_relative_to(folder):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            return real(*args, **kwargs)
        return call

    def os_open_writes(path, flags, *args, **kwargs):
        return [path] if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) else []

    def open_writes(path, mode="r", *args, **kwargs):
        return [path] if set(mode) & set("wax+") else []

    monkeypatch.setattr(os, "open", refuse(os.open, os_open_writes))  # tempfile.mkstemp goes through it
    for name in ("link", "replace", "rename", "unlink", "mkdir"):
        monkeypatch.setattr(os, name, refuse(getattr(os, name)))
    monkeypatch.setattr(fileio, "open", refuse(open, open_writes), raising=False)


@pytest.mark.slow  # trains in subprocesses
def test_read_only_run_folder_one_line_and_nothing_changed(tmp_path, capsys, shared_data, reference, monkeypatch):
    run = copy_run(reference, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    make_read_only(run, monkeypatch)
    try:
        code = main(["train", *TRAIN_ARGS, "--data-root", str(shared_data), "--out", str(run), "--resume", "--quiet"])
    finally:
        monkeypatch.undo()
        run.chmod(0o755)
    err = one_line(capsys.readouterr().err)
    assert code == 2 and err.startswith(f"asbnn: error: cannot write {run}") and "Permission denied" in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


# ----------------------------------------------------------------------------------------------
# 5. Fuzzing: the config loader and the data readers fail only with their own one-line errors

FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]
GOOD_VALUES = ["lenet5", "resnet20", "fashion-mnist", "cifar10", "as", "vi", "adam", "sgd", "cosine", "exp",
               "paper", "freeze", "free", "stop", "skip", "auto", "cpu", "default"]
SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(-(2**1100), 2**1100) | st.floats()
           | st.text(max_size=12) | st.sampled_from(GOOD_VALUES))
# Pieces of YAML that have broken loaders: nesting, anchors, tags, dates that do not exist, numbers without a dot.
YAML_BITS = st.lists(st.sampled_from(["[", "]", "{", "}", "- ", ": ", ", ", "&a ", "*a", "!!", "!!float ", "? ", "\n",
                                      "lr", "1e-3", "2001-13-01", "9" * 400, "'", '"', "#", "null", "~"]),
                     max_size=12).map("".join)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
KEYS = st.sampled_from([*FIELDS, "preset"]) | st.text(max_size=10) | st.integers()


def config_or_config_error(load) -> None:
    try:
        cfg = load()
    except ConfigError as err:
        one_line(str(err))
    else:
        assert isinstance(cfg, TrainConfig)


def write_text(folder: Path, text: str | bytes) -> Path:
    fd, name = tempfile.mkstemp(dir=folder, suffix=".yaml")
    with os.fdopen(fd, "wb") as f:
        f.write(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    return Path(name)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.slow  # fuzz
@FUZZ
@given(text=st.text() | st.binary() | YAML_BITS | st.builds("{}: {}\n".format, KEYS, YAML_BITS))
@example(text="?")  # each @example once broke make_config with a TypeError, ValueError, ... not a ConfigError
@example(text="1: 2")
@example(text="epochs: 2001-13-01")
@example(text="preset: [paper]")
@example(text="lr: " + "9" * 400)
@example(text="[" * 5000)
@example(text="dataset: " + "x" * 5000)
@example(text="seed: -1")
@example(text="!!float")
def test_fuzz_config_file_text(fuzz_dir, text):
    config_or_config_error(lambda: make_config(write_text(fuzz_dir, text)))


@pytest.mark.slow  # fuzz
@FUZZ
@given(values=st.dictionaries(KEYS, VALUES, max_size=6))
def test_fuzz_config_file_mapping(fuzz_dir, values):
    config_or_config_error(lambda: make_config(write_text(fuzz_dir, yaml.safe_dump(values, sort_keys=False))))


@pytest.mark.slow  # fuzz
@FUZZ
@given(items=st.lists(st.text(max_size=20) | st.builds("{}={}".format, KEYS, st.text(max_size=12) | YAML_BITS
                                                        | VALUES.map(str)), max_size=5))
@example(items=["lr=2001-13-01"])
@example(items=["as_step_size=" + "9" * 400])
@example(items=["preset=[1]"])
@example(items=["epochs=" + "[" * 5000])
def test_fuzz_overrides(items):
    config_or_config_error(lambda: make_config(overrides=parse_overrides(items)))


def test_numbers_yaml_reads_as_text_are_numbers():
    """YAML 1.1 reads `1e-3` (no dot) as a string; a float setting takes it as the number it means."""
    assert make_config(overrides=parse_overrides(["lr=1e-3", "init_sigma=5e-2"])).lr == 0.001
    with pytest.raises(ConfigError, match="lr must be a finite number, got 'fast'"):
        make_config(overrides={"lr": "fast"})
    with pytest.raises(ConfigError, match="epochs must be an integer"):
        make_config(overrides=parse_overrides(["epochs=1e3"]))


def data_or_data_error(root: Path, name: str) -> None:
    try:
        data = load_dataset(name, "test", root)
    except DataError:
        pass  # one line each, except for one case: test_corrupt_tar_error_is_one_line
    else:
        assert data.images.dtype == np.uint8 and len(data.images) == len(data.labels)


def idx(ndim_byte: int, dims: list[int], payload: bytes) -> bytes:
    return bytes((0, 0, 8, ndim_byte)) + struct.pack(f">{len(dims)}I", *dims) + payload


IDX_BYTES = (st.binary(max_size=200)
             | st.builds(idx, st.sampled_from([3, 3, 3, 1, 0, 255]), st.lists(st.integers(0, 2**32 - 1), max_size=3)
                         | st.just([1, 28, 28]), st.binary(max_size=1600)))
GOOD_IMAGES, GOOD_LABELS = idx(3, [2, 28, 28], bytes(2 * 784)), idx(1, [2], bytes([0, 9]))


@pytest.mark.slow  # fuzz
@FUZZ
@given(images=IDX_BYTES | st.just(GOOD_IMAGES), labels=IDX_BYTES | st.just(GOOD_LABELS), compress=st.booleans())
def test_fuzz_idx_files(fuzz_dir, images, labels, compress):
    root = Path(tempfile.mkdtemp(dir=fuzz_dir))
    (root / "fashion-mnist").mkdir()
    for base, raw in (("t10k-images-idx3-ubyte.gz", images), ("t10k-labels-idx1-ubyte.gz", labels)):
        (root / "fashion-mnist" / base).write_bytes(gzip.compress(raw) if compress else raw)
    data_or_data_error(root, "fashion-mnist")


CIFAR_NAMES = [f"class_{i}".encode() for i in range(10)]
PICKLED = st.recursive(
    st.none() | st.integers() | st.binary(max_size=8) | st.text(max_size=8)
    | st.builds(lambda n, kind: np.zeros((n, 3072) if kind == "rows" else n, np.uint8 if kind == "rows" else np.int64),
                st.integers(0, 3), st.sampled_from(["rows", "labels"])),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from([b"data", b"labels", b"label_names", b"x"]), inner, max_size=4), max_leaves=8)


@pytest.mark.slow  # fuzz
@FUZZ
@given(batch=st.binary(max_size=300) | PICKLED.map(lambda obj: pickle.dumps(obj, protocol=2)),
       meta=st.none() | st.binary(max_size=100) | PICKLED.map(lambda obj: pickle.dumps(obj, protocol=2)))
def test_fuzz_cifar_batch_files(fuzz_dir, batch, meta):
    folder = Path(tempfile.mkdtemp(dir=fuzz_dir)) / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(batch)
    (folder / "batches.meta").write_bytes(meta if meta is not None else pickle.dumps({b"label_names": CIFAR_NAMES}))
    data_or_data_error(folder.parent, "cifar10")


@functools.cache
def cifar_tar_bytes() -> bytes:
    """A valid, tiny official-layout CIFAR-10 archive (test split and meta)."""
    buffer = io.BytesIO()
    rows = np.random.default_rng(0).integers(0, 256, (3, 3072), dtype=np.uint8)
    files = {"test_batch": {b"data": rows, b"labels": [0, 1, 2]}, "batches.meta": {b"label_names": CIFAR_NAMES}}
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in files.items():
            blob = pickle.dumps(content, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buffer.getvalue()


@pytest.mark.slow  # fuzz
@FUZZ
@given(edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=6),
       cut=st.none() | st.floats(0, 1), compressed=st.booleans(), junk=st.none() | st.binary(max_size=300))
def test_fuzz_cifar_archives(fuzz_dir, edits, cut, compressed, junk):
    data = bytearray(cifar_tar_bytes() if compressed else gzip.decompress(cifar_tar_bytes()))
    for where, value in edits:
        data[int(where * len(data))] = value
    if cut is not None:
        data = data[: int(cut * len(data))]
    root = Path(tempfile.mkdtemp(dir=fuzz_dir))
    (root / "cifar-10-python.tar.gz").write_bytes(bytes(data) if junk is None else junk)
    data_or_data_error(root, "cifar10")


def test_corrupt_tar_error_is_one_line(tmp_path):
    tar = bytearray(gzip.decompress(cifar_tar_bytes()))
    tar[0] = 0  # the first header's checksum no longer matches
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(bytes(tar))
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", "test", tmp_path)
    one_line(str(err.value))


# ----------------------------------------------------------------------------------------------
# 6. Determinism: the same seed twice gives the same weights bit for bit (resume: tests above)


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, shared_data, one_thread):
    def run(name: str, seed: int) -> Path:
        cfg = make_config(overrides={"model": "lenet5", "dataset": "fashion-mnist", "data_root": str(shared_data),
                                     "epochs": 1, "train_subset": 500, "test_subset": 100, "method": "as",
                                     "as_steps": 2, "seed": seed})
        return train(cfg, tmp_path / name, progress=False) / "checkpoint.pt"

    first, second, other = run("a", 1), run("b", 1), run("c", 2)
    assert_same_weights(first, second)
    assert not all(torch.equal(weights(first)[k], weights(other)[k]) for k in weights(first))
