"""timm backbones built by name, with weights from a local file only.

``pretrained=False`` always: nothing is downloaded, the weights come from ``checkpoint`` (a timm
``model.safetensors`` / ``pytorch_model.bin`` or a robustft run). The classifier is split off so
that every backbone has the same shape (images -> embedding ``[B, D]``) and the pretrained
classifier can serve as the zero-shot head (docs/methods.md, `zeroshot`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
from timm.data import resolve_data_config
from timm.models import get_pretrained_cfg
from torch import Tensor, nn

from robustft.backbones.checkpoint_files import load_state_dict_file, load_state_dict_strict
from robustft.backbones.classifier import linear_head
from robustft.errors import ConfigError


def load_timm_backbone(
    name: str, checkpoint: str | Path | None, model_kwargs: dict[str, Any] | None = None
) -> tuple[nn.Module, nn.Linear | None, dict[str, Any]]:
    """Build timm model ``name`` (random init), load ``checkpoint`` strictly, split off its classifier.

    When ``model_kwargs`` does not set ``num_classes``, it is read from the checkpoint's classifier
    weight, so an ImageNet-1k checkpoint loads as-is and a headless one (saved after
    ``reset_classifier(0)``) gives ``num_classes=0``.

    Args:
        name: a timm model name, optionally with a pretrained tag (``vit_base_patch16_224.augreg_in1k``);
            the tag only selects the preprocessing config, no weights are fetched.
        checkpoint: local weights file, or None for random weights (tests, training from scratch).
        model_kwargs: extra ``timm.create_model`` arguments (``img_size``, ``drop_path_rate``, ...).

    Returns:
        ``(backbone, pretrained_head, data_config)``: ``backbone(x)`` is the pre-logits embedding
        ``[B, D]``; ``pretrained_head`` a copy of the original classifier (None when there was none
        or it is not an ``nn.Linear``); ``data_config`` timm's preprocessing dict (``input_size``,
        ``mean``, ``std``, ``interpolation``, ``crop_pct``, ``crop_mode``).

    Raises:
        ConfigError: unknown model name or arguments timm rejects.
        CheckpointError: the checkpoint is missing, unsafe, corrupt or does not match the model.
    """
    if not timm.is_model(name):
        raise ConfigError(f"model.name: unknown timm model '{name}'; see timm.list_models()")
    kwargs = dict(model_kwargs or {})
    state = load_state_dict_file(checkpoint) if checkpoint is not None else None
    if state is not None and "num_classes" not in kwargs:
        num_classes = _checkpoint_num_classes(name, state)
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
    model = _create(name, kwargs)
    if state is not None:
        load_state_dict_strict(model, state, checkpoint, f"timm model '{name}'")
    data_config = _data_config(model, kwargs)
    head = _pretrained_head(model)
    model.reset_classifier(0)
    return model, head, data_config


def _create(name: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except (RuntimeError, TypeError, ValueError, AssertionError) as error:
        # A bad pretrained tag, or unknown/inconsistent kwargs (embed_dim not divisible by num_heads).
        key = "model.name" if "pretrained tag" in str(error) else "model.model_kwargs"
        raise ConfigError(f"{key}: timm cannot build '{name}' with {kwargs}: {error}") from error


def _checkpoint_num_classes(name: str, state: dict[str, Tensor]) -> int | None:
    """Rows of the checkpoint's classifier weight; 0 if it has none; None if timm names no classifier."""
    pretrained_cfg = get_pretrained_cfg(name)
    classifier = getattr(pretrained_cfg, "classifier", None)
    if not classifier:
        return None
    if isinstance(classifier, tuple | list):  # distilled models: (head, head_dist)
        classifier = classifier[0]
    weight = state.get(f"{classifier}.weight")
    return 0 if weight is None else int(weight.shape[0])


def _pretrained_head(model: nn.Module) -> nn.Linear | None:
    if getattr(model, "num_classes", 0) == 0:
        return None
    classifier = model.get_classifier()
    if not isinstance(classifier, nn.Linear):
        return None
    bias = classifier.bias.detach() if classifier.bias is not None else None
    return linear_head(classifier.weight.detach(), bias)


def _data_config(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """timm's resolved config, corrected to the size the model was actually built for.

    ``resolve_data_config`` reads the *pretrained* config, which still says 224 px when the model
    was built with ``img_size=32``; a patch-embedding model can only take its own size.
    """
    config = dict(resolve_data_config({}, model=model))
    channels = int(kwargs.get("in_chans", config["input_size"][0]))
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None) or kwargs.get("img_size")
    if img_size is not None:
        height, width = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        config["input_size"] = (channels, int(height), int(width))
    else:
        config["input_size"] = (channels, *config["input_size"][1:])
    return config
