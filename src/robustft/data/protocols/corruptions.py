"""Common corruptions (Hendrycks & Dietterich 2019, ImageNet-C) for any image folder, deterministically.

Eleven of the 19 corruptions, with the five severities' parameters of the ImageNet-C generator
(``make_imagenet_c.py``): the noise family (gaussian, shot, impulse, speckle), the blurs that need
no external data (gaussian, defocus), and the digital / weather-free ones (contrast, brightness,
saturate, jpeg_compression, pixelate). Motion blur, frost, fog, snow, spatter, zoom and glass blur
need ImageMagick, frost images or per-image loops in the original code and are not reproduced here.

Every random draw is seeded by (image key, corruption, severity) alone, so a corrupted copy is the
same on every machine and in every order, and one image can be regenerated without the others.
``generate_corruptions`` writes ``<out>/<corruption>/<severity>/<class>/<image>.png``; the
``image_folder`` protocol reads that tree back as ``ood_<corruption>_<severity>`` splits.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from robustft.data.domainbed import seed_hash
from robustft.errors import ConfigError, DataError

Array = np.ndarray


def _gaussian_noise(x: Array, c: float, rng: np.random.Generator) -> Array:
    return x + rng.normal(size=x.shape, scale=c)


def _shot_noise(x: Array, c: float, rng: np.random.Generator) -> Array:
    return rng.poisson(x * c) / c


def _impulse_noise(x: Array, c: float, rng: np.random.Generator) -> Array:
    """Salt and pepper on a share ``c`` of the values, half each (skimage's ``random_noise(mode='s&p')``)."""
    out = x.copy()
    hit = rng.random(x.shape) < c
    salt = rng.random(x.shape) < 0.5
    out[hit & salt] = 1.0
    out[hit & ~salt] = 0.0
    return out


def _speckle_noise(x: Array, c: float, rng: np.random.Generator) -> Array:
    return x + x * rng.normal(size=x.shape, scale=c)


def _gaussian_blur(x: Array, c: float, rng: np.random.Generator) -> Array:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(x, sigma=(c, c, 0))


def _disk(radius: float, alias_blur: float) -> Array:
    """A normalised disk of ``radius`` on a grid of at least 17 x 17, softened by a Gaussian of ``alias_blur``."""
    from scipy.ndimage import gaussian_filter

    half = 8 if radius <= 8 else int(radius)
    xx, yy = np.meshgrid(np.arange(-half, half + 1), np.arange(-half, half + 1))
    kernel = ((xx**2 + yy**2) <= radius**2).astype(np.float64)
    return gaussian_filter(kernel / kernel.sum(), sigma=alias_blur)


def _defocus_blur(x: Array, c: tuple[float, float], rng: np.random.Generator) -> Array:
    from scipy.ndimage import convolve

    kernel = _disk(*c)
    return np.stack([convolve(x[:, :, channel], kernel, mode="reflect") for channel in range(3)], axis=2)


def _contrast(x: Array, c: float, rng: np.random.Generator) -> Array:
    means = x.mean(axis=(0, 1), keepdims=True)
    return (x - means) * c + means


def _hsv_shift(x: Array, channel: int, scale: float, shift: float) -> Array:
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

    hsv = rgb_to_hsv(np.clip(x, 0, 1))
    hsv[:, :, channel] = np.clip(hsv[:, :, channel] * scale + shift, 0, 1)
    return hsv_to_rgb(hsv)


def _brightness(x: Array, c: float, rng: np.random.Generator) -> Array:
    return _hsv_shift(x, 2, 1.0, c)


def _saturate(x: Array, c: tuple[float, float], rng: np.random.Generator) -> Array:
    return _hsv_shift(x, 1, c[0], c[1])


def _jpeg_compression(x: Array, c: int, rng: np.random.Generator) -> Array:
    buffer = io.BytesIO()
    Image.fromarray(_to_uint8(x)).save(buffer, "JPEG", quality=c)
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float64) / 255


def _pixelate(x: Array, c: float, rng: np.random.Generator) -> Array:
    height, width = x.shape[:2]
    image = Image.fromarray(_to_uint8(x))
    small = image.resize((max(1, int(width * c)), max(1, int(height * c))), Image.Resampling.BOX)
    return np.asarray(small.resize((width, height), Image.Resampling.BOX), dtype=np.float64) / 255


CorruptionFn = Callable[[Array, object, np.random.Generator], Array]

