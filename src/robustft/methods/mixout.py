"""Mixout (Lee, Cho and Kang, "Mixout: Effective Regularization to Finetune Large-scale Pretrained
Language Models", ICLR 2020, arXiv:1909.11299).

At every training forward each mixed tensor is replaced by

    W~ = ((1 - M) * W0 + M * W - p * W0) / (1 - p) = W0 + M * (W - W0) / (1 - p),   M ~ Bernoulli(1 - p)

so ``E[W~] = W``: a coordinate is "mixed out" (swapped for its pretrained value W0) with probability
p, and the kept ones are rescaled. Evaluation uses ``W``. All of ``W`` is trained densely (this is
the original, dense method; GMixout is its sparse generalisation).

Decisions (docs/methods.md, `mixout`):

- Mask granularity: ``input`` (default, as bloodwass/mixout): one Bernoulli value per input feature
  (column) shared by all output rows; ``element``: one per entry (the paper's prose); ``output``: one
  per output row. Vectors always get per-element masks. The mask is redrawn at every forward.
- Gradient: plain autograd gives the true derivative ``M * g / (1 - p)``; the official backward
  returns ``M * g`` (a gradient (1-p) times smaller). ``gradient="official"`` reproduces it. AdamW is
  invariant to that scale (up to eps); SGD is not.
- Biases are never mixed (the default targets are weights of ``nn.Linear`` layers of the backbone);
  every parameter that is not mixed trains as in FT.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.nn.utils import parametrize

from robustft.config import MethodConfig
from robustft.methods.base import Method, RunContext, record_preset, register_method
from robustft.sparse import Scope, empty_selection, selected_parameters

Granularity = Literal["input", "element", "output"]


class MixoutConfig(MethodConfig):
    p: float = Field(0.9, ge=0, lt=1, description="probability of swapping a coordinate for its pretrained value")
    granularity: Granularity = Field(
        "input", description="mask per input feature (official code), per element, or per output row"
    )
    gradient: Literal["autograd", "official"] = Field(
        "autograd", description="autograd: true gradient M*g/(1-p); official: M*g as bloodwass/mixout"
    )
    scope: Scope = Field("linear", description="tensors mixed: linear weights, all matrices, or all parameters")
    include: str = Field(r"^backbone\.", description="regex a mixed tensor's name must match")
    exclude: str | None = Field(None, description="regex of tensor names never mixed")

    paper_preset: ClassVar[dict[str, Any]] = {"p": 0.9, "granularity": "input", "gradient": "official"}
    """bloodwass/mixout: per-input-feature masks and the backward ``grad * M``."""

    @model_validator(mode="after")
    def _valid_regex(self) -> MixoutConfig:
        import re

        re.compile(self.include)
        re.compile(self.exclude or "")
        return self


def mask_shape(shape: torch.Size, granularity: Granularity) -> tuple[int, ...]:
    """Shape of the Bernoulli mask of a tensor (broadcast over the rest)."""
    if len(shape) < 2 or granularity == "element":
        return tuple(shape)
    if granularity == "input":
        return (1, *shape[1:])
    return (shape[0], *([1] * (len(shape) - 1)))


def sample_mask(
    shape: torch.Size, keep: float, granularity: Granularity, like: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """``M ~ Bernoulli(keep)`` of ``mask_shape``, in the dtype and device of ``like``."""
    probabilities = torch.full(mask_shape(shape, granularity), keep, dtype=like.dtype, device=like.device)
    return torch.bernoulli(probabilities, generator=generator)


def mixout_weight(weight: Tensor, anchor: Tensor, mask: Tensor, p: float, official_gradient: bool = False) -> Tensor:
    """Mixout's effective weight ``W0 + M * (W - W0) / (1 - p)`` (Lee et al., eq. in section 3).

    With ``official_gradient`` the value is the same but ``dW~/dW = M`` instead of ``M / (1 - p)``.
    """
    mixed = anchor + mask * (weight - anchor) / (1.0 - p)
    if official_gradient:
        kept = mask * weight
        return kept + (mixed - kept).detach()
    return mixed


class MixoutParametrization(nn.Module):
    """``W -> W~`` in training mode with a fresh mask per forward, ``W -> W`` in eval mode."""

    def __init__(self, anchor: Tensor, p: float, granularity: Granularity, official_gradient: bool) -> None:
        super().__init__()
        self.register_buffer("anchor", anchor.detach().clone())
        self.p = p
        self.granularity = granularity
        self.official_gradient = official_gradient

    def forward(self, weight: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return weight
        mask = sample_mask(weight.shape, 1.0 - self.p, self.granularity, weight)
        return mixout_weight(weight, self.anchor.to(weight.dtype), mask, self.p, self.official_gradient)


def apply_mixout(
    model: nn.Module, names: list[str], p: float, granularity: Granularity = "input", official_gradient: bool = False
) -> None:
    """Mix the named tensors of ``model`` in place, anchored at their current (pretrained) values."""
    for name in names:
        module_name, _, tensor_name = name.rpartition(".")
        module = model.get_submodule(module_name)
        weight = getattr(module, tensor_name)
        parametrize.register_parametrization(
            module, tensor_name, MixoutParametrization(weight, p, granularity, official_gradient)
        )


def remove_mixout(model: nn.Module) -> nn.Module:
    """Remove every Mixout parametrization; each tensor becomes its trained ``W`` (eval semantics)."""
    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name in list(module.parametrizations):
            if any(isinstance(p, MixoutParametrization) for p in module.parametrizations[tensor_name]):
                parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=False)
    return model


@register_method
class Mixout(Method):
    """Mixout (Lee et al., ICLR 2020): stochastic mixing with the pretrained weights (docs/methods.md, `mixout`)."""

    name = "mixout"
    report_columns = ("active_params",)
    config_cls = MixoutConfig

    def check_model(self, model: nn.Module, model_spec: dict[str, Any]) -> str | None:
        """The tensors ``scope`` / ``include`` / ``exclude`` pick must exist on this model."""
        cfg = self.config
        return empty_selection(model, "mixout", cfg.scope, cfg.include, cfg.exclude)

    def prepare(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        cfg = self.config
        names = selected_parameters(model, "mixout", cfg.scope, cfg.include, cfg.exclude)
        mixed = sum(model.get_parameter(name).numel() for name in names)
        total = sum(p.numel() for p in model.parameters() if p.requires_grad)
        apply_mixout(model, names, cfg.p, cfg.granularity, cfg.gradient == "official")
        ctx.extras["mixed_params"] = mixed
        ctx.extras["active_params"] = round((1 - cfg.p) * mixed) + total - mixed
        record_preset(cfg, ctx)
        return model

    def finalize(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        return remove_mixout(model)
