"""Zero-shot heads for backbones without a text tower (docs/methods.md, `zeroshot`).

Pure tensor functions, no IO. The zero-shot model ``f_zs`` is the starting point of every method and
the ZS baseline, so its head must be exactly reproducible: either the pretrained model's own
classifier (when the label space maps into the pretrained one) or class prototypes computed from
the training split. Either way the result is a plain ``nn.Linear`` that WiSE-FT and soups
interpolate like any other weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustft.backbones.classifier import linear_head


def classifier_head(pretrained_head: nn.Linear, class_indices: list[int] | None = None) -> nn.Linear:
    """A copy of the pretrained classifier, optionally restricted to some of its classes.

    ``class_indices[i]`` is the pretrained class that task label ``i`` corresponds to (e.g. the
    200 ImageNet-R classes inside ImageNet-1k), so row ``i`` of the new head is that row of the
    pretrained one. A copy, so fine-tuning never touches the pretrained weights kept for WiSE-FT.

    Raises:
        ValueError: ``class_indices`` is empty or names a class the pretrained head does not have.
    """
    weight = pretrained_head.weight.detach()
    bias = pretrained_head.bias.detach() if pretrained_head.bias is not None else None
    if class_indices is None:
        return linear_head(weight, bias)
    if not class_indices:
        raise ValueError("classifier_head: class_indices is empty")
    bad = [index for index in class_indices if not 0 <= index < pretrained_head.out_features]
    if bad:
        raise ValueError(
            f"classifier_head: class index {bad[0]} is outside the pretrained head's "
            f"{pretrained_head.out_features} classes"
        )
    rows = torch.as_tensor(class_indices, dtype=torch.long, device=weight.device)
    return linear_head(weight[rows], bias[rows] if bias is not None else None)


def prototype_head(embeddings: Tensor, labels: Tensor, num_classes: int, scale: float) -> nn.Linear:
    """A head whose rows are class prototypes: the normalised mean of normalised embeddings, times ``scale``.

    Meant for an ``ImageClassifier`` with ``normalize_features=True``: logits are then ``scale``
    times the cosine similarity to each class mean, a nearest-class-mean classifier that needs no
    training (the zero-shot head for backbones with no text tower). Each embedding is normalised
    before averaging so that images with large feature norms do not dominate their class.

    Args:
        embeddings: ``[N, D]`` backbone embeddings of the training split.
        labels: ``[N]`` integer class labels in ``[0, num_classes)``.
        num_classes: number of rows of the head.
        scale: logit scale (a temperature); CLIP's trained value is 100.

    Raises:
        ValueError: shapes disagree, a label is out of range, or a class has no example.
    """
    if embeddings.ndim != 2 or labels.ndim != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"prototype_head: expected embeddings [N, D] and labels [N], got {tuple(embeddings.shape)} "
            f"and {tuple(labels.shape)}"
        )
    labels = labels.long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"prototype_head: labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    counts = torch.bincount(labels, minlength=num_classes)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"prototype_head: class {empty[0]} has no example (classes without examples: {empty})")
    normed = F.normalize(embeddings.detach().float(), dim=1)
    sums = torch.zeros(num_classes, normed.shape[1], device=normed.device).index_add_(0, labels, normed)
    means = sums / counts.unsqueeze(1).to(sums.dtype)
    return linear_head(F.normalize(means, dim=1) * scale)
