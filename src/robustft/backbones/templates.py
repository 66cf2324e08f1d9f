"""Prompt templates for CLIP zero-shot heads (docs/methods.md, `zeroshot`).

A class's text embedding is averaged over several phrasings ("a photo of a {}.", "a sketch of a {}.")
because a single prompt is noisy: ensembling the 80 ImageNet templates of the CLIP paper (Radford et
al., 2021) adds 3.5 points of zero-shot ImageNet accuracy over the single default prompt, and robust
fine-tuning work (WiSE-FT, FLYP) starts from that ensemble, so it is the usual choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from robustft.errors import ConfigError

# The 80 templates of the CLIP paper, as in open_clip's OPENAI_IMAGENET_TEMPLATES (same order).
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

SIMPLE_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)

_NAMED = {"imagenet": IMAGENET_TEMPLATES, "simple": SIMPLE_TEMPLATES}


def load_templates(spec: str | Path | Sequence[str]) -> list[str]:
    """Resolve a templates setting: ``"imagenet"``, ``"simple"``, a text file, or a list of strings.

    A file holds one template per line; blank lines are ignored. Every template must contain
    exactly one ``{}`` (the class name goes there); a template without it would give every class
    the same text embedding, so it is rejected rather than silently kept.

    Raises:
        ConfigError: unknown name or missing file, no templates, or a template without a single ``{}``.
    """
    templates = _named_or_file(spec) if isinstance(spec, str | Path) else list(spec)
    if not templates:
        raise ConfigError(f"model.templates: no templates in {spec!r}")
    for template in templates:
        _check_template(template)
    return templates


def _named_or_file(spec: str | Path) -> list[str]:
    if isinstance(spec, str) and spec in _NAMED:
        return list(_NAMED[spec])
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(
            f"model.templates: {str(spec)!r} is neither 'imagenet', 'simple' nor an existing template file"
        )
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


def _check_template(template: object) -> None:
    if not isinstance(template, str) or "{}" not in template:
        raise ConfigError(f"model.templates: {template!r} has no '{{}}' where the class name goes")
    try:
        template.format("x")
    except (IndexError, KeyError, ValueError) as error:
        raise ConfigError(
            f"model.templates: {template!r} must contain exactly one '{{}}' and no other braces ({error})"
        ) from error
