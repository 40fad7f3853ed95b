"""`asbnn predict` on real CIFAR-10 test images with a tiny trained LeNet-5."""

import json
import re
import shutil
import tarfile

import pytest
import torch

from asbnn.cli import main
from asbnn.config import make_config
from asbnn.data.folders import CIFAR10_CLASSES
from asbnn.export import read_metadata, save_model
from asbnn.train import train

TRAIN_PER_CLASS, TEST_PER_CLASS = 50, 20
PICKED = ("cat", "ship", "truck", "frog")  # test images given to `predict`


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """LeNet-5 on a few hundred images: on a busy 2-core machine one thread is ~10x faster than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cifar(shared_data, tmp_path_factory):
    """A small copy of cifar10-jpeg (real images, 50 train / 20 test per class) and 4 loose test images."""
    root = tmp_path_factory.mktemp("cifar")
    wanted = {"train": TRAIN_PER_CLASS, "test": TEST_PER_CLASS + 1}  # the last test image of a class is picked
    kept: dict[tuple[str, str], int] = {}
    with tarfile.open(shared_data / "cifar10-jpeg.tar.gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 4:
                continue
            _, split, name, file = parts
            count = kept.get((split, name), 0)
            if count >= wanted[split]:
                continue
            kept[(split, name)] = count + 1
            if split == "test" and count == TEST_PER_CLASS:
                if name in PICKED:  # nested, to check that folders are searched recursively
                    dest = root / "images" / ("more" if name == "frog" else "") / f"{name}.jpg"
                else:
                    continue
            else:
                dest = root / "cifar10-jpeg" / split / name / file
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(tar.extractfile(member).read())
    return root


@pytest.fixture(scope="module")
def run(cifar):
    cfg = make_config(overrides=dict(model="lenet5", dataset="cifar10", method="as", data_root=str(cifar),
                                     train_subset=500, test_subset=200, epochs=1, device="cpu"))
    return train(cfg, cifar / "run", progress=False)


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


LINE = re.compile(r"^(?P<image>.+): (?P<classes>.+) \| total (?P<total>\S+) nats, epistemic (?P<epi>\S+) nats$")


def test_predict_text_output(capsys, run, cifar):
    code, out, err = run_cli(capsys, "predict", str(run), str(cifar / "images"), "--samples", "8", "--top", "10")
    assert code == 0, err
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        str(cifar / "images" / f) for f in ("cat.jpg", "more/frog.jpg", "ship.jpg", "truck.jpg")]
    for line in lines:
        match = LINE.match(line)
        assert match, line
        pairs = [item.rsplit(" ", 1) for item in match["classes"].split(", ")]
        assert sorted(name for name, _ in pairs) == sorted(CIFAR10_CLASSES)
        probs = [float(p) for _, p in pairs]
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=6e-3)
        total, epistemic = float(match["total"]), float(match["epi"])
        assert 0 <= epistemic <= total

    code, again, _ = run_cli(capsys, "predict", str(run), str(cifar / "images"), "--samples", "8", "--top", "10")
    assert again == out  # same seed, same sampled models, same output
    code, other, _ = run_cli(capsys, "predict", str(run), str(cifar / "images"), "--samples", "8", "--top", "10",
                             "--seed", "1")
    assert other != out


def test_json_output_and_model_file_agree(capsys, run, cifar):
    images = [str(cifar / "images" / "cat.jpg"), str(cifar / "images" / "more")]
    model = save_model(run, cifar / "lenet5.safetensors")
    assert read_metadata(model)["classes"] == list(CIFAR10_CLASSES)
    outputs = []
    for source in (run, model):
        code, out, err = run_cli(capsys, "predict", str(source), *images, "--samples", "5", "--json")
        assert code == 0, err
        result = json.loads(out)
        assert result["model"] == str(source)
        outputs.append(result["predictions"])
    assert outputs[0] == outputs[1]
    first = outputs[0]
    assert [p["image"] for p in first] == images[:1] + [str(cifar / "images" / "more" / "frog.jpg")]
    for p in first:
        assert len(p["top"]) == 3 and all(0 <= t["probability"] <= 1 for t in p["top"])
        assert p["epistemic"] <= p["total"] and p["aleatoric"] <= p["total"] + 1e-6


def test_bad_inputs_give_one_clear_line(capsys, run, cifar, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    cases = [
        ((str(run), str(broken)), f"{broken} is not a readable PNG or JPEG image"),
        ((str(run), str(tmp_path / "nope.jpg")), f"no such image file or folder: {tmp_path / 'nope.jpg'}"),
        ((str(run), str(empty)), f"no .png/.jpg/.jpeg images in {empty}"),
        ((str(tmp_path / "norun"), str(cifar / "images")), "checkpoint not found"),
        ((str(tmp_path / "x.safetensors"), str(cifar / "images")), "model file not found"),
        ((str(run), str(cifar / "images"), "--samples", "0"), "argument --samples: must be an integer > 0, got '0'"),
    ]
    for args, message in cases:
        code, out, err = run_cli(capsys, "predict", *args)
        assert code == 2 and out == ""
        assert err.startswith("asbnn: error: ") and err.count("\n") == 1 and message in err, err


def test_grayscale_and_large_images_are_converted(capsys, run, cifar, tmp_path):
    from PIL import Image

    with Image.open(cifar / "images" / "ship.jpg") as image:
        image.convert("L").resize((97, 61)).save(tmp_path / "gray-wide.png")
    shutil.copy(cifar / "images" / "ship.jpg", tmp_path / "SHIP.JPEG")
    code, out, err = run_cli(capsys, "predict", str(run), str(tmp_path), "--samples", "3", "--top", "1")
    assert code == 0, err
    assert len(out.splitlines()) == 2 and all(LINE.match(line) for line in out.splitlines())
