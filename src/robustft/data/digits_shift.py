"""digits-shift: the built-in benchmark, a miniature of the robust fine-tuning problem.

Nothing can be downloaded, so the benchmark is built from data that ships inside packages:
scikit-learn's handwritten digits (real 8x8 scans) and digits rendered from the TrueType fonts
bundled with matplotlib. A "foundation" model is pretrained on a broad mix (many fonts, colours,
inversions, noise, rotations, a little handwriting); the downstream task is narrow (blocky grey
handwritten scans), and the OOD splits move away from it along the axes the foundation model
saw but the downstream task does not: held-out fonts, corruptions, colour/background and geometry.
The ID domain is a low-resolution scanner (blocky strokes) the zero-shot model is weaker on, so
fine-tuning has something to gain, as ImageNet's label space gives CLIP something to learn.
Fine-tuning then improves ID accuracy and forgets the rest, as with CLIP on ImageNet.

Every image is a deterministic function of a seed: glyph masks are rendered once, and batches are
composed with batched tensor ops (affine warp, colouring, corruption), so generating the whole
benchmark takes seconds and pretraining can draw an endless seeded stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

IMAGE_SIZE = 32
CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

PRETRAIN_FONTS = (
    "DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSans-BoldOblique",
    "DejaVuSansMono", "DejaVuSansMono-Bold", "DejaVuSansMono-Oblique", "DejaVuSansMono-BoldOblique",
    "DejaVuSerif", "DejaVuSerif-Bold", "DejaVuSerif-Italic", "DejaVuSerif-BoldItalic",
    "cmr10", "cmtt10", "STIXGeneral", "STIXGeneralBol",
)  # fmt: skip
HELD_OUT_FONTS = ("STIXGeneralItalic", "STIXGeneralBolIta", "cmb10", "cmss10", "cmti10")
FONT_SIZES = (18, 21, 24, 27)

# Handwritten scans are split by index once: the foundation model sees only `pretrain`.
HANDWRITTEN_SPLIT_SEED = 1234
HANDWRITTEN_COUNTS = {"pretrain": 450, "train": 700, "id_val": 250}  # id_test: the remaining 397


def _font_path(name: str) -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / f"{name}.ttf"


@lru_cache(maxsize=4)
def font_glyphs(fonts: tuple[str, ...]) -> Tensor:
    """Anti-aliased digit masks ``[F * S * 10, 1, 32, 32]`` in [0, 1], centred, one per font x size x digit."""
    from PIL import Image, ImageDraw, ImageFont

    masks = []
    for font_name in fonts:
        for size in FONT_SIZES:
            font = ImageFont.truetype(str(_font_path(font_name)), size)
            for digit in range(10):
                canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
                ImageDraw.Draw(canvas).text(
                    (IMAGE_SIZE / 2, IMAGE_SIZE / 2), str(digit), fill=255, font=font, anchor="mm"
                )
                masks.append(np.asarray(canvas, dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(masks))[:, None]


def font_glyph_labels(num_fonts: int) -> Tensor:
    return torch.arange(10).repeat(num_fonts * len(FONT_SIZES))


@lru_cache(maxsize=2)
def handwritten_digits(resampling: str = "bicubic") -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """scikit-learn's 1,797 handwritten digits as 32 px masks, labels, and index sets per role.

    ``resampling`` is how the 8x8 scans are enlarged: ``bicubic`` gives smooth strokes (the
    pretraining data and the OOD renditions), ``nearest`` gives the blocky look of a low-resolution
    scanner (the narrow ID domain the zero-shot model is weaker on).
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    mode = {"bicubic": Image.Resampling.BICUBIC, "nearest": Image.Resampling.NEAREST}[resampling]
    digits = load_digits()
    masks = []
    for image in digits.images:
        small = Image.fromarray((image / 16.0 * 255).astype(np.uint8))
        big = np.asarray(small.resize((22, 22), mode), dtype=np.float32) / 255.0
        masks.append(np.pad(big, 5))
    masks_tensor = torch.from_numpy(np.stack(masks)).clamp(0, 1)[:, None]
    labels = torch.from_numpy(digits.target).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(HANDWRITTEN_SPLIT_SEED))
    roles, start = {}, 0
    for role, count in HANDWRITTEN_COUNTS.items():
        roles[role] = order[start : start + count]
        start += count
    roles["id_test"] = order[start:]
    return masks_tensor, labels, roles


@dataclass(frozen=True)
class Style:
    """How a batch of masks becomes images; each field is a probability or a range."""

    max_rotation: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)
    max_shift: float = 0.0
    color: float = 0.0
    invert: float = 0.0
    corrupt: float = 0.0
    min_rotation: float = 0.0


def _warp(masks: Tensor, style: Style, generator: torch.Generator) -> Tensor:
    n = masks.shape[0]
    magnitude = style.min_rotation + (style.max_rotation - style.min_rotation) * torch.rand(n, generator=generator)
    sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    angle = torch.deg2rad(magnitude * sign)
    low, high = style.scale
    scale = low + (high - low) * torch.rand(n, generator=generator)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * style.max_shift * 2 / IMAGE_SIZE
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(masks.shape), align_corners=False)
    return F.grid_sample(masks, grid, align_corners=False, padding_mode="zeros")


