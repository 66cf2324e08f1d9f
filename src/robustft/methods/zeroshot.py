"""Zero-shot: the pretrained backbone with its zero-shot head, no training (the robustness reference)."""

from __future__ import annotations

from torch import nn

from robustft.methods.base import Method, RunContext, register_method


@register_method
class ZeroShot(Method):
    """Evaluate ``f_zs`` as it is (docs/methods.md, `zeroshot`)."""

    name = "zeroshot"
    trains = False
    seed_independent = True

    def prepare(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        model.requires_grad_(False)
        return model
