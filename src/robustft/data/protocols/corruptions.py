"""Common corruptions (Hendrycks & Dietterich 2019, ImageNet-C) for any image folder, deterministically.

All 19 corruptions (the 15 of the benchmark and the 4 extra: speckle noise, gaussian blur, spatter,
saturate) with the five severities' parameters of the ImageNet-C generator (``make_imagenet_c.py``).
Spatial parameters (blur radii, shuffle distances, elastic displacements) are in pixels of ImageNet-C's
224 x 224 images, as there; resize to 224 first to reproduce ImageNet-C's strength. Rewritten on
numpy / scipy / PIL only, so three pieces differ from the original by design:

* motion blur (``motion_blur``, ``snow``): ImageMagick's ``MotionBlurImage`` rebuilt: a one-sided line
  of ``2 * ceil(radius) + 1`` pixels along the angle, weighted by a Gaussian of ``sigma``, edges clamped.
* ``frost``: ImageNet-C blends a random crop of one of six frost photographs that do not ship with
  robustft; here the overlay is a synthetic frost texture (a plasma-fractal haze plus blurred ice
  needles, tinted pale blue, about as bright as the photographs), drawn from the same seeded generator.
  Frost numbers are therefore not comparable with published ImageNet-C frost numbers.
* ``spatter`` (water, severities 1-3): OpenCV's Canny edge map is replaced by Sobel magnitude with
  hysteresis at the same thresholds (no edge thinning); the distance transform, truncation at 20,
  histogram equalisation and emboss filter follow the original.

Not the ``imagecorruptions`` package: its PyPI release (1.1.2) imports ``pkg_resources``, gone since setuptools
81, and its fork ``imagecorruptions-imaug`` (1.1.5, which imports) needs opencv-python, numba and scikit-image and
draws from numpy's global random state.

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


def _smooth(x: Array, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> Array:
    """Gaussian blur over the two spatial axes only (skimage ``gaussian(..., multichannel=True)``)."""
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(x, sigma=(sigma, sigma) + (0,) * (x.ndim - 2), mode=mode, truncate=truncate)


def _line_blur(x: Array, radius: float, sigma: float, angle: float) -> Array:
    """ImageMagick's motion blur: each pixel averages the ``2 * ceil(radius) + 1`` pixels behind it along
    ``angle`` (degrees), weighted by a one-sided Gaussian of ``sigma``; the border is clamped."""
    width = 2 * int(np.ceil(radius)) + 1
    steps = np.arange(width)
    weights = np.exp(-(steps**2) / (2.0 * sigma**2))
    weights /= weights.sum()
    theta = np.deg2rad(angle)
    shift_x = np.ceil(steps * np.cos(theta) - 0.5).astype(int)
    shift_y = np.ceil(steps * np.sin(theta) - 0.5).astype(int)
    height, columns = x.shape[:2]
    pad = int(max(np.abs(shift_x).max(), np.abs(shift_y).max()))
    padded = np.pad(x, ((pad, pad), (pad, pad)) + ((0, 0),) * (x.ndim - 2), mode="edge")
    out = np.zeros_like(x, dtype=np.float64)
    for weight, dx, dy in zip(weights, shift_x, shift_y, strict=True):
        out += weight * padded[pad + dy : pad + dy + height, pad + dx : pad + dx + columns]
    return out


def _motion_blur(x: Array, c: tuple[float, float], rng: np.random.Generator) -> Array:
    blurred = _line_blur(_to_uint8(x).astype(np.float64), c[0], c[1], rng.uniform(-45, 45))
    return np.round(blurred) / 255


def _clipped_zoom(x: Array, factor: float) -> Array:
    """Zoom the centre of ``x`` by ``factor`` (linear interpolation) and crop back to ``x``'s size."""
    from scipy.ndimage import zoom

    height, width = x.shape[:2]
    crop_h, crop_w = int(np.ceil(height / factor)), int(np.ceil(width / factor))
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    zoomed = zoom(x[top : top + crop_h, left : left + crop_w], (factor, factor) + (1,) * (x.ndim - 2), order=1)
    trim_h, trim_w = (zoomed.shape[0] - height) // 2, (zoomed.shape[1] - width) // 2
    return zoomed[trim_h : trim_h + height, trim_w : trim_w + width]


