"""LP-FT (Kumar et al., ICLR 2022): fit the head on frozen features first, then fine-tune everything.

A good head before full fine-tuning means smaller early gradients into the backbone, so the
pretrained features are distorted less, which is where FT loses OOD accuracy.
"""

from __future__ import annotations

from pydantic import Field
from torch import nn

from robustft.methods.base import RunContext, register_method
from robustft.methods.finetune import Finetune, FinetuneConfig
from robustft.methods.linear_probe import LinearProbeConfig, probe_head


class LpFtConfig(FinetuneConfig):
    c_grid: list[float] = Field([0.01, 0.1, 1.0, 10.0, 100.0], description="LP stage: L2 strengths tried")
    max_iter: int = Field(1000, gt=0, description="LP stage: logistic-regression iterations")


@register_method
class LpFt(Finetune):
    """LP then FT, one run (docs/methods.md, `lp_ft`)."""

    name = "lp_ft"
    config_cls = LpFtConfig

    def setup(self, model: nn.Module, ctx: RunContext) -> None:
        probe = LinearProbeConfig(c_grid=self.config.c_grid, max_iter=self.config.max_iter)
        ctx.extras["chosen_c"] = probe_head(model, ctx, probe)