# name -> (function, parameters of severities 1..5), as in ImageNet-C's make_imagenet_c.py.
CORRUPTIONS: dict[str, tuple[CorruptionFn, tuple]] = {
    "gaussian_noise": (_gaussian_noise, (0.08, 0.12, 0.18, 0.26, 0.38)),
    "shot_noise": (_shot_noise, (60, 25, 12, 5, 3)),
    "impulse_noise": (_impulse_noise, (0.03, 0.06, 0.09, 0.17, 0.27)),
    "speckle_noise": (_speckle_noise, (0.15, 0.2, 0.35, 0.45, 0.6)),
    "gaussian_blur": (_gaussian_blur, (1, 2, 3, 4, 6)),
    "defocus_blur": (_defocus_blur, ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))),
    "contrast": (_contrast, (0.4, 0.3, 0.2, 0.1, 0.05)),
    "brightness": (_brightness, (0.1, 0.2, 0.3, 0.4, 0.5)),
    "saturate": (_saturate, ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2))),
    "jpeg_compression": (_jpeg_compression, (25, 18, 15, 10, 7)),
    "pixelate": (_pixelate, (0.6, 0.5, 0.4, 0.3, 0.25)),
}
SEVERITIES = (1, 2, 3, 4, 5)


def _to_uint8(x: Array) -> Array:
    return np.uint8(np.clip(x, 0, 1) * 255 + 0.5)


def corrupt(image: Image.Image | Array, corruption: str, severity: int, key: str | int) -> Array:
    """``image`` (PIL or uint8 ``[H, W, 3]``) corrupted at ``severity`` (1..5), as uint8 ``[H, W, 3]``.

    ``key`` names the image (its relative path or index); with the corruption and severity it seeds
    the random draws, so the output is a pure function of these four arguments.
    """
    if corruption not in CORRUPTIONS:
        raise ConfigError(f"corruption: unknown '{corruption}' (known: {', '.join(CORRUPTIONS)})")
    if severity not in SEVERITIES:
        raise ConfigError(f"corruption severity: {severity} is not one of 1..5")
    function, parameters = CORRUPTIONS[corruption]
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float64) / 255
    rng = np.random.default_rng(seed_hash(str(key), corruption, severity))
    return _to_uint8(function(pixels, parameters[severity - 1], rng))


def generate_corruptions(
    source: str | Path,
    out: str | Path,
    corruptions: Sequence[str] = tuple(CORRUPTIONS),
    severities: Sequence[int] = SEVERITIES,
) -> int:
    """Write ``<out>/<corruption>/<severity>/<class>/<image stem>.png`` for every image of the class-folder
    tree ``source``; returns the number of images written. Images are keyed by their path relative to
    ``source``, so the same tree gives the same files wherever it lives."""
    from robustft.data.folders import _open_image
    from robustft.data.protocols import image_files, require_dir, subfolders

    source, out = Path(source), Path(out)
    classes = subfolders(require_dir(source, "corruption source"))
    if not classes:
        raise DataError(f"{source}: no class folders to corrupt")
    written = 0
    for folder in classes:
        for path in image_files(folder):
            key = path.relative_to(source).as_posix()
            image = _open_image(path).convert("RGB")
            for corruption in corruptions:
                for severity in severities:
                    target = out / corruption / str(severity) / path.relative_to(source).with_suffix(".png")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(corrupt(image, corruption, severity, key)).save(target)
                    written += 1
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m robustft.data.protocols.corruptions SOURCE OUT [--corruptions a,b] [--severities 1,3]``."""
    import argparse

    parser = argparse.ArgumentParser(description="Write -C corruptions of a class-folder tree (ImageNet-C style).")
    parser.add_argument("source", type=Path, help="class-folder tree: SOURCE/<class>/<image>")
    parser.add_argument("out", type=Path, help="written as OUT/<corruption>/<severity>/<class>/<image>.png")
    parser.add_argument("--corruptions", default=",".join(CORRUPTIONS), help="comma-separated; default all 11")
    parser.add_argument("--severities", default="1,2,3,4,5", help="comma-separated; default 1..5")
    args = parser.parse_args(argv)
    try:
        corruptions = [name.strip() for name in args.corruptions.split(",") if name.strip()]
        severities = [int(value) for value in args.severities.split(",") if value.strip()]
        unknown = [name for name in corruptions if name not in CORRUPTIONS]
        if unknown:
            raise ConfigError(f"--corruptions: unknown '{unknown[0]}' (known: {', '.join(CORRUPTIONS)})")
        written = generate_corruptions(args.source, args.out, corruptions, severities)
    except (ConfigError, DataError, ValueError) as error:
        print(f"error: {error}")
        return 1
    print(f"wrote {written} images under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
