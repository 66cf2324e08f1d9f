"""Image preprocessing built from a backbone's timm ``data_config``.

Every model is scored with the preprocessing it was pretrained with (resize, centre crop, its own
mean/std), so transforms are derived from the classifier's ``data_config`` rather than configured
separately: a mismatch there silently costs accuracy, most of all out of distribution.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PIL import Image
from timm.data import create_transform
from torch import Tensor
from torchvision import transforms

# The data_config keys that describe preprocessing; timm's configs carry others (e.g. num_classes).
_TRANSFORM_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def _to_rgb(image: Image.Image) -> Image.Image:
    # A module-level function (not a lambda) so the transform pickles into DataLoader workers.
    return image if image.mode == "RGB" else image.convert("RGB")


def build_transform(data_config: dict[str, Any], train: bool, augment: bool = False) -> Callable[[Image.Image], Tensor]:
    """The PIL image -> normalised tensor transform for one split.

    Without ``augment`` the training transform is the eval transform (resize, centre crop,
    normalise): robust fine-tuning methods such as FLYP and LP-FT are usually run without
    augmentation, and sharing the transform keeps train and test features comparable.
    With ``train and augment`` it is timm's training pipeline (random resized crop, flip,
    colour jitter). Images are converted to RGB first so grey, palette and RGBA files all work.
    """
    config = {key: data_config[key] for key in _TRANSFORM_KEYS if data_config.get(key) is not None}
    pipeline = create_transform(**config, is_training=train and augment)
    return transforms.Compose([_to_rgb, pipeline])