def _zoom_blur(x: Array, c: tuple[float, float, float], rng: np.random.Generator) -> Array:
    factors = np.arange(*c)
    x = x.astype(np.float32)
    return (x + sum(_clipped_zoom(x, factor) for factor in factors)) / (len(factors) + 1)


def _glass_blur(x: Array, c: tuple[float, int, int], rng: np.random.Generator) -> Array:
    """Blur, then swap each pixel with a random neighbour within ``c[1]`` (bottom-right to top-left,
    ``c[2]`` passes, sequentially as in ImageNet-C: later swaps move already-swapped pixels), blur again."""
    sigma, delta, passes = c
    x = np.floor(np.clip(_smooth(x, sigma), 0, 1) * 255).astype(np.uint8)
    height, width = x.shape[:2]
    order = list(range(height * width))
    for _ in range(passes):
        rows = range(height - delta, delta, -1)
        columns = range(width - delta, delta, -1)
        offsets = rng.integers(-delta, delta, size=(len(rows) * len(columns), 2)).tolist()
        draw = 0
        for h in rows:
            for w in columns:
                dx, dy = offsets[draw]
                draw += 1
                here, there = h * width + w, (h + dy) * width + (w + dx)
                order[here], order[there] = order[there], order[here]
    shuffled = x.reshape(height * width, -1)[order].reshape(x.shape)
    return _smooth(shuffled / 255, sigma)


def _plasma_fractal(size: int, decay: float, rng: np.random.Generator) -> Array:
    """Diamond-square height map on a ``size`` x ``size`` grid (a power of two), scaled to [0, 1]; the
    random perturbation shrinks by ``decay`` per level, so a small decay gives a rougher fog."""
    grid = np.zeros((size, size))
    step, wibble = size, 100.0
    while step >= 2:
        half = step // 2
        corners = grid[0:size:step, 0:size:step]
        square = corners + np.roll(corners, -1, axis=0)
        square = square + np.roll(square, -1, axis=1)
        grid[half:size:step, half:size:step] = square / 4 + wibble * rng.uniform(-wibble, wibble, square.shape)
        centres = grid[half:size:step, half:size:step]
        corners = grid[0:size:step, 0:size:step]
        across = centres + np.roll(centres, 1, axis=0) + corners + np.roll(corners, -1, axis=1)
        grid[0:size:step, half:size:step] = across / 4 + wibble * rng.uniform(-wibble, wibble, across.shape)
        down = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=0)
        grid[half:size:step, 0:size:step] = down / 4 + wibble * rng.uniform(-wibble, wibble, down.shape)
        step //= 2
        wibble /= decay
    grid -= grid.min()
    return grid / grid.max()


def _fractal_for(x: Array, decay: float, rng: np.random.Generator) -> Array:
    size = max(256, 1 << int(np.ceil(np.log2(max(x.shape[:2])))))
    return _plasma_fractal(size, decay, rng)[: x.shape[0], : x.shape[1]]


def _fog(x: Array, c: tuple[float, float], rng: np.random.Generator) -> Array:
    peak = x.max()
    foggy = x + c[0] * _fractal_for(x, c[1], rng)[..., None]
    return foggy * peak / (peak + c[0])


def _frost_texture(shape: tuple[int, int], rng: np.random.Generator) -> Array:
    """Synthetic stand-in for ImageNet-C's frost photographs, uint8-scaled ``[H, W, 3]`` in 0..255: a rough
    plasma haze plus sparse bright specks smeared into ice needles along four random directions."""
    haze = _plasma_fractal(max(256, 1 << int(np.ceil(np.log2(max(shape))))), 1.6, rng)[: shape[0], : shape[1]]
    specks = (rng.random(shape) > 0.985).astype(np.float64)
    needles = sum(_line_blur(specks, 6, 3, angle) for angle in rng.uniform(0, 360, size=4))
    needles = np.clip(needles / max(needles.max(), 1e-12) * 1.5, 0, 1)
    intensity = np.clip(0.35 + 0.35 * haze + 0.5 * needles, 0, 1)
    return intensity[..., None] * np.array([0.85, 0.92, 1.0]) * 255


