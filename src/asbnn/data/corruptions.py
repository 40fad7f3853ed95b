"""Seeded common corruptions of uint8 image batches, after CIFAR-10-C (Hendrycks & Dietterich, 2019).

`corrupt(images, name, severity, seed)` returns a corrupted copy of a batch laid out like
`ArrayDataset.images`: uint8 [N, H, W, C] with C = 1 or 3, or [N, H, W] for grayscale. Eight of
the fifteen CIFAR-10-C corruptions are here, each with the five CIFAR-scale constants of the
published generation script (make_cifar_c.py); x below is an image scaled to [0, 1], and every
result is clipped to [0, 1] before going back to uint8.

    gaussian_noise    x + N(0, c^2) per value                      c = .04 .06 .08 .09 .10
    shot_noise        Poisson(c * x) / c per value                 c = 500 250 100 75 50
    impulse_noise     each value is set to 0 or 1 (even odds)      c = .01 .02 .03 .05 .07
                      with probability c (salt and pepper)
    defocus_blur      convolution with a disk of radius r,         (r, s) = (.3, .4) (.4, .5)
                      anti-aliased by a 3x3 Gaussian of std s      (.5, .6) (1, .2) (1.5, .1)
    brightness        HSV value V -> min(V + c, 1)                 c = .05 .1 .15 .2 .3
    contrast          (x - m) * c + m, m the per-channel mean      c = .75 .5 .4 .3 .15
    pixelate          box-downscale to int(c * size), box-upscale  c = .95 .9 .85 .75 .65
    jpeg_compression  a JPEG round trip through Pillow, quality c  c = 80 65 58 50 40

Where this module differs from the reference script:

* Randomness comes from a numpy Generator seeded with (seed, index of the corruption in
  CORRUPTIONS, severity), drawn for the whole batch at once, instead of numpy's global state:
  the noise matches the reference in distribution, not value for value, and corrupting a batch
  in chunks gives other noise than corrupting it whole.
* Float results are rounded to the nearest integer; the reference casts with np.uint8, which
  truncates and so darkens its images by half a grey level on average.
* impulse_noise flips each value (channel of a pixel) independently, as scikit-image's
  random_noise(mode="s&p") does today; the scikit-image of 2019 placed a fixed count of salt and
  pepper values at random positions instead. The expected fraction is c either way.
* defocus_blur builds the same kernel in numpy (no OpenCV): the disk on an integer grid,
  normalised, then blurred by the 3x3 Gaussian exp(-d^2 / 2s^2) / sum, and applied with the
  mirrored border (reflect-101) that cv2.filter2D uses by default.
* brightness uses no colour-space library. With hue and saturation fixed, every RGB channel of
  HSV -> RGB is V times a function of (H, S), so raising V to V' scales each channel by V'/V;
  black (V = 0, saturation 0) becomes grey V'. That is the reference's rgb2hsv, shift, hsv2rgb.
* Grayscale images (the reference is RGB only) go through the same formulas on their one
  channel: brightness adds c, and JPEG encodes a one-channel image.
* Sizes other than 32x32 keep the CIFAR constants: pixelate scales int(c * width) by
  int(c * height), and the blur kernel keeps its size in pixels.
"""

import io
import math
from collections.abc import Callable

import numpy as np
from PIL import Image

from asbnn.errors import ConfigError

SEVERITIES = range(1, 6)


