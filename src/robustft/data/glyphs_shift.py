"""glyphs-shift: the built-in CLIP benchmark, digits and letters with captions, and its distribution shifts.

The methods of docs/methods.md fine-tune CLIP, so the built-in benchmark needs what CLIP needs: captioned images to
pretrain a text tower contrastively, class names a zero-shot head is built from, and classes that
fine-tuning never sees (base-to-new). Nothing can be downloaded, so the images are rendered from the
TrueType fonts bundled with matplotlib (and scikit-learn's handwritten digit scans), with the fonts,
styles and corruptions of digits-shift (``robustft.data.digits_shift``), over 20 classes: the ten digits
and ten capital letters whose shapes no digit shares.

- Pretraining (``pretrain_batch``): glyphs of 16 fonts and handwritten digits under broad styles (colour,
  inversion, rotation, corruption), each with a caption naming its class, font kind and style
  ("a blurry photo of the letter k in a bold serif font, red on blue").
- The fine-tuning task (ID: train / id_val / id_test): the same fonts through a low-resolution scanner
  (blocky 8 x 8 strokes, grey on black, upright), a look the pretraining stream never shows whole.
- OOD: smooth renditions of the same fonts under corruption, colour and rotation, and fonts the
  foundation model never saw. Fine-tuning on the grey scans gains ID accuracy and forgets these, as
  CLIP does when fine-tuned on ImageNet.

Splits are large (id_val 2,000, the others 3,000-4,000 images) because glyph rendering is cheap and a
ranking of methods needs a 1-point difference to lie outside the sampling noise. Every image is a
fixed function of the split and the seed; the masks are rendered once and composed with batched ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from robustft.config import GLYPHS_SHIFT_SPLITS
from robustft.data.digits_shift import (
    FONT_SIZES,
    HELD_OUT_FONTS,
    IMAGE_SIZE,
    PRETRAIN_FONTS,
    _font_path,
    corrupt,
    handwritten_digits,
)

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
LETTERS = "ACEFHKMPRW"  # capitals no digit resembles (no O, I, S, Z, B, G, Q)
CHARACTERS = "0123456789" + LETTERS
CLASS_NAMES = [f"digit {name}" for name in DIGITS] + [f"letter {letter.lower()}" for letter in LETTERS]
# Base-to-new halves (CoOp's protocol): each mixes digits and letters, so the new classes are not a new kind of symbol.
BASE_CLASSES = tuple(range(0, 5)) + tuple(range(10, 15))
NEW_CLASSES = tuple(range(5, 10)) + tuple(range(15, 20))

# Prompt templates of the zero-shot head: phrasings the pretraining captions use.
TEMPLATES = (
    "a photo of the {}.",
    "a rendering of the {}.",
    "a drawing of the {}.",
    "the {}.",
    "a low resolution photo of the {}.",
    "a black and white photo of the {}.",
)

SPLIT_SIZES = {"train": 4000, "id_val": 2000, "id_test": 4000}
OOD_SIZE = 3000
SPLIT_NAMES = GLYPHS_SHIFT_SPLITS
GENERATION_SEED = 30_000

# Font kinds for captions, by the font file's family and face.
_FONT_WORDS = {
    "DejaVuSans": "sans", "DejaVuSansMono": "monospace", "DejaVuSerif": "serif", "cmr10": "serif",
    "cmtt10": "monospace", "STIXGeneral": "serif", "STIXGeneralBol": "bold serif", "cmb10": "bold serif",
    "cmss10": "sans", "cmti10": "italic serif", "STIXGeneralItalic": "italic serif",
    "STIXGeneralBolIta": "bold italic serif",
}  # fmt: skip
_PALETTE = {
    "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "red": (0.9, 0.1, 0.1), "green": (0.1, 0.7, 0.2),
    "blue": (0.15, 0.25, 0.95), "yellow": (0.95, 0.9, 0.1), "purple": (0.55, 0.15, 0.75), "orange": (1.0, 0.55, 0.05),
    "cyan": (0.1, 0.85, 0.9), "pink": (1.0, 0.6, 0.8),
}  # fmt: skip
_CORRUPTION_WORDS = ("", "noisy", "blurry", "faded", "pixelated")


def _font_word(font: str) -> str:
    family, _, face = font.partition("-")
    word = _FONT_WORDS.get(family, _FONT_WORDS.get(font, "serif"))
    face = face.lower().replace("oblique", "italic")
    extra = " ".join(part for part in ("bold", "italic") if part in face and part not in word)
    return f"{extra} {word}".strip()


@lru_cache(maxsize=4)
def glyph_masks(fonts: tuple[str, ...]) -> tuple[Tensor, Tensor, tuple[str, ...]]:
    """Anti-aliased masks ``[F * S * 20, 1, 32, 32]`` in [0, 1], their labels, and each mask's font kind."""
    from PIL import Image, ImageDraw, ImageFont

    masks, labels, kinds = [], [], []
    for font_name in fonts:
        for size in FONT_SIZES:
            font = ImageFont.truetype(str(_font_path(font_name)), size)
            for label, character in enumerate(CHARACTERS):
                canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
                ImageDraw.Draw(canvas).text(
                    (IMAGE_SIZE / 2, IMAGE_SIZE / 2), character, fill=255, font=font, anchor="mm"
                )
                masks.append(np.asarray(canvas, dtype=np.float32) / 255.0)
                labels.append(label)
                kinds.append(_font_word(font_name))
    return torch.from_numpy(np.stack(masks))[:, None], torch.tensor(labels), tuple(kinds)


