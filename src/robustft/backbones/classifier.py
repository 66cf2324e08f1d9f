"""The model every method trains and every evaluator scores: an image backbone plus a linear head."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class ImageClassifier(nn.Module):
    """Backbone (images -> embeddings) followed by an ``nn.Linear`` head.

    The head is a plain linear layer, so weight-space methods (WiSE-FT, soups) interpolate it like
    any other weight (docs/methods.md, `zeroshot`). CLIP-style models classify *normalised*
    embeddings (``logit_scale * <x/|x|, t/|t|>``), so ``normalize_features`` L2-normalises the
    embedding before the head, as wise-ft's ``ImageClassifier`` does; the logit scale lives in the
    head's weights.

    Args:
        backbone: module mapping a batch of images ``[B, 3, H, W]`` to embeddings ``[B, D]``.
        head: linear layer ``D -> num_classes``.
        normalize_features: L2-normalise embeddings before the head.
        data_config: the backbone's preprocessing (timm keys: ``input_size``, ``mean``, ``std``,
            ``interpolation``, ``crop_pct``); the data pipeline builds transforms from it.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Linear,
        normalize_features: bool = False,
        data_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.normalize_features = normalize_features
        self.data_config = dict(data_config or {})

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    @property
    def embed_dim(self) -> int:
        return self.head.in_features

    def image_embedding(self, images: Tensor) -> Tensor:
        """Unnormalised backbone embedding (what feature distillation compares)."""
        return self.backbone(images)

    def features(self, images: Tensor) -> Tensor:
        """The head's input: the embedding, L2-normalised for CLIP-style models."""
        return self.head_input(self.backbone(images))

    def head_input(self, embedding: Tensor) -> Tensor:
        """The backbone's embedding as the head takes it (L2-normalised for CLIP-style models)."""
        if self.normalize_features:
            embedding = embedding / embedding.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return embedding

    def forward(self, images: Tensor) -> Tensor:
        return self.logits_from_features([self.backbone(images)])

    def feature_extractors(self) -> list[nn.Module]:
        """The backbone, whose embeddings of a split the evaluator caches (``robustft.feature_cache``): many
        predictors share one frozen backbone (zero-shot, linear probe, VRF's zero-shot side) and differ only in
        the head. Empty (no sharing) for a subclass that changes ``forward`` or while forward hooks are set."""
        plain = type(self).forward is ImageClassifier.forward and type(self).features is ImageClassifier.features
        return [self.backbone] if plain and not self._forward_hooks and not self._forward_pre_hooks else []

    def logits_from_features(self, features: list[Tensor]) -> Tensor:
        """``forward`` given the backbone's embedding of one batch: what the evaluator applies to cached ones."""
        (embedding,) = features
        return self.head(self.head_input(embedding))


def linear_head(weight: Tensor, bias: Tensor | None = None) -> nn.Linear:
    """An ``nn.Linear`` whose weight ``[C, D]`` (and bias ``[C]``) are copies of the given tensors."""
    num_classes, dim = weight.shape
    head = nn.Linear(dim, num_classes, bias=True)
    with torch.no_grad():
        head.weight.copy_(weight)
        if bias is None:
            head.bias.zero_()
        else:
            head.bias.copy_(bias)
    return head
