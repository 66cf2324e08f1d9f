"""Prompt templates for CLIP zero-shot heads (docs/methods.md, `zeroshot`).

A class's text embedding is averaged over several phrasings ("a photo of a {}.", "a sketch of a {}.")
because a single prompt is noisy: ensembling the 80 ImageNet templates of the CLIP paper (Radford et
al., 2021) adds 3.5 points of zero-shot ImageNet accuracy over the single default prompt, and robust
fine-tuning work (WiSE-FT, FLYP) starts from that ensemble, so it is the usual choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

from robustft.errors import ConfigError

# The 80 templates of the CLIP paper and the 7 of its "simple" ImageNet ensemble, from open_clip itself (lambdas
# there; called with "{}" they are the format strings a templates file holds).
IMAGENET_TEMPLATES: tuple[str, ...] = tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES)
IMAGENET_SIMPLE_TEMPLATES: tuple[str, ...] = tuple(template("{}") for template in SIMPLE_IMAGENET_TEMPLATES)
SIMPLE_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)

_NAMED = {"imagenet": IMAGENET_TEMPLATES, "imagenet_simple": IMAGENET_SIMPLE_TEMPLATES, "simple": SIMPLE_TEMPLATES}


def load_templates(spec: str | Path | Sequence[str]) -> list[str]:
    """Resolve a templates setting: ``"imagenet"``, ``"imagenet_simple"``, ``"simple"``, a text file, or a list.

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
            f"model.templates: {str(spec)!r} is neither 'imagenet', 'simple', 'imagenet_simple' nor an existing "
            "template file"
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