@dataclass(frozen=True)
class Look:
    """How masks become images; probabilities and ranges, drawn per image."""

    min_rotation: float = 0.0
    max_rotation: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)
    max_shift: float = 0.0
    colour: float = 0.0
    invert: float = 0.0
    corrupt: float = 0.0
    blocky: bool = False
    grey: tuple[float, float] = (1.0, 1.0)


PRETRAIN_LOOK = Look(max_rotation=30, scale=(0.75, 1.15), max_shift=3, colour=0.45, invert=0.2, corrupt=0.35)
ID_LOOK = Look(max_rotation=6, scale=(0.85, 1.05), max_shift=2, blocky=True, grey=(0.55, 0.9))
OOD_LOOKS = {
    "ood_fonts": Look(max_rotation=8, scale=(0.9, 1.05), max_shift=2),
    "ood_corruption": Look(max_rotation=6, max_shift=2, corrupt=1.0),
    "ood_color": Look(max_rotation=6, max_shift=2, colour=0.7, invert=1.0),
    "ood_rotation": Look(min_rotation=20, max_rotation=40, scale=(0.85, 1.0), max_shift=2),
}


@dataclass
class Rendered:
    """uint8 images ``[N, 3, 32, 32]`` and the per-image attributes captions are written from."""

    images: Tensor
    rotated: Tensor
    colours: tuple[Tensor, Tensor]  # palette index of foreground, background; -1 where white on black
    corruption: Tensor


_COLOUR_NAMES = tuple(_PALETTE)
_COLOUR_VALUES = torch.tensor(list(_PALETTE.values()))
_LUMINANCE = _COLOUR_VALUES.mean(1)
_PAIRS = torch.tensor(
    [(f, b) for f in range(len(_PALETTE)) for b in range(len(_PALETTE)) if abs(_LUMINANCE[f] - _LUMINANCE[b]) > 0.3]
)