def _colours(n: int, style: Style, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Foreground and background colours ``[N, 3, 1, 1]``: white on black, coloured, or inverted."""
    fg = torch.ones(n, 3)
    bg = torch.zeros(n, 3)
    coloured = torch.rand(n, generator=generator) < style.color
    rand_fg = torch.rand(n, 3, generator=generator)
    rand_bg = torch.rand(n, 3, generator=generator)
    luminance_gap = (rand_fg.mean(1) - rand_bg.mean(1)).abs()
    too_close = luminance_gap < 0.35
    rand_bg[too_close] = 1.0 - rand_fg[too_close]
    fg[coloured], bg[coloured] = rand_fg[coloured], rand_bg[coloured]
    inverted = (torch.rand(n, generator=generator) < style.invert) & ~coloured
    fg[inverted], bg[inverted] = bg[inverted], fg[inverted]
    return fg[:, :, None, None], bg[:, :, None, None]


def corrupt(images: Tensor, kind: Tensor, severity: Tensor, generator: torch.Generator) -> Tensor:
    """Apply per-image corruption ``kind`` (0 none, 1 gaussian noise, 2 blur, 3 low contrast, 4 pixelate)."""
    out = images.clone()
    s = severity.float()[:, None, None, None]
    noise = torch.randn(images.shape, generator=generator) * (0.08 * s)
    out = torch.where((kind == 1)[:, None, None, None], images + noise, out)
    blurred = images
    for _ in range(3):
        blurred = F.avg_pool2d(F.pad(blurred, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    blur_mix = (0.2 * s).clamp(max=1.0)
    out = torch.where((kind == 2)[:, None, None, None], images * (1 - blur_mix) + blurred * blur_mix, out)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    contrast = 1.0 - 0.17 * s
    out = torch.where((kind == 3)[:, None, None, None], mean + (images - mean) * contrast, out)
    pixelated = F.interpolate(F.avg_pool2d(images, 4), scale_factor=4, mode="nearest")
    pix_mix = (0.2 * s).clamp(max=1.0)
    out = torch.where((kind == 4)[:, None, None, None], images * (1 - pix_mix) + pixelated * pix_mix, out)
    return out.clamp(0, 1)


def compose(masks: Tensor, style: Style, generator: torch.Generator) -> Tensor:
    """Masks ``[N, 1, 32, 32]`` -> uint8 RGB images ``[N, 3, 32, 32]`` under ``style``."""
    n = masks.shape[0]
    warped = _warp(masks, style, generator)
    fg, bg = _colours(n, style, generator)
    images = bg + (fg - bg) * warped
    corrupted = torch.rand(n, generator=generator) < style.corrupt
    kind = torch.randint(1, 5, (n,), generator=generator) * corrupted
    severity = torch.randint(1, 6, (n,), generator=generator)
    images = corrupt(images, kind, severity, generator)
    return (images * 255).round().to(torch.uint8)


PRETRAIN_STYLE = Style(max_rotation=30, scale=(0.75, 1.15), max_shift=3, color=0.45, invert=0.2, corrupt=0.35)
ID_STYLE = Style()
OOD_STYLES = {
    "ood_fonts": Style(max_rotation=8, scale=(0.9, 1.05), max_shift=2),
    "ood_corruption": Style(corrupt=1.0),
    "ood_color": Style(color=0.7, invert=1.0),
    "ood_rotation": Style(min_rotation=20, max_rotation=40, scale=(0.85, 1.0)),
}


def pretrain_batch(batch_size: int, generator: torch.Generator, handwritten_fraction: float = 0.3) -> tuple:
    """One batch of the foundation model's broad pretraining stream (printed + a little handwriting)."""
    glyphs = font_glyphs(PRETRAIN_FONTS)
    glyph_labels = font_glyph_labels(len(PRETRAIN_FONTS))
    hand_masks, hand_labels, roles = handwritten_digits()
    pool = roles["pretrain"]
    n_hand = int(round(batch_size * handwritten_fraction))
    hand_pick = pool[torch.randint(len(pool), (n_hand,), generator=generator)]
    font_pick = torch.randint(len(glyphs), (batch_size - n_hand,), generator=generator)
    masks = torch.cat([hand_masks[hand_pick], glyphs[font_pick]])
    labels = torch.cat([hand_labels[hand_pick], glyph_labels[font_pick]])
    return compose(masks, PRETRAIN_STYLE, generator), labels


def build_splits(seed: int = 0) -> dict[str, tuple[Tensor, Tensor]]:
    """The fine-tuning task: ``{split: (uint8 images [N,3,32,32], labels [N])}``.

    ID (train / id_val / id_test): handwritten scans from a low-resolution scanner (blocky, grey).
    OOD: the id_test digits as smooth renditions under corruption, colour/background and rotation,
    and printed digits in fonts the foundation model never saw. ``seed`` only changes the random
    styles of the renditions; which scans and fonts land in which split is fixed.
    """
    generator = torch.Generator().manual_seed(10_000 + seed)
    blocky, labels, roles = handwritten_digits("nearest")
    smooth, _, _ = handwritten_digits("bicubic")
    splits = {
        role: (compose(blocky[roles[role]], ID_STYLE, generator), labels[roles[role]])
        for role in ("train", "id_val", "id_test")
    }
    test_masks, test_labels = smooth[roles["id_test"]], labels[roles["id_test"]]
    held_out = font_glyphs(HELD_OUT_FONTS)
    held_out_labels = font_glyph_labels(len(HELD_OUT_FONTS))
    for name, style in OOD_STYLES.items():
        masks, split_labels = (held_out, held_out_labels) if name == "ood_fonts" else (test_masks, test_labels)
        repeats = max(1, round(400 / len(split_labels)))
        masks, split_labels = masks.repeat(repeats, 1, 1, 1), split_labels.repeat(repeats)
        splits[name] = (compose(masks, style, generator), split_labels)
    return splits
