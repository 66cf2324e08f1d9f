"""Linear probe: frozen backbone, a multinomial logistic regression on cached features."""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from robustft.backbones.classifier import ImageClassifier
from robustft.config import MethodConfig
from robustft.evaluate import backbone_features
from robustft.feature_cache import apply_in_batches, feature_extractors
from robustft.methods.base import Method, RunContext, register_method


class LinearProbeConfig(MethodConfig):
    c_grid: list[float] = Field(
        [0.01, 0.1, 1.0, 10.0, 100.0],
        description="inverse L2 strengths tried; the best on id_val wins (the train split if no id_val)",
    )
    max_iter: int = Field(1000, gt=0, description="L-BFGS iterations of the logistic regression")


@torch.no_grad()
def extract_features(model: nn.Module, ctx: RunContext, split: str) -> tuple[Tensor, Tensor]:
    """The head's inputs for a whole split (``model.features``), on the CPU.

    With the run's feature cache the backbone's outputs come from it (``robustft.feature_cache``): the zero-shot
    model, the linear probe, an LP-FT's probing stage and VRF's zero-shot side share one frozen backbone.
    """
    model.eval()
    cache = ctx.logit_cache
    extractors = feature_extractors(model) if isinstance(model, ImageClassifier) else []
    if cache is not None and cache.features is not None and len(extractors) == 1:
        embeddings, labels = backbone_features(
            extractors[0], ctx.splits[split], ctx.device, ctx.eval_batch_size, ctx.num_workers, cache=cache
        )
        features = apply_in_batches(
            lambda batch: model.head_input(batch[0]), [embeddings], ctx.eval_batch_size, ctx.device
        )
        return features, labels
    features, labels = [], []
    for images, batch_labels in ctx.iterate(split):
        features.append(model.features(images).float().cpu())
        labels.append(batch_labels.cpu())
    return torch.cat(features), torch.cat(labels)


def fit_linear_probe(
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    num_classes: int,
    c_grid: list[float],
    max_iter: int = 1000,
) -> tuple[Tensor, Tensor, float]:
    """Logistic regression with the L2 strength picked on ``val`` (as CLIP's linear-probe protocol).

    Returns (weight [C, D], bias [C], chosen C). Classes absent from the training split get a
    zero weight and a very negative bias, so they are never predicted.
    """
    from sklearn.linear_model import LogisticRegression

    x_train, y_train = train[0].numpy(), train[1].numpy()
    x_val, y_val = val[0].numpy(), val[1].numpy()
    best = None
    for c in c_grid:
        classifier = LogisticRegression(C=c, max_iter=max_iter)
        classifier.fit(x_train, y_train)
        accuracy = float((classifier.predict(x_val) == y_val).mean())
        if best is None or accuracy > best[0]:
            best = (accuracy, c, classifier)
    _, chosen_c, classifier = best
    weight = np.zeros((num_classes, x_train.shape[1]), dtype=np.float32)
    bias = np.full(num_classes, -1e4, dtype=np.float32)
    coef, intercept = classifier.coef_, classifier.intercept_
    if len(classifier.classes_) == 2:  # sklearn stores one row for binary problems
        coef, intercept = np.concatenate([-coef, coef]) / 2, np.concatenate([-intercept, intercept]) / 2
    weight[classifier.classes_] = coef
    bias[classifier.classes_] = intercept
    return torch.from_numpy(weight), torch.from_numpy(bias), chosen_c


def probe_head(model: nn.Module, ctx: RunContext, config: LinearProbeConfig) -> float:
    """Fit ``model.head`` on frozen features in place; returns the chosen C."""
    train = extract_features(model, ctx, "train")
    val = extract_features(model, ctx, "id_val") if "id_val" in ctx.splits else train
    weight, bias, chosen_c = fit_linear_probe(train, val, model.head.out_features, config.c_grid, config.max_iter)
    with torch.no_grad():
        model.head.weight.copy_(weight.to(model.head.weight))
        model.head.bias.copy_(bias.to(model.head.bias))
    ctx.log(f"linear probe: C={chosen_c} chosen on {'id_val' if 'id_val' in ctx.splits else 'train'}")
    return chosen_c


@register_method
class LinearProbe(Method):
    """LP: train only the head on frozen features (docs/methods.md, `linear_probe`)."""

    name = "linear_probe"
    config_cls = LinearProbeConfig
    trains = False
    seed_independent = True  # no training; the head is fitted by deterministic L-BFGS

    def prepare(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        model.requires_grad_(False)
        model.head.requires_grad_(True)
        return model

    def setup(self, model: nn.Module, ctx: RunContext) -> None:
        ctx.extras["chosen_c"] = probe_head(model, ctx, self.config)

    def finalize(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        model.requires_grad_(False)
        return model