def render(masks: Tensor, look: Look, generator: torch.Generator) -> Rendered:
    """Masks ``[N, 1, 32, 32]`` -> images under ``look``: affine warp, colours, corruption, all batched."""
    n = masks.shape[0]
    magnitude = look.min_rotation + (look.max_rotation - look.min_rotation) * torch.rand(n, generator=generator)
    angle = torch.deg2rad(magnitude * torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0))
    low, high = look.scale
    scale = low + (high - low) * torch.rand(n, generator=generator)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * look.max_shift * 2 / IMAGE_SIZE
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(masks.shape), align_corners=False)
    warped = F.grid_sample(masks, grid, align_corners=False, padding_mode="zeros")
    if look.blocky:
        warped = F.interpolate(F.avg_pool2d(warped, 4), scale_factor=4, mode="nearest")
    pair = _PAIRS[torch.randint(len(_PAIRS), (n,), generator=generator)]
    coloured = torch.rand(n, generator=generator) < look.colour
    inverted = (torch.rand(n, generator=generator) < look.invert) & ~coloured
    white, black = _COLOUR_NAMES.index("white"), _COLOUR_NAMES.index("black")
    foreground = torch.where(coloured, pair[:, 0], torch.where(inverted, black, white))
    background = torch.where(coloured, pair[:, 1], torch.where(inverted, white, black))
    low, high = look.grey
    intensity = (low + (high - low) * torch.rand(n, generator=generator))[:, None, None, None]
    fg = _COLOUR_VALUES[foreground][:, :, None, None]
    bg = _COLOUR_VALUES[background][:, :, None, None]
    images = bg + (fg - bg) * warped * intensity
    corrupted = torch.rand(n, generator=generator) < look.corrupt
    kind = torch.randint(1, 5, (n,), generator=generator) * corrupted
    severity = torch.randint(1, 6, (n,), generator=generator)
    images = corrupt(images, kind, severity, generator)
    plain = ~coloured & ~inverted
    return Rendered(
        images=(images * 255).round().to(torch.uint8),
        rotated=magnitude > 15,
        colours=(torch.where(plain, -1, foreground), torch.where(plain, -1, background)),
        corruption=kind,
    )


_PREFIXES = ("a photo of the", "a rendering of the", "a drawing of the", "the", "a picture of the")
_CORRUPTION_PREFIXES = ("", "a noisy photo of the", "a blurry photo of the", "a faded photo of the",
                        "a pixelated photo of the")  # fmt: skip


def captions(labels: Tensor, font_kinds: list[str], rendered: Rendered, generator: torch.Generator) -> list[str]:
    """One caption per image: class name, font kind (or "handwritten"), colours, rotation and corruption words."""
    prefix_pick = torch.randint(len(_PREFIXES), (len(labels),), generator=generator).tolist()
    detail_pick = torch.rand(len(labels), 3, generator=generator).tolist()
    foreground, background = (c.tolist() for c in rendered.colours)
    texts = []
    for i, label in enumerate(labels.tolist()):
        kind = rendered.corruption[i].item()
        name = CLASS_NAMES[label]
        prefix = _CORRUPTION_PREFIXES[kind] if kind else _PREFIXES[prefix_pick[i]]
        if font_kinds[i] == "handwritten":
            text = f"{prefix} handwritten {name}"
        elif detail_pick[i][0] < 0.7:
            text = f"{prefix} {name} in a {font_kinds[i]} font"
        else:
            text = f"{prefix} {name}"
        if foreground[i] >= 0 and detail_pick[i][1] < 0.8:
            text += f", {_COLOUR_NAMES[foreground[i]]} on {_COLOUR_NAMES[background[i]]}"
        if rendered.rotated[i] and detail_pick[i][2] < 0.8:
            text += ", rotated"
        texts.append(text)
    return texts


def pretrain_batch(
    batch_size: int, generator: torch.Generator, handwritten_fraction: float = 0.15
) -> tuple[Tensor, Tensor, list[str]]:
    """One batch of the foundation model's captioned stream: (uint8 images, labels, captions)."""
    glyphs, glyph_labels, kinds = glyph_masks(PRETRAIN_FONTS)
    hand_masks, hand_labels, roles = handwritten_digits()
    pool = roles["pretrain"]
    n_hand = int(round(batch_size * handwritten_fraction))
    hand_pick = pool[torch.randint(len(pool), (n_hand,), generator=generator)]
    font_pick = torch.randint(len(glyphs), (batch_size - n_hand,), generator=generator)
    masks = torch.cat([hand_masks[hand_pick], glyphs[font_pick]])
    labels = torch.cat([hand_labels[hand_pick], glyph_labels[font_pick]])
    font_kinds = ["handwritten"] * n_hand + [kinds[i] for i in font_pick.tolist()]
    rendered = render(masks, PRETRAIN_LOOK, generator)
    return rendered.images, labels, captions(labels, font_kinds, rendered, generator)


