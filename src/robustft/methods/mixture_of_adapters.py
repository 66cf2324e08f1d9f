"""Mixture of adapters (MoA; Lee et al., arXiv:2310.11031): routed experts of different capacity.

The backbone is frozen; the attention ``qkv`` projection of every other block gets a per-token top-1
mixture of adapter experts (KAdaptation or LoRA, ranks 1, 2, 4, 8; see ``robustft.adapters.mixture``
for the router, the experts and the decisions read in cvlab-kaist/MoA). The loss is cross-entropy plus
``aux_weight`` (0.01) times the sum over adapted layers of the load-balancing loss; every logged step
records the share of tokens each expert received in each adapted block (``router/block<i>/expert<e>``
in metrics.jsonl). The routing depends on the input, so the adapters cannot be merged: the predictor
keeps them and ``load_predictor`` rebuilds the structure before loading the saved weights.

The paper trains a *new* linear head. On digits-shift a random head would have to be learned from
scratch while the zero-shot head is already good, so ``head_init`` defaults to ``zero_shot`` (as FT,
LoRA and every other method here); ``random`` gives the paper's setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from robustft.adapters import DEFAULT_QKV_TARGET, inject_mixture, mixture_layers
from robustft.adapters.mixture import choose_blocks
from robustft.adapters.targets import select_linear_layers
from robustft.config import MethodConfig
from robustft.errors import ConfigError
from robustft.methods.base import Batch, Method, RunContext, record_preset, register_method


class MixtureOfAdaptersConfig(MethodConfig):
    experts: Literal["kadaptation", "lora"] = Field(
        "kadaptation", description="expert type: KAdaptation (Kronecker, the paper's best) or LoRA"
    )
    ranks: list[int] = Field([1, 2, 4, 8], description="one expert per rank (their capacities)")
    blocks: Literal["even", "odd", "all"] | list[int] = Field(
        "even",
        description="adapted blocks: even = 0, 2, 4, ... (every other block, as the official code), "
        "odd, all, or a list of indices",
    )
    target: str = Field(DEFAULT_QKV_TARGET, description="regex of the layer adapted in each block")
    router_dim: int = Field(256, ge=1, description="router projection width")
    aux_weight: float = Field(0.01, ge=0, description="weight of the load-balancing loss (per layer, summed)")
    kron_dim: int = Field(64, ge=1, description="KAdaptation: number n of shared n x n rule matrices")
    kron_dropout: float = Field(
        0.0, ge=0, lt=1, description="KAdaptation: dropout on the expert matrices in training (official code 0.5)"
    )
    head_init: Literal["zero_shot", "random"] = Field(
        "zero_shot", description="head initialisation: the zero-shot head, or random (the paper's new head)"
    )

    paper_preset: ClassVar[dict[str, Any]] = {
        "experts": "kadaptation",
        "ranks": [1, 2, 4, 8],
        "blocks": "even",
        "router_dim": 256,
        "aux_weight": 0.01,
        "kron_dropout": 0.5,
        "head_init": "random",
    }
    """cvlab-kaist/MoA: KAdaptation experts of ranks 1-8 on every other block, expert dropout 0.5, new head."""

    @field_validator("ranks")
    @classmethod
    def _ranks(cls, value: list[int]) -> list[int]:
        if len(value) < 2 or any(rank < 1 for rank in value):
            raise ValueError("needs two or more experts, each of rank >= 1")
        return value


@register_method
class MixtureOfAdaptersMethod(Method):
    """MoA (docs/methods.md, `mixture_of_adapters`): frozen backbone, routed adapters on qkv, load-balancing loss."""

    name = "mixture_of_adapters"
    config_cls = MixtureOfAdaptersConfig

    def check_model(self, model: nn.Module, model_spec: dict[str, Any]) -> str | None:
        """The adapter target finder's answer for ``target``, and whether ``blocks`` picks among its matches."""
        try:
            choose_blocks(
                len(select_linear_layers(model, [self.config.target], option="method.target")), self.config.blocks
            )
        except ConfigError as error:
            return str(error)
        return None

    def prepare(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        model.requires_grad_(False)
        chosen = self._inject(model)
        model.to(ctx.device)
        if self.config.head_init == "random":
            model.head.reset_parameters()
        model.head.requires_grad_(True)
        ctx.extras["adapted_blocks"] = sorted(chosen)
        record_preset(self.config, ctx)
        ctx.extras["adapter_params"] = sum(
            p.numel() for name, p in model.named_parameters() if p.requires_grad and not name.startswith("head.")
        )
        return model

    def _inject(self, model: nn.Module) -> dict[int, str]:
        cfg = self.config
        chosen = inject_mixture(
            model, cfg.experts, cfg.ranks, cfg.blocks, cfg.target, cfg.router_dim, cfg.kron_dim, cfg.kron_dropout
        )
        self._blocks = {name: index for index, name in chosen.items()}
        return chosen

    def loss(self, model: nn.Module, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        images, labels = batch
        task = F.cross_entropy(model(images), labels)
        layers = mixture_layers(model)
        aux = torch.stack([layer.aux_loss for layer in layers.values()]).sum()
        logs: dict[str, Tensor] = {"task_loss": task.detach(), "balance_loss": aux.detach()}
        for name, layer in layers.items():
            block = self._blocks.get(name, name)
            for expert, fraction in enumerate(layer.expert_fractions.unbind()):
                logs[f"router/block{block}/expert{expert}"] = fraction
        self._last_fractions = {name: layer.expert_fractions for name, layer in layers.items()}
        return task + self.config.aux_weight * aux, logs  # tensors: the engine reads them after backward

    def finalize(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        fractions = getattr(self, "_last_fractions", None)
        if fractions:
            ctx.extras["router_last_step"] = {
                f"block{self._blocks[name]}": [round(float(v), 4) for v in value] for name, value in fractions.items()
            }
        return model.requires_grad_(False)

    def load_predictor(self, model: nn.Module, checkpoint: Path, what: str) -> nn.Module:
        self._inject(model)
        model.to(next(model.head.parameters()).device)
        return super().load_predictor(model, checkpoint, f"{what} with mixture-of-adapters layers")