def _frost(x: Array, c: tuple[float, float], rng: np.random.Generator) -> Array:
    return (c[0] * x * 255 + c[1] * _frost_texture(x.shape[:2], rng)) / 255


def _grey(x: Array) -> Array:
    return x @ np.array([0.299, 0.587, 0.114])


def _snow(x: Array, c: tuple, rng: np.random.Generator) -> Array:
    mean, spread, zoom_factor, threshold, radius, sigma, keep = c
    layer = rng.normal(size=x.shape[:2], loc=mean, scale=spread)
    layer = _clipped_zoom(layer[..., None], zoom_factor)[..., 0]
    layer[layer < threshold] = 0
    layer = np.round(_line_blur(_to_uint8(layer).astype(np.float64), radius, sigma, rng.uniform(-135, -45)))
    layer = (layer / 255)[..., None]
    x = keep * x + (1 - keep) * np.maximum(x, _grey(x)[..., None] * 1.5 + 0.5)
    return x + layer + np.rot90(layer, k=2)


def _edges(image: Array, low: float, high: float) -> Array:
    """Sobel (L1) gradient magnitude with hysteresis between ``low`` and ``high``: Canny without thinning."""
    from scipy.ndimage import label, sobel

    magnitude = np.abs(sobel(image, axis=0, mode="mirror")) + np.abs(sobel(image, axis=1, mode="mirror"))
    weak = magnitude >= low
    components, _ = label(weak, structure=np.ones((3, 3)))
    strong_components = np.unique(components[magnitude >= high])
    return np.isin(components, strong_components[strong_components > 0])


def _equalize(image: Array) -> Array:
    """Histogram equalisation of a uint8 image (OpenCV ``equalizeHist``)."""
    counts = np.bincount(image.ravel(), minlength=256)
    first = counts[np.nonzero(counts)[0][0]]
    if first == image.size:
        return image.copy()
    lookup = np.clip(np.round((np.cumsum(counts) - first) * 255.0 / (image.size - first)), 0, 255)
    return lookup.astype(np.uint8)[image]


def _spatter(x: Array, c: tuple, rng: np.random.Generator) -> Array:
    """Water drops (severities 1-3: pale turquoise, embossed at their edges) or mud (4-5: brown blots)."""
    from scipy.ndimage import convolve, distance_transform_edt, uniform_filter

    mean, spread, sigma, threshold, strength, mud = c
    liquid = _smooth(rng.normal(size=x.shape[:2], loc=mean, scale=spread), sigma, mode="nearest")
    liquid[liquid < threshold] = 0
    if not mud:
        liquid = np.uint8(np.clip(liquid, 0, 1) * 255)
        edges = _edges(liquid.astype(np.float64), 50, 150)
        distance = distance_transform_edt(~edges) if edges.any() else np.full(liquid.shape, 20.0)
        distance = uniform_filter(np.minimum(distance, 20), size=3, mode="mirror").astype(np.uint8)
        distance = _equalize(distance).astype(np.float64)
        emboss = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=np.float64)
        distance = np.clip(np.round(convolve(distance, emboss, mode="mirror")), 0, 255)
        distance = uniform_filter(distance, size=3, mode="mirror")
        drops = liquid * distance
        drops = drops / max(drops.max(), 1e-12) * strength
        return x + drops[..., None] * (np.array([175, 238, 238]) / 255)
    blots = _smooth((liquid > threshold).astype(np.float64), strength)
    blots[blots < 0.8] = 0
    blots = blots[..., None]
    return x * (1 - blots) + blots * (np.array([63, 42, 20]) / 255)


