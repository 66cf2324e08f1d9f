"""L2-SP (Li, Grandvalet and Davoine, "Explicit Inductive Bias for Transfer Learning with Convolutional
Networks", ICML 2018, arXiv:1802.01483): fine-tune with the pretrained weights as the centre of the
weight penalty instead of zero.

    loss = CE + alpha / 2 * ||W_backbone - W0||^2 + beta / 2 * ||W_head||^2          (paper, eq. 4)

Plain weight decay pulls every weight toward 0, i.e. away from what pretraining learnt; L2-SP pulls
the backbone back toward its starting point ``W0`` so fine-tuning can move it only as far as the
task pays for, and gives the (new) head an ordinary L2 penalty. It is the classic regulariser that
robust fine-tuning methods are compared against.

Decisions:

- The penalty replaces weight decay: every optimiser group gets ``weight_decay: 0``, whatever
  ``optim.weight_decay`` says (decaying toward 0 on top would fight the anchor).
- ``W0`` is every trainable backbone parameter (biases, norms and position tables included, as in
  the paper's "all pretrained parameters"), copied at ``prepare``; the copies live on the method, not
  the model, so they are never part of the saved predictor. On resume ``prepare`` sees the
  pretrained model again before the checkpoint is restored, so ``W0`` is the same.
- Here the head starts from the zero-shot head, which is pretrained knowledge too; ``anchor_head``
  treats it like the backbone (anchored with ``alpha``) instead of shrinking it with ``beta``.
- Defaults ``alpha = 0.1``, ``beta = 0.01``: the values Li et al. use (with SGD). With AdamW the
  penalty's gradient is rescaled per coordinate like the loss's, so the best ``alpha`` differs; sweep it.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from robustft.methods.base import Batch, RunContext, register_method
from robustft.methods.finetune import Finetune, FinetuneConfig

HEAD_PREFIX = "head."


class L2SpConfig(FinetuneConfig):
    alpha: float = Field(0.1, ge=0, description="strength of alpha/2 ||W - W0||^2 on the backbone")
    beta: float = Field(0.01, ge=0, description="strength of beta/2 ||W||^2 on the head")
    anchor_head: bool = Field(False, description="anchor the (zero-shot) head to its start with alpha instead")


def squared_distance(parameters: list[Tensor], anchors: list[Tensor]) -> Tensor:
    """``sum_i ||parameters_i - anchors_i||^2`` in one batched pass (``torch._foreach_*``), differentiable."""
    if not parameters:
        return torch.zeros(())
    differences = torch._foreach_sub(parameters, anchors)
    return torch.stack(torch._foreach_norm(differences)).float().square().sum()


def squared_norm(parameters: list[Tensor]) -> Tensor:
    """``sum_i ||parameters_i||^2`` in one batched pass, differentiable."""
    if not parameters:
        return torch.zeros(())
    return torch.stack(torch._foreach_norm(parameters)).float().square().sum()


def l2_sp_penalty(
    anchored: list[Tensor], anchors: list[Tensor], shrunk: list[Tensor], alpha: float, beta: float
) -> Tensor:
    """``alpha / 2 * ||anchored - anchors||^2 + beta / 2 * ||shrunk||^2`` (Li et al. 2018, eq. 4).

    Its gradient is ``alpha * (W - W0)`` on the anchored tensors and ``beta * W`` on the shrunk ones.
    """
    return alpha / 2 * squared_distance(anchored, anchors) + beta / 2 * squared_norm(shrunk)


@register_method
class L2Sp(Finetune):
    """L2-SP: cross-entropy plus an L2 penalty toward the pretrained weights (module docstring)."""

    name = "l2_sp"
    config_cls = L2SpConfig

    def __init__(self, config: L2SpConfig | None = None) -> None:
        super().__init__(config)
        self.anchored: list[Tensor] = []
        self.anchors: list[Tensor] = []
        self.shrunk: list[Tensor] = []

    def prepare(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        self.anchored, self.anchors, self.shrunk = [], [], []
        for name, parameter in model.named_parameters():
            if not parameter.requires_grad:
                continue
            if name.startswith(HEAD_PREFIX) and not self.config.anchor_head:
                self.shrunk.append(parameter)
            else:
                self.anchored.append(parameter)
                self.anchors.append(parameter.detach().clone())
        return model

    def parameter_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        """One group, no weight decay: the L2-SP penalty is the weight regulariser."""
        parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
        return [{"params": parameters, "weight_decay": 0.0}] if parameters else []

    def penalty(self) -> Tensor:
        return l2_sp_penalty(self.anchored, self.anchors, self.shrunk, self.config.alpha, self.config.beta)

    def loss(self, model: nn.Module, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        task, _ = super().loss(model, batch, step)
        penalty = self.penalty()
        return task + penalty, {"loss_task": task.detach(), "l2_sp_penalty": penalty.detach()}
