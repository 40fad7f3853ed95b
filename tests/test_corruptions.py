import colorsys
import math

import numpy as np
import pytest

from asbnn.data import load_dataset
from asbnn.data.corruptions import CORRUPTIONS, corrupt, disk_kernel
from asbnn.errors import ConfigError

NOISES = ("gaussian_noise", "shot_noise", "impulse_noise")


def textured(n: int = 4, size: int = 32, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Photo-like test images: sums of random plane waves, structure at several scales."""
    rng = np.random.default_rng(seed)
    grid = np.arange(size) / size
    y, x = grid[None, :, None, None], grid[None, None, :, None]
    waves = np.zeros((n, size, size, channels))
    for _ in range(6):
        fx, fy, phase = rng.uniform(0.5, 6, (3, n, 1, 1, channels))
        waves += np.sin(2 * np.pi * (fx * x + fy * y) + 2 * np.pi * phase)
    return np.clip(128 + 25 * waves, 0, 255).astype(np.uint8)


def grey(value: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.full(shape, value, dtype=np.uint8)


def change(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a.astype(np.int64) - b.astype(np.int64)


def test_corruption_names():
    assert CORRUPTIONS == ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur",
                           "brightness", "contrast", "pixelate", "jpeg_compression")


# ---------------------------------------------------------------- hand-computed values


def test_contrast_on_2x2():
    # mean 100; severity 1 scales deviations by .75: 0 -> 25, 200 -> 175
    image = np.array([[[0, 100], [200, 100]]], dtype=np.uint8)
    assert corrupt(image, "contrast", 1, 0).tolist() == [[[25, 100], [175, 100]]]
    # per channel: a constant channel stays; severity 5 (.15): 100 +- 100 * .15
    rgb = np.stack([image[0], grey(7, (2, 2)), np.array([[0, 40], [80, 40]], dtype=np.uint8)], -1)[None]
    out = corrupt(rgb, "contrast", 5, 0)
    assert out[0, ..., 0].tolist() == [[85, 100], [115, 100]] and (out[..., 1] == 7).all()
    assert out[0, ..., 2].tolist() == [[34, 40], [46, 40]]  # mean 40: 40 -+ 40 * .15


def test_brightness_on_known_pixels():
    pixels = np.array([[[[100, 50, 0], [0, 0, 0], [200, 200, 200], [250, 0, 0]]]], dtype=np.uint8)
    # severity 1, c = .05 = 12.75/255: V 100 -> 112.75 scales every channel by 1.1275
    # black (saturation 0) becomes grey 12.75; grey 200 -> 212.75; (250, 0, 0) -> (262.75 -> 255)
    assert corrupt(pixels, "brightness", 1, 0).tolist() == [[[[113, 56, 0], [13, 13, 13], [213, 213, 213],
                                                              [255, 0, 0]]]]
    # severity 3 on grayscale adds .15 * 255 = 38.25
    assert corrupt(grey(200, (1, 1, 1)), "brightness", 3, 0).item() == 238


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_brightness_matches_an_hsv_round_trip(severity):
    c = (0.05, 0.1, 0.15, 0.2, 0.3)[severity - 1]
    images = np.random.default_rng(severity).integers(0, 256, (1, 16, 16, 3), dtype=np.uint8)
    expected = np.empty(images.shape)
    for index in np.ndindex(images.shape[:3]):
        h, s, v = colorsys.rgb_to_hsv(*(images[index] / 255))
        expected[index] = colorsys.hsv_to_rgb(h, s, min(v + c, 1.0))
    # each value is the exact result rounded to one of its nearest integers (.5 ties go either way)
    assert np.abs(corrupt(images, "brightness", severity, 0) - expected * 255).max() <= 0.5 + 1e-3


def test_pixelate_on_4x4_blocks():
    # severity 5: 4 -> int(.65 * 4) = 2 pixels by box averaging, then back to 4 by replication
    blocks = np.array([[10, 10, 50, 50], [10, 10, 50, 50], [90, 90, 130, 130], [90, 90, 130, 130]], dtype=np.uint8)
    assert (corrupt(blocks[None], "pixelate", 5, 0)[0] == blocks).all()
    # every 2x2 block holding 0, 20, 40, 60 becomes its mean 30
    mixed = np.tile(np.array([[0, 20], [40, 60]], dtype=np.uint8), (2, 2))
    assert (corrupt(mixed[None, ..., None], "pixelate", 5, 0) == 30).all()


def test_defocus_kernel_and_blur():
    # severity 4: disk of radius 1 is the 5-pixel plus; the Gaussian of std .2 barely touches it
    k = disk_kernel(1.0, 0.2)
    assert k.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(k[1:4, 1:4], [[0, 0.2, 0], [0.2, 0.2, 0.2], [0, 0.2, 0]], atol=1e-4)
    # severity 1: radius .3 is one pixel, blurred by taps proportional to (e^-3.125, 1, e^-3.125)
    side = math.exp(-1 / (2 * 0.4**2)) / (1 + 2 * math.exp(-1 / (2 * 0.4**2)))
    centre = 1 - 2 * side
    np.testing.assert_allclose(disk_kernel(0.3, 0.4)[1:4, 1:4],
                               np.outer([side, centre, side], [side, centre, side]), rtol=1e-12)
    point = grey(0, (1, 9, 9))
    point[0, 4, 4] = 255
    out = corrupt(point, "defocus_blur", 4, 0)[0]
    assert out[4, 4] == out[3, 4] == out[5, 4] == out[4, 3] == out[4, 5] == 51  # 255 / 5
    assert out.sum() == 5 * 51


@pytest.mark.parametrize("severity", range(1, 6))
def test_flat_images_survive_blur_contrast_and_pixelate(severity):
    flat = grey(77, (2, 8, 8, 3))
    for name in ("defocus_blur", "contrast", "pixelate"):
        assert (corrupt(flat, name, severity, 0) == flat).all()
    assert np.abs(change(corrupt(flat, "jpeg_compression", severity, 0), flat)).max() <= 1


# ---------------------------------------------------------------- noise statistics


def test_gaussian_noise_std():
    images = grey(128, (4, 64, 64, 3))
    for severity, c in enumerate((0.04, 0.06, 0.08, 0.09, 0.10), start=1):
        noise = change(corrupt(images, "gaussian_noise", severity, 0), images) / 255
        # 49152 values: the sample std is within 3% of c with overwhelming probability
        assert noise.std() == pytest.approx(c, rel=0.03)
        assert abs(noise.mean()) < 4 * c / math.sqrt(noise.size)


def test_shot_noise_std():
    # Poisson(c x) / c has mean x and variance x / c
    images = grey(128, (4, 64, 64, 3))
    x = 128 / 255
    for severity, c in enumerate((500, 250, 100, 75, 50), start=1):
        out = corrupt(images, "shot_noise", severity, 0) / 255
        assert out.std() == pytest.approx(math.sqrt(x / c), rel=0.03)
        assert abs(out.mean() - x) < 4 * math.sqrt(x / c / out.size) + 0.5 / 255


def test_impulse_noise_fraction():
    images = grey(128, (4, 64, 64, 3))
    n = images.size
    for severity, c in enumerate((0.01, 0.02, 0.03, 0.05, 0.07), start=1):
        out = corrupt(images, "impulse_noise", severity, 0)
        salt, pepper = (out == 255).mean(), (out == 0).mean()
        assert ((out == 255) | (out == 0) | (out == 128)).all()
        assert salt + pepper == pytest.approx(c, abs=4 * math.sqrt(c * (1 - c) / n))
        assert salt == pytest.approx(c / 2, abs=4 * math.sqrt(c / 2 / n))


# ---------------------------------------------------------------- general contract


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_deterministic_given_seed(name):
    images = textured(n=3)
    first = corrupt(images, name, 3, seed=7)
    assert np.array_equal(first, corrupt(images.copy(), name, 3, seed=7))
    other = corrupt(images, name, 3, seed=8)
    assert np.array_equal(first, other) != (name in NOISES)  # only the noises use the seed
    assert np.array_equal(images, textured(n=3))  # the input is left alone


def test_noise_streams_differ_between_severities():
    images = grey(128, (1, 16, 16, 3))
    g3, g4 = (change(corrupt(images, "gaussian_noise", s, 0), images) for s in (3, 4))
    assert not np.array_equal(np.sign(g3), np.sign(g4))


@pytest.mark.parametrize("name", CORRUPTIONS)
@pytest.mark.parametrize("shape", [(2, 12, 12), (2, 12, 12, 1), (2, 12, 10, 3)])
def test_shape_and_dtype_preserved(name, shape):
    images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    for severity in range(1, 6):
        out = corrupt(images, name, severity, 0)
        assert out.shape == images.shape and out.dtype == np.uint8


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_grayscale_with_and_without_channel_axis_agree(name):
    images = textured(n=2, channels=1)
    assert np.array_equal(corrupt(images[..., 0], name, 2, 3), corrupt(images, name, 2, 3)[..., 0])


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_severity_increases_mean_absolute_change(name, channels):
    images = textured(n=8, channels=channels)
    changes = [np.abs(change(corrupt(images, name, s, 0), images)).mean() for s in range(1, 6)]
    assert changes[0] > 0
    assert all(a < b for a, b in zip(changes, changes[1:])), changes


def test_real_images(shared_data):
    images = load_dataset("fashion-mnist", "test", shared_data).images[:16]
    for name in CORRUPTIONS:
        out = corrupt(images, name, 5, 0)
        assert out.shape == images.shape and out.dtype == np.uint8 and not np.array_equal(out, images)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "fog"}, "unknown corruption 'fog'"),
        ({"severity": 0}, "severity"),
        ({"severity": 6}, "severity"),
        ({"severity": 2.0}, "severity"),
        ({"seed": -1}, "seed"),
        ({"images": np.zeros((1, 4, 4), dtype=np.float32)}, "uint8"),
        ({"images": np.zeros((4, 4), dtype=np.uint8)}, r"\[N, H, W\]"),
        ({"images": np.zeros((1, 4, 4, 2), dtype=np.uint8)}, "C = 1 or 3"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs, match):
    call = {"images": grey(0, (1, 4, 4)), "name": "contrast", "severity": 1, "seed": 0, **kwargs}
    with pytest.raises(ConfigError, match=match):
        corrupt(**call)
    with pytest.raises(ValueError):  # ConfigError is a ValueError
        corrupt(**call)