def _elastic_transform(x: Array, c: tuple[float, float, float], rng: np.random.Generator) -> Array:
    """A random affine map of three points moved by up to ``c[2]`` pixels, then a smooth displacement
    field (uniform noise blurred by ``c[1]``, scaled by ``c[0]``), both with linear interpolation."""
    from scipy.ndimage import map_coordinates

    amplitude, sigma, jitter = c
    height, width, channels = x.shape
    centre = np.array([height, width], dtype=np.float64) // 2
    size = min(height, width) // 3
    source = np.array([centre + size, [centre[0] + size, centre[1] - size], centre - size])
    target = source + rng.uniform(-jitter, jitter, size=source.shape)
    forward = np.linalg.solve(np.c_[source, np.ones(3)], target).T
    inverse = np.linalg.inv(np.vstack([forward, [0, 0, 1]]))[:2]
    rows, columns = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    source_columns = inverse[0, 0] * columns + inverse[0, 1] * rows + inverse[0, 2]
    source_rows = inverse[1, 0] * columns + inverse[1, 1] * rows + inverse[1, 2]
    x = np.stack(
        [map_coordinates(x[..., k], (source_rows, source_columns), order=1, mode="mirror") for k in range(channels)],
        axis=2,
    )
    shift_x = _smooth(rng.uniform(-1, 1, size=(height, width)), sigma, mode="reflect", truncate=3) * amplitude
    shift_y = _smooth(rng.uniform(-1, 1, size=(height, width)), sigma, mode="reflect", truncate=3) * amplitude
    return np.stack(
        [
            map_coordinates(x[..., k], (rows + shift_y, columns + shift_x), order=1, mode="reflect")
            for k in range(channels)
        ],
        axis=2,
    )


CorruptionFn = Callable[[Array, object, np.random.Generator], Array]

# name -> (function, parameters of severities 1..5), as in ImageNet-C's make_imagenet_c.py.
CORRUPTIONS: dict[str, tuple[CorruptionFn, tuple]] = {
    "gaussian_noise": (_gaussian_noise, (0.08, 0.12, 0.18, 0.26, 0.38)),
    "shot_noise": (_shot_noise, (60, 25, 12, 5, 3)),
    "impulse_noise": (_impulse_noise, (0.03, 0.06, 0.09, 0.17, 0.27)),
    "defocus_blur": (_defocus_blur, ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))),
    "glass_blur": (_glass_blur, ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2))),
    "motion_blur": (_motion_blur, ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))),
    # np.arange(start, stop, step) zoom factors
    "zoom_blur": (_zoom_blur, ((1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.02), (1, 1.26, 0.02), (1, 1.31, 0.03))),
    # mean, std, zoom, threshold, motion radius, motion sigma, share of the image kept
    "snow": (
        _snow,
        (
            (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
            (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
            (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
            (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
            (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
        ),
    ),
    "frost": (_frost, ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75))),
    "fog": (_fog, ((1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4))),
    "brightness": (_brightness, (0.1, 0.2, 0.3, 0.4, 0.5)),
    "contrast": (_contrast, (0.4, 0.3, 0.2, 0.1, 0.05)),
    # ImageNet-C writes 244 where 224 was meant; the constants are kept as published.
    "elastic_transform": (
        _elastic_transform,
        (
            (244 * 2, 244 * 0.7, 244 * 0.1),
            (244 * 2, 244 * 0.08, 244 * 0.2),
            (244 * 0.05, 244 * 0.01, 244 * 0.02),
            (244 * 0.07, 244 * 0.01, 244 * 0.02),
            (244 * 0.12, 244 * 0.01, 244 * 0.02),
        ),
    ),
    "pixelate": (_pixelate, (0.6, 0.5, 0.4, 0.3, 0.25)),
    "jpeg_compression": (_jpeg_compression, (25, 18, 15, 10, 7)),
    "speckle_noise": (_speckle_noise, (0.15, 0.2, 0.35, 0.45, 0.6)),
    "gaussian_blur": (_gaussian_blur, (1, 2, 3, 4, 6)),
    # mean, std, blur sigma, threshold, drop strength (water) or blot blur (mud), mud?
    "spatter": (
        _spatter,
        (
            (0.65, 0.3, 4, 0.69, 0.6, 0),
            (0.65, 0.3, 3, 0.68, 0.6, 0),
            (0.65, 0.3, 2, 0.68, 0.5, 0),
            (0.65, 0.3, 1, 0.65, 1.5, 1),
            (0.67, 0.4, 1, 0.65, 1.5, 1),
        ),
    ),
    "saturate": (_saturate, ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2))),
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
    parser.add_argument("--corruptions", default=",".join(CORRUPTIONS), help="comma-separated; default all 19")
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
