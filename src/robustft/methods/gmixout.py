"""GMixout (Aminbeidokhti et al., "Revisiting Mixout: An Overlooked Path to Robust Finetuning", arXiv:2510.06982).

Mixout with three levers made explicit. The effective weights of a mixed tensor are

    Phi = A + c * (M * (W - A)),

where ``A`` is the *anchor*, ``M`` a mask keeping a ``1 - p`` fraction of coordinates and ``c`` a
rescaling (``1 / (1 - p)`` keeps ``E[Phi] = W`` as in Mixout). GMixout changes Mixout's fixed anchor
``W0`` into an exponential moving average that is refreshed at every episode boundary,

    A <- (1 - lambda) * A + lambda * W,

and draws a new mask only every ``k`` steps (an episode), so a run visits ``T / k`` sub-networks.
Mixout is the special case ``lambda = 0`` (A stays W0), ``k = 1``.

Within an episode only the active coordinates receive gradients, so this uses the sparse core
(:mod:`robustft.sparse`): the frozen base of each mixed tensor is ``A``, the trainable ``values`` are
``W`` at the active indices, and the optimiser state has ``(1 - p) * numel`` entries. At an episode
boundary the values are written back into the dense ``W`` (a buffer), the anchor is updated, a new
active set of the *same size* is drawn (so the optimiser's tensors keep their shapes), and the
optimiser moments are carried over for coordinates active in both episodes and zeroed for new ones.

Choices for the paper's UNKNOWNs (all options): ``p = 0.9`` (about 10% active, the paper's ViT-B
figure); ``k = 10`` steps; ``lambda = 0.1`` per episode; ``c = 1 / (1 - p)``; mixed tensors: every
matrix of the backbone (linear and patch-embedding weights, not position tables: 85.5M of ViT-B/16,
the paper's count) with the rest (biases, norms, head, position tables) trained densely as in FT;
final model ``W`` (``final="ema"`` returns the anchor). The mask draws exactly ``round((1-p) n)``
coordinates uniformly without replacement (per element, or whole output rows), not i.i.d.
Bernoulli: every coordinate is still active with probability ``1 - p``, so ``E[Phi] = W`` holds,
and the active set has a fixed size. All tensors' sets are drawn together (``sample_active_sets``: one
``torch.rand`` of keys, the smallest ``round((1-p) n)`` per tensor by a batched ``topk``), on the model's device.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from robustft.config import MethodConfig
from robustft.methods.base import Method, RunContext, record_preset, register_method
from robustft.sparse import (
    Scope,
    SparseUpdate,
    empty_selection,
    merge_sparse,
    remap_optimizer_state,
    selected_parameters,
    sparse_parameter_groups,
    sparse_updates,
    sparsify,
)


class GMixoutConfig(MethodConfig):
    p: float = Field(0.9, ge=0, lt=1, description="mask sparsity: fraction of mixed coordinates inactive per episode")
    k: int = Field(10, ge=1, description="resampling period in optimiser steps (one episode)")
    ema: float = Field(
        0.1, ge=0, le=1, description="lambda: anchor A <- (1-lambda) A + lambda W per episode (0: Mixout's W0)"
    )
    scale: float | None = Field(None, gt=0, description="rescaling c of M*(W-A); default 1/(1-p) so E[Phi]=W")
    granularity: Literal["element", "output"] = Field("element", description="draw single entries or output rows")
    scope: Scope = Field("matrices", description="tensors mixed: linear weights, all matrices, or all parameters")
    include: str = Field(r"^backbone\.", description="regex a mixed tensor's name must match")
    exclude: str | None = Field(
        r"(pos_embed|cls_token|positional_embedding)$", description="regex of tensor names never mixed"
    )
    train_others: bool = Field(True, description="train the tensors that are not mixed densely (else freeze them)")
    final: Literal["weights", "ema"] = Field("weights", description="final model: the trained W or the EMA anchor")

    paper_preset: ClassVar[dict[str, Any]] = {"p": 0.9, "scope": "matrices"}
    """What the paper states: about 10% of the mixed coordinates active (9M of ViT-B/16's 85.5M matrix
    entries); its other choices (k, lambda, c, final model) are not published, so they stay the defaults."""

    @model_validator(mode="after")
    def _valid_regex(self) -> GMixoutConfig:
        re.compile(self.include)
        re.compile(self.exclude or "")
        return self


class GMixoutUpdate(SparseUpdate):
    """A sparse update whose base is the anchor ``A``; ``weights`` holds the dense trained ``W``.

    Training mode computes the episode's sub-network ``Phi = A + c * M * (W - A)``; eval mode computes ``W``
    itself (``weights`` with the episode's ``values`` written at its indices), the model being trained, as
    Mixout evaluates ``W``: a mid-run evaluation, an evaluation of ``last.pt`` and the finalized model agree.
    """

    def __init__(self, indices: Tensor, values: Tensor, scale: float = 1.0, decay: bool = True) -> None:
        super().__init__(indices, values, scale, decay)
        self.register_buffer("weights", torch.empty(0, dtype=values.dtype, device=values.device))

    def forward(self, base: Tensor) -> Tensor:
        if self.training or self.weights.shape != base.shape:
            return super().forward(base)
        dense = self.weights.reshape(-1).index_put((self.indices,), self.values.to(self.weights.dtype))
        return dense.view_as(base).to(base.dtype)


def active_count(numel: int, rows: int, p: float, granularity: str) -> int:
    """Size of the active set: ``round((1 - p) * n)`` entries, or that many whole rows."""
    if granularity == "output":
        return max(1, round((1 - p) * rows)) * (numel // rows)
    return max(1, round((1 - p) * numel))


def sample_active(
    shape: torch.Size, p: float, granularity: str, device: torch.device, generator: torch.Generator | None = None
) -> Tensor:
    """Sorted flat indices of a uniformly drawn active set of fixed size (see ``active_count``)."""
    return sample_active_sets([shape], p, granularity, device, generator)[0]


def sample_active_sets(
    shapes: Sequence[torch.Size],
    p: float,
    granularity: str,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """One active set per shape (sorted flat indices), drawn for all tensors at once on ``device``.

    A tensor's active units (entries, or whole output rows) are the ``round((1 - p) * units)`` smallest of
    i.i.d. uniform keys: a uniform subset of fixed size, the distribution of a random permutation's first
    entries, without the permutation. The keys of every tensor come from one ``torch.rand``; tensors with
    the same number of units share one ``topk`` and one sort (a ViT has four or five such groups), so a
    resample costs one draw and a few batched selections instead of a permutation and a sort per tensor.
    """
    rows = [shape[0] if granularity == "output" and len(shape) >= 2 else shape.numel() for shape in shapes]
    groups: dict[int, list[int]] = {}
    for position, units in enumerate(rows):
        groups.setdefault(units, []).append(position)
    keys = torch.rand(sum(rows), device=device, generator=generator)
    chosen: list[Tensor] = [torch.empty(0)] * len(shapes)
    start = 0
    for units, members in groups.items():
        block = keys[start : start + units * len(members)].view(len(members), units)
        start += units * len(members)
        count = max(1, round((1 - p) * units))
        picked = block.topk(count, dim=1, largest=False, sorted=False).indices.sort(dim=1).values
        for position, index in zip(members, picked.unbind(0), strict=True):
            width = shapes[position].numel() // units
            chosen[position] = index if width == 1 else (index[:, None] * width + torch.arange(width, device=device))
    return [index.reshape(-1) for index in chosen]


def ema_update(anchor: Tensor, weights: Tensor, rate: float) -> Tensor:
    """``A <- (1 - rate) * A + rate * W`` in place (rate 0: fixed anchor; 1: anchor = W)."""
    return anchor.lerp_(weights, rate)


@register_method
class GMixout(Method):
    """GMixout: EMA-anchored Mixout with a resampling period, trained sparsely (docs/methods.md, `gmixout`)."""

    name = "gmixout"
    report_columns = ("active_params",)
    config_cls = GMixoutConfig

    def __init__(self, config: GMixoutConfig | None = None) -> None:
        super().__init__(config)
        self._optimizer: torch.optim.Optimizer | None = None
        self._generator: torch.Generator | None = None

    @property
    def scale(self) -> float:
        return self.config.scale if self.config.scale is not None else 1.0 / (1.0 - self.config.p)

    def check_model(self, model: nn.Module, model_spec: dict[str, Any]) -> str | None:
        """The tensors ``scope`` / ``include`` / ``exclude`` pick must exist on this model."""
        cfg = self.config
        return empty_selection(model, "gmixout", cfg.scope, cfg.include, cfg.exclude)

    def prepare(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        cfg = self.config
        names = selected_parameters(model, "gmixout", cfg.scope, cfg.include, cfg.exclude)
        if not cfg.train_others:
            model.requires_grad_(False)
        device = model.get_parameter(names[0]).device
        # Masks come from their own stream, seeded alike on every torchrun rank: all ranks draw the same masks.
        self._generator = torch.Generator(device=device).manual_seed(ctx.seed + 0x6D1C)
        shapes = {name: model.get_parameter(name).shape for name in names}
        drawn = sample_active_sets(list(shapes.values()), cfg.p, cfg.granularity, device, self._generator)
        indices = dict(zip(names, drawn, strict=True))
        updates = sparsify(model, indices, scale=self.scale, factory=GMixoutUpdate)
        for name, update in updates.items():
            update.weights = base_of(model, name).detach().clone()
        ctx.extras["mixed_params"] = sum(shape.numel() for shape in shapes.values())
        ctx.extras["active_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        record_preset(cfg, ctx)
        return model

    def parameter_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        return sparse_parameter_groups(model, weight_decay)

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Resampling re-indexes ``values``; their optimiser moments are remapped in place (see resample)."""
        self._optimizer = optimizer

    def after_step(self, model: nn.Module, step: int) -> None:
        if (step + 1) % self.config.k == 0:
            self.resample(model)

    @torch.no_grad()
    def resample(self, model: nn.Module) -> None:
        """End the episode (write back W, update the EMA anchor) and start the next on a new mask."""
        optimizer = self._optimizer
        updates = sparse_updates(model)
        anchors = [base_of(model, name) for name in updates]
        drawn = sample_active_sets(
            [anchor.shape for anchor in anchors],
            self.config.p,
            self.config.granularity,
            anchors[0].device,
            self._generator,
        )
        for update, anchor, new in zip(updates.values(), anchors, drawn, strict=True):
            write_back(update)
            ema_update(anchor, update.weights, self.config.ema)
            if optimizer is not None:
                remap_optimizer_state(optimizer, update.values, update.indices, new)
            update.indices.copy_(new)
            update.values.copy_(update.weights.reshape(-1)[new])

    def state_dict(self) -> dict[str, Any]:
        """The mask generator: masks come from their own stream, so a resumed run draws the same ones."""
        return {"generator": self._generator.get_state()} if self._generator is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "generator" in state and self._generator is not None:
            self._generator.set_state(state["generator"])

    def finalize(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        final = self.config.final

        def tensor(name: str, update: SparseUpdate) -> Tensor:
            write_back(update)
            return update.weights if final == "weights" else base_of(model, name)

        return merge_sparse(model, tensor)


def base_of(model: nn.Module, name: str) -> Tensor:
    """The frozen base (``original``) of a parametrized tensor: GMixout's anchor ``A``."""
    module_name, _, tensor_name = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return module.parametrizations[tensor_name].original


@torch.no_grad()
def write_back(update: GMixoutUpdate) -> None:
    """Store the episode's trained values into the dense ``W`` (``W[I] = v``)."""
    update.weights.view(-1).index_copy_(0, update.indices, update.values.to(update.weights.dtype))
