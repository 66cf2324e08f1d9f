"""End-to-end fine-tuning: every weight, cross-entropy, head initialised from the zero-shot head."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from robustft.config import MethodConfig
from robustft.methods.base import Batch, Method, register_method


class FinetuneConfig(MethodConfig):
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing")


@register_method
class Finetune(Method):
    """FT (E2E-FT): the baseline that gains ID accuracy and loses robustness (docs/methods.md, `finetune`)."""

    name = "finetune"
    config_cls = FinetuneConfig

    def loss(self, model: nn.Module, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        images, labels = batch
        return F.cross_entropy(model(images), labels, label_smoothing=self.config.label_smoothing), {}