def _draw(fonts: tuple[str, ...], count: int, look: Look, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``count`` renditions, each class equally often, each glyph drawn at random from ``fonts`` x sizes."""
    glyphs, labels, _ = glyph_masks(fonts)
    per_class = len(glyphs) // len(CHARACTERS)
    wanted = torch.arange(count) % len(CHARACTERS)
    pick = torch.randint(per_class, (count,), generator=generator) * len(CHARACTERS) + wanted
    return render(glyphs[pick], look, generator).images, labels[pick]


def build_splits(seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """The fine-tuning task: ``{split: (uint8 images [N, 3, 32, 32], labels [N])}``.

    ID splits are blocky grey scans of the pretraining fonts; OOD splits the same fonts smooth under
    corruption / colour / rotation, and held-out fonts. ``seed`` changes the renditions, not the recipe.
    ``sizes`` overrides the number of images per split (tests use small ones).
    """
    sizes = {**SPLIT_SIZES, **{name: OOD_SIZE for name in OOD_LOOKS}, **(sizes or {})}
    return dict(_build_splits(seed, tuple(sizes[name] for name in SPLIT_NAMES)))


@lru_cache(maxsize=2)
def _build_splits(seed: int, counts: tuple[int, ...]) -> dict[str, tuple[Tensor, Tensor]]:
    """Cached: every run of a comparison reads the same splits. Callers must not modify the tensors."""
    sizes = dict(zip(SPLIT_NAMES, counts, strict=True))
    generator = torch.Generator().manual_seed(GENERATION_SEED + seed)
    splits = {role: _draw(PRETRAIN_FONTS, sizes[role], ID_LOOK, generator) for role in SPLIT_SIZES}
    for name, look in OOD_LOOKS.items():
        fonts = HELD_OUT_FONTS if name == "ood_fonts" else PRETRAIN_FONTS
        splits[name] = _draw(fonts, sizes[name], look, generator)
    return splits


def class_order(base_classes: list[str] | None) -> tuple[list[int], int]:
    """Model class order for base-to-new: the base classes first (training masks the rest), then the new ones.

    Returns the benchmark's class indices in model order and the number of base classes. ``base_classes``
    names the base classes (default ``BASE_CLASSES``, half the digits and half the letters).

    Raises:
        DataError: a name that is not a class of the benchmark, a repeated name, or no new class left.
    """
    from robustft.errors import DataError

    if base_classes is None:
        base = list(BASE_CLASSES)
    else:
        unknown = [name for name in base_classes if name not in CLASS_NAMES]
        if unknown:
            raise DataError(
                f"data.base_classes: {unknown[0]!r} is not a class of benchmark glyphs_shift "
                f"(classes: {', '.join(CLASS_NAMES)})"
            )
        if len(set(base_classes)) != len(base_classes) or not base_classes:
            raise DataError(f"data.base_classes: needs distinct class names, got {base_classes}")
        base = [CLASS_NAMES.index(name) for name in base_classes]
    new = [index for index in range(len(CLASS_NAMES)) if index not in base]
    if not new:
        raise DataError("data.base_classes: every class is a base class; base-to-new needs at least one new class")
    return base + new, len(base)


def benchmark_class_names(base_to_new: bool = False, base_classes: list[str] | None = None) -> list[str]:
    """The class names in model order (base classes first under base-to-new)."""
    if not base_to_new:
        return list(CLASS_NAMES)
    order, _ = class_order(base_classes)
    return [CLASS_NAMES[index] for index in order]


def base_to_new_splits(
    raw: dict[str, tuple[Tensor, Tensor]], base_classes: list[str] | None = None
) -> tuple[dict[str, tuple[Tensor, Tensor]], int, int]:
    """CoOp's base-to-new splits from ``build_splits``' output, labels in model order (base first).

    train / id_val / id_test keep the base classes' images; ``ood_new`` is id_test's new-class images with
    labels counted from the first new class, so it is scored over the new logits only. The domain-shift
    splits are dropped, as CoOp's protocol has none. Returns (splits, number of base classes, of classes).
    """
    order, num_base = class_order(base_classes)
    to_model = torch.empty(len(CLASS_NAMES), dtype=torch.long)
    to_model[torch.tensor(order)] = torch.arange(len(order))
    splits = {}
    for role in ("train", "id_val", "id_test"):
        images, labels = raw[role]
        model_labels = to_model[labels]
        keep = model_labels < num_base
        splits[role] = (images[keep], model_labels[keep])
    images, labels = raw["id_test"]
    model_labels = to_model[labels]
    new = model_labels >= num_base
    splits["ood_new"] = (images[new], model_labels[new] - num_base)
    return splits, num_base, len(order)
