"""Classify image files with K sampled models and say how sure the ensemble is.

Images are read with Pillow, converted to the model's channels, resized to its input size and
normalised with its training set's statistics, then go through the same sampled-model evaluation
as `asbnn eval` (`evaluate.sampled_predictions`: each sampled model is one eps, seeded, so a seed always gives
the same answer). Per image: the ensemble's top classes, the total uncertainty (entropy of the
ensemble) and the epistemic part (mutual information: how much the sampled models disagree).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

from .data import ArrayDataset, DatasetInfo, dataset_classes, eval_loader
from .errors import ConfigError, DataError
from .evaluate import choose_mode, sampled_predictions
from .export import info_from_metadata, load_model, read_metadata
from .hardware import resolve_device
from .runfolder import load_run

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class Classifier:
    """A trained network with what it takes to read raw images: input size, normalisation, class names."""

    net: nn.Module
    info: DatasetInfo
    classes: list[str]


@dataclass(frozen=True)
class ImagePrediction:
    image: str
    top: list[tuple[str, float]]  # (class name, ensemble probability), most probable first
    total: float  # nats
    aleatoric: float
    epistemic: float

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image, "top": [{"class": c, "probability": p} for c, p in self.top],
                "total": self.total, "aleatoric": self.aleatoric, "epistemic": self.epistemic}


def load_classifier(source: str | Path, device: str | torch.device = "cpu") -> Classifier:
    """A run folder, checkpoint or `.safetensors` model file, ready for `predict_images`."""
    path = Path(source)
    if path.suffix == ".safetensors":
        meta = read_metadata(path)
        info, classes = info_from_metadata(meta), meta.get("classes")
        if info is None:
            raise ConfigError(f"{path} does not record its input size and normalisation; "
                              "save it with save_model(..., info=dataset_info(NAME))")
        net = load_model(path, device=device)
    else:
        net, cfg, info = load_run(path, device)
        classes = info.classes or dataset_classes(cfg.dataset, cfg.data_root)  # older checkpoints: from the data
    return Classifier(net, info, classes or [str(label) for label in range(info.num_classes)])


def find_images(paths: Sequence[str | Path]) -> list[Path]:
    """The files named, and the PNG/JPEG files anywhere below the folders named, in a stable order."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            below = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
                           and not any(part.startswith(".") for part in f.relative_to(path).parts))
            if not below:
                raise DataError(f"no .png/.jpg/.jpeg images in {path} or its subfolders")
            found += below
        elif path.is_file():
            found.append(path)
        else:
            raise DataError(f"no such image file or folder: {path}")
    return found


def read_images(files: Sequence[Path], channels: int, size: int) -> np.ndarray:
    """uint8 (N, size, size, channels) pixels; each image is resized whole (square models, any input)."""
    if channels not in (1, 3):
        raise ConfigError(f"can only feed images to models with 1 or 3 input channels, not {channels}")
    mode = "L" if channels == 1 else "RGB"
    out = np.empty((len(files), size, size, channels), np.uint8)
    for i, file in enumerate(files):
        try:
            with Image.open(file, formats=("JPEG", "PNG")) as image:
                upright = ImageOps.exif_transpose(image)  # photos from cameras and phones
                resized = upright.convert(mode).resize((size, size), Image.Resampling.BILINEAR)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise DataError(f"{file} is not a readable PNG or JPEG image: {err}") from None
        out[i] = np.asarray(resized).reshape(size, size, channels)
    return out


def predict_images(clf: Classifier, files: Sequence[Path], num_samples: int = 30, seed: int = 0,
                   top: int = 3) -> list[ImagePrediction]:
    """Ensemble prediction and uncertainty of K sampled models (one, if deterministic) per image."""
    if num_samples <= 0 or top <= 0:
        raise ConfigError(f"--samples and --top must be > 0, got {num_samples} and {top}")
    info = clf.info
    images = read_images(files, info.channels, info.image_size)
    data = ArrayDataset(images, np.zeros(len(images), np.int64), clf.classes)  # labels unused
    device = next(clf.net.parameters()).device
    loader = eval_loader(data, info.mean, info.std, device=device)
    pred = sampled_predictions(clf.net, loader, num_samples=num_samples, seed=seed, mode=choose_mode(device))
    probs, indices = pred.ensemble_probs.cpu().topk(min(top, len(clf.classes)), dim=1)
    total, aleatoric, epistemic = (t.cpu().tolist() for t in (pred.total, pred.aleatoric, pred.epistemic))
    return [
        ImagePrediction(str(file), [(clf.classes[k], p) for k, p in zip(ks.tolist(), ps.tolist())],
                        total[i], aleatoric[i], epistemic[i])
        for i, (file, ps, ks) in enumerate(zip(files, probs, indices))
    ]


def predict_files(model: str | Path, paths: Sequence[str | Path], *, num_samples: int = 30, seed: int = 0,
                  top: int = 3, device: str = "auto") -> list[ImagePrediction]:
    """`asbnn predict`: load the model, find and read the images, predict."""
    files = find_images(paths)
    return predict_images(load_classifier(model, resolve_device(device)), files, num_samples, seed, top)


def format_predictions(predictions: Sequence[ImagePrediction]) -> str:
    """One line per image: top classes with probabilities, then the uncertainty in nats."""
    lines = []
    for p in predictions:
        classes = ", ".join(f"{name} {prob:.3f}" for name, prob in p.top)
        lines.append(f"{p.image}: {classes} | total {p.total:.3f} nats, epistemic {p.epistemic:.3f} nats")
    return "\n".join(lines)