def _unit(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / 255


def _uint8(unit: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(unit, 0, 1) * 255).astype(np.uint8)


def _gaussian_noise(images: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return _uint8(_unit(images) + c * rng.standard_normal(images.shape, dtype=np.float32))


def _shot_noise(images: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return _uint8(rng.poisson(_unit(images) * c) / c)


def _impulse_noise(images: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    draw = rng.random(images.shape)
    out = images.copy()
    out[draw < c / 2] = 255
    out[(draw >= c / 2) & (draw < c)] = 0
    return out


def disk_kernel(radius: float, alias_sigma: float) -> np.ndarray:
    """The defocus kernel: a normalised disk smoothed by a 3x3 Gaussian, on the smallest grid holding it."""
    half = math.ceil(radius) + 1  # the disk, plus one pixel the 3x3 blur spreads it by
    grid = np.arange(-half, half + 1)
    disk = (grid[:, None] ** 2 + grid[None, :] ** 2 <= radius**2).astype(np.float64)
    disk /= disk.sum()
    taps = np.exp(-np.array([1.0, 0.0, 1.0]) / (2 * alias_sigma**2))
    taps /= taps.sum()
    padded = np.pad(disk, 1)
    rows = sum(t * padded[i:i + disk.shape[0], :] for i, t in enumerate(taps))
    return sum(t * rows[:, j:j + disk.shape[1]] for j, t in enumerate(taps))


def _defocus_blur(images: np.ndarray, c: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    kernel = disk_kernel(*c)
    half = kernel.shape[0] // 2
    padded = np.pad(_unit(images), ((0, 0), (half, half), (half, half), (0, 0)), mode="reflect")
    height, width = images.shape[1:3]
    out = np.zeros(images.shape, dtype=np.float32)
    for (i, j), weight in np.ndenumerate(kernel):
        if weight:
            out += np.float32(weight) * padded[:, i:i + height, j:j + width]
    return _uint8(out)


def _brightness(images: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    unit = _unit(images)
    value = unit.max(-1, keepdims=True)
    shifted = np.minimum(value + c, 1)
    scale = np.divide(shifted, value, out=np.zeros_like(value), where=value > 0)
    return _uint8(np.where(value > 0, unit * scale, shifted))


def _contrast(images: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    unit = _unit(images)
    mean = unit.mean(axis=(1, 2), keepdims=True)
    return _uint8((unit - mean) * c + mean)


def _per_image(images: np.ndarray, transform: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    """Apply a Pillow transform to each [H, W, C] image (C = 1 as mode L, C = 3 as RGB)."""
    out = np.empty_like(images)
    for k, image in enumerate(images):
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        out[k] = np.asarray(transform(pil)).reshape(image.shape)
    return out


def _pixelate(images: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    def pixelate(image: Image.Image) -> Image.Image:
        small = (max(1, int(image.width * c)), max(1, int(image.height * c)))
        return image.resize(small, Image.Resampling.BOX).resize(image.size, Image.Resampling.BOX)

    return _per_image(images, pixelate)


def _jpeg_compression(images: np.ndarray, c: int, rng: np.random.Generator) -> np.ndarray:
    def round_trip(image: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=c)
        return Image.open(buffer)

    return _per_image(images, round_trip)


# name -> (function of (images [N, H, W, C], constant, rng), the constants of severities 1..5)
_TABLE = {
    "gaussian_noise": (_gaussian_noise, (0.04, 0.06, 0.08, 0.09, 0.10)),
    "shot_noise": (_shot_noise, (500, 250, 100, 75, 50)),
    "impulse_noise": (_impulse_noise, (0.01, 0.02, 0.03, 0.05, 0.07)),
    "defocus_blur": (_defocus_blur, ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))),
    "brightness": (_brightness, (0.05, 0.1, 0.15, 0.2, 0.3)),
    "contrast": (_contrast, (0.75, 0.5, 0.4, 0.3, 0.15)),
    "pixelate": (_pixelate, (0.95, 0.9, 0.85, 0.75, 0.65)),
    "jpeg_compression": (_jpeg_compression, (80, 65, 58, 50, 40)),
}
CORRUPTIONS: tuple[str, ...] = tuple(_TABLE)  # in CIFAR-10-C's order


def _check(images: np.ndarray, name: str, severity: int, seed: int) -> None:
    if name not in _TABLE:
        raise ConfigError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    if not isinstance(severity, (int, np.integer)) or severity not in SEVERITIES:
        raise ConfigError(f"severity must be an integer from 1 to 5, got {severity!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise ConfigError(f"images must be a uint8 numpy array, got {getattr(images, 'dtype', type(images))}")
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[3] in (1, 3))):
        raise ConfigError(f"images must be [N, H, W] or [N, H, W, C] with C = 1 or 3, got shape {images.shape}")


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """A corrupted uint8 copy of `images`, same shape; the same arguments always give the same result."""
    _check(images, name, severity, seed)
    function, constants = _TABLE[name]
    rng = np.random.default_rng([seed, CORRUPTIONS.index(name), severity])
    batch = images[..., None] if images.ndim == 3 else images
    return function(batch, constants[severity - 1], rng).reshape(images.shape)
