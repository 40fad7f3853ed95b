"""A run trained on an image folder or archive keeps what `predict` and `eval` need (classes, input
size, normalisation) in its checkpoint, so it still works once the data set has moved."""

import dataclasses
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from asbnn.cli import main
from asbnn.runfolder import load_run

CLASSES = ("circle", "square", "star")


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_folder(root: Path, classes=CLASSES, splits=("train", "test"), per_class: int = 6, size: int = 12) -> Path:
    """PNG images `<root>/<split>/<class>/i.png`, each class its own colour."""
    rng = np.random.default_rng(0)
    for split in splits:
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                pixels[..., label % 3] += 150
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("archive", [False, True], ids=["folder", "tar.gz"])
def test_a_run_predicts_and_evaluates_after_its_data_moved(tmp_path, capsys, archive):
    data = make_folder(tmp_path / "shapes")
    image = tmp_path / "one.png"
    shutil.copy(data / "test" / "star" / "0.png", image)
    if archive:
        with tarfile.open(tmp_path / "shapes.tar.gz", "w:gz") as tar:
            for split in ("train", "test"):
                tar.add(data / split, arcname=split)
        shutil.rmtree(data)
        data = tmp_path / "shapes.tar.gz"
    run = tmp_path / "run"
    code, _, err = cli(capsys, "train", f"dataset={data}", "model=mlp", "method=vi", "epochs=1", "batch_size=6",
                       "eval_samples=3", "--out", run, "--quiet")
    assert code == 0, err
    before = json.loads((run / "eval" / "eval.json").read_text())

    moved = tmp_path / "elsewhere" / data.name
    moved.parent.mkdir()
    data.rename(moved)

    code, out, err = cli(capsys, "predict", run, image, "--samples", 3)
    assert code == 0, err
    assert out.startswith(f"{image}: ") and any(name in out for name in CLASSES)  # names, not label numbers

    code, _, err = cli(capsys, "eval", run, "--samples", 3)
    assert code == 2 and err.count("\n") == 1
    assert f"{data}, the data set this run was trained on, is not there any more; pass where it is now with " \
           "--data PATH" in err
    code, _, err = cli(capsys, "eval", run, "--samples", 3, "--data", moved)
    assert code == 0, err
    after = json.loads((run / "eval" / "eval.json").read_text())
    assert after["per_sample_accuracy"] == before["per_sample_accuracy"]

    other = make_folder(tmp_path / "other", classes=("circle", "square", "triangle"))
    code, _, err = cli(capsys, "eval", run, "--samples", 3, "--data", other)
    assert code == 2 and err.count("\n") == 1 and "different classes (e.g. triangle)" in err
    small = make_folder(tmp_path / "small", size=8)
    code, _, err = cli(capsys, "eval", run, "--samples", 3, "--data", small)
    assert code == 2 and err.count("\n") == 1 and "has 3x8x8px images, the model expects 3x12x12px" in err


def test_a_checkpoint_from_before_keeps_loading_from_its_data(tmp_path):
    data = make_folder(tmp_path / "shapes")
    run = tmp_path / "run"
    assert main(["train", f"dataset={data}", "model=mlp", "method=vi", "epochs=1", "batch_size=6",
                 "--out", str(run), "--quiet", "--no-eval"]) == 0
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["data"]["classes"] == CLASSES and state["data"]["image_size"] == 12
    del state["data"]  # as written before checkpoints held it
    torch.save(state, run / "old.pt")
    net_new, _, info_new = load_run(run)
    net_old, _, info_old = load_run(run / "old.pt")  # described again from the data, as before
    assert info_old.classes is None and info_old == dataclasses.replace(info_new, classes=None)
    for a, b in zip(net_new.state_dict().values(), net_old.state_dict().values()):
        assert torch.equal(a, b)


def test_an_ood_set_is_read_without_its_training_split(tmp_path, capsys):
    data = make_folder(tmp_path / "shapes")
    ood = make_folder(tmp_path / "ood", classes=("a", "b"))
    (ood / "train" / "a" / "0.png").write_bytes(b"not a png")  # decoding the training split would fail
    run = tmp_path / "run"
    assert main(["train", f"dataset={data}", "model=mlp", "method=vi", "epochs=1", "batch_size=6",
                 "--out", str(run), "--quiet", "--no-eval"]) == 0
    code, _, err = cli(capsys, "eval", run, "--samples", 2, "--ood", ood)
    assert code == 0, err
    assert "auroc" in json.loads((run / "eval" / "eval.json").read_text())["ood"][str(ood)]["total"]
