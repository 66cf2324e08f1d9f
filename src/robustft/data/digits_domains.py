"""digits-domains: the built-in multi-domain benchmark for the DomainBed protocol (data/domainbed.py).

DomainBed needs a dataset with several domains of the same classes, and leave-one-domain-out needs
each domain to be a real shift from the others. Nothing can be downloaded, so the four domains are
built from the digits-shift ingredients (sklearn's handwritten scans and matplotlib's fonts, see
data/digits_shift.py) along four different axes, each one a style the others lack:

- ``handwritten``: low-resolution scanner scans (blocky strokes), grey on black, upright.
- ``printed_a``: italic fonts the foundation model never saw, small and off-centre.
- ``printed_b``: upright bold / sans fonts it never saw, inverted (dark on light) and rotated 15-35 degrees.
- ``coloured``: smooth handwritten scans (other writers' digits than ``handwritten``) in complementary
  colours over a smooth colour texture.

The pretrained tiny ViT scores about 88 / 79 / 82 / 50 % zero-shot on them (not trivial on any), so
fine-tuning on three domains has something to learn and something to forget about the fourth.
Every image is a fixed function of ``GENERATION_SEED``: the data set is the same in every trial,
and only the protocol's 80/20 split changes with the trial, as in DomainBed.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from robustft.data.digits_shift import (
    CLASS_NAMES,
    IMAGE_SIZE,
    Style,
    _warp,
    compose,
    font_glyph_labels,
    font_glyphs,
    handwritten_digits,
)

__all__ = ["CLASS_NAMES", "DOMAINS", "build_domains"]

DOMAINS = ("handwritten", "printed_a", "printed_b", "coloured")
IMAGES_PER_DOMAIN = 700
GENERATION_SEED = 20_000

PRINTED_A_FONTS = ("STIXGeneralItalic", "STIXGeneralBolIta", "cmti10")
PRINTED_B_FONTS = ("cmb10", "cmss10")
PRINTED_A_STYLE = Style(max_rotation=10, scale=(0.6, 0.75), max_shift=4)
PRINTED_B_STYLE = Style(min_rotation=15, max_rotation=35, scale=(0.8, 1.0), max_shift=2, invert=1.0)
COLOURED_STYLE = Style(max_rotation=10, max_shift=2)
TEXTURE_CELLS = 3
"""The colour texture is random colours on a 3x3 grid, bilinearly upsampled: smooth, low-frequency."""


def textured(masks: Tensor, style: Style, generator: torch.Generator) -> Tensor:
    """Masks ``[N, 1, 32, 32]`` -> uint8 RGB images: a smooth random colour texture as background and
    its complementary colour (``1 - background``) as stroke, so the digit stays visible everywhere."""
    warped = _warp(masks, style, generator)
    cells = torch.rand(masks.shape[0], 3, TEXTURE_CELLS, TEXTURE_CELLS, generator=generator)
    background = F.interpolate(cells, size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    images = background + (1.0 - 2.0 * background) * warped
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def _printed(fonts: tuple[str, ...], style: Style, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``IMAGES_PER_DOMAIN`` renditions cycling through every font x size x digit glyph, each warped anew."""
    glyphs, labels = font_glyphs(fonts), font_glyph_labels(len(fonts))
    pick = torch.arange(IMAGES_PER_DOMAIN) % len(glyphs)
    return compose(glyphs[pick], style, generator), labels[pick]


@lru_cache(maxsize=1)
def build_domains() -> dict[str, tuple[Tensor, Tensor]]:
    """``{domain: (uint8 images [700, 3, 32, 32], labels [700])}`` for the four domains, in ``DOMAINS`` order.

    The two handwritten domains draw disjoint scans, so no digit drawing appears in two domains.
    Cached: the protocol builds every (held-out domain, trial) split from the same images. Callers
    must not modify the returned tensors.
    """
    generator = torch.Generator().manual_seed(GENERATION_SEED)
    blocky, labels, _ = handwritten_digits("nearest")
    smooth, _, _ = handwritten_digits("bicubic")
    order = torch.randperm(len(labels), generator=generator)
    hand_ids = order[:IMAGES_PER_DOMAIN]
    coloured_ids = order[IMAGES_PER_DOMAIN : 2 * IMAGES_PER_DOMAIN]
    return {
        "handwritten": (compose(blocky[hand_ids], Style(), generator), labels[hand_ids]),
        "printed_a": _printed(PRINTED_A_FONTS, PRINTED_A_STYLE, generator),
        "printed_b": _printed(PRINTED_B_FONTS, PRINTED_B_STYLE, generator),
        "coloured": (textured(smooth[coloured_ids], COLOURED_STYLE, generator), labels[coloured_ids]),
    }
