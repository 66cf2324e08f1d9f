"""From a ``model:`` config section to an ``ImageClassifier`` with its zero-shot head."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from robustft.backbones.classifier import ImageClassifier
from robustft.backbones.zero_shot import classifier_head, prototype_head
from robustft.config import ModelConfig
from robustft.errors import ConfigError, DataError

EmbedSplit = Callable[[nn.Module], tuple[Tensor, Tensor]]


@dataclass
class LoadedBackbone:
    """A backbone and what zero-shot heads can be built from: its classifier or its text tower."""

    backbone: nn.Module
    data_config: dict[str, Any]
    pretrained_head: nn.Linear | None = None
    clip: Any = None  # OpenClipParts when the model has a text tower


def load_backbone(config: ModelConfig) -> LoadedBackbone:
    """Load the image backbone named by ``config`` from local files only."""
    if config.source == "builtin":
        return _load_builtin(config)
    if config.source == "timm":
        from robustft.backbones.timm_backbone import load_timm_backbone

        backbone, head, data_config = load_timm_backbone(config.name, config.checkpoint, config.model_kwargs)
        return LoadedBackbone(backbone, data_config, pretrained_head=head)
    from robustft.backbones.open_clip_backbone import load_open_clip

    parts = load_open_clip(config.name, config.checkpoint, config.model_kwargs)
    return LoadedBackbone(parts.image_encoder, parts.data_config, clip=parts)


def _load_builtin(config: ModelConfig) -> LoadedBackbone:
    from robustft.backbones.builtin import DIGITS_DATA_CONFIG, digits_vit, packaged_checkpoint
    from robustft.backbones.checkpoint_files import load_state_dict_file, load_state_dict_strict

    if config.name != "digits_vit":
        raise ConfigError(f"model.name: unknown builtin model '{config.name}' (known: digits_vit)")
    path = config.checkpoint or packaged_checkpoint()
    model = digits_vit()
    load_state_dict_strict(model, load_state_dict_file(path), path, "digits_vit")
    head = model.get_classifier()
    model.reset_classifier(0)
    return LoadedBackbone(model, dict(DIGITS_DATA_CONFIG), pretrained_head=head)


def head_kind(config: ModelConfig, loaded: LoadedBackbone, num_classes: int) -> str:
    """Resolve ``zero_shot_head: auto``: text tower, else a matching pretrained classifier, else prototypes."""
    kind = config.zero_shot_head
    if kind == "auto":
        if loaded.clip is not None:
            return "text"
        head = loaded.pretrained_head
        return "classifier" if head is not None and head.out_features == num_classes else "prototypes"
    if kind == "text" and loaded.clip is None:
        raise ConfigError(f"model.zero_shot_head: 'text' needs a text tower; {config.name} has none")
    if kind == "classifier":
        head = loaded.pretrained_head
        if head is None or head.out_features != num_classes:
            found = "none" if head is None else f"{head.out_features} classes"
            raise ConfigError(
                f"model.zero_shot_head: 'classifier' needs a pretrained head with {num_classes} classes "
                f"(found {found}); use 'prototypes'"
            )
    return kind


def build_classifier(
    config: ModelConfig, loaded: LoadedBackbone, class_names: list[str], embed_train: EmbedSplit | None = None
) -> ImageClassifier:
    """Backbone + zero-shot head (docs/methods.md, `zeroshot`).

    ``embed_train`` maps the backbone to (embeddings, labels) of the training split; it is only
    called for a prototype head.
    """
    kind = head_kind(config, loaded, len(class_names))
    if kind == "text":
        from robustft.backbones.open_clip_backbone import text_zero_shot_head
        from robustft.backbones.templates import load_templates

        head = text_zero_shot_head(loaded.clip, class_names, load_templates(config.templates))
        return ImageClassifier(loaded.backbone, head, normalize_features=True, data_config=loaded.data_config)
    if kind == "classifier":
        head = classifier_head(loaded.pretrained_head)
        return ImageClassifier(loaded.backbone, head, normalize_features=False, data_config=loaded.data_config)
    if embed_train is None:
        raise ConfigError("model.zero_shot_head: 'prototypes' needs the training split")
    with torch.no_grad():
        embeddings, labels = embed_train(loaded.backbone)
    counts = torch.bincount(labels.long(), minlength=len(class_names))[: len(class_names)]
    empty = [class_names[i] for i in (counts == 0).nonzero().flatten().tolist()]
    if empty:
        raise DataError(
            f"the train split has no example of class {empty[0]!r} ({len(empty)} of {len(class_names)} classes have "
            f"none: {', '.join(empty[:5])}); a class-prototype head needs one per class: check data.class_names "
            "and the train split's folders / CSV"
        )
    head = prototype_head(embeddings, labels, len(class_names), config.prototype_scale)
    return ImageClassifier(loaded.backbone, head, normalize_features=True, data_config=loaded.data_config)
