"""The tiny built-in "foundation model" of the digits-shift benchmark: a timm VisionTransformer."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from timm.models.vision_transformer import VisionTransformer

DIGITS_VIT_ARGS = dict(
    img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0,
    class_token=True, global_pool="token",
)  # fmt: skip
DIGITS_DATA_CONFIG = {
    "input_size": (3, 32, 32),
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "interpolation": "bilinear",
    "crop_pct": 1.0,
}
DIGITS_VIT_CHECKPOINT = "digits_vit.safetensors"


def digits_vit(num_classes: int = 10) -> VisionTransformer:
    """A plain timm ViT (32 px, patch 4, width 128, depth 6, CLS token), so every timm tool applies to it."""
    return VisionTransformer(num_classes=num_classes, **DIGITS_VIT_ARGS)


def packaged_checkpoint() -> Path:
    """Path of the committed pretrained checkpoint (produced by ``robustft pretrain-digits``)."""
    return Path(str(resources.files("robustft") / "assets" / DIGITS_VIT_CHECKPOINT))


GLYPH_CLIP = "glyph-clip"
GLYPH_CLIP_CHECKPOINT = "glyph-clip.safetensors"


def register_glyph_clip() -> str:
    """Register the tiny CLIP's model config with open_clip (idempotent) and return its name.

    open_clip builds models only from named configs, so the packaged ``assets/glyph-clip.json`` is added to
    its registry; then ``model: {source: open_clip, name: glyph-clip, checkpoint: ...}`` loads the tiny
    CLIP through exactly the code any OpenCLIP checkpoint takes.
    """
    from robustft.backbones.open_clip_backbone import register_open_clip_config

    return register_open_clip_config(Path(str(resources.files("robustft") / "assets" / f"{GLYPH_CLIP}.json")))


def glyph_clip_checkpoint() -> Path:
    """Path of the committed tiny CLIP (produced by ``robustft pretrain-clip``)."""
    return Path(str(resources.files("robustft") / "assets" / GLYPH_CLIP_CHECKPOINT))
