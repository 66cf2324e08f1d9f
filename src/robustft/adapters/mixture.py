"""Mixture of adapters (MoA: Lee et al., "Domain Generalization Using Large Pretrained Models
with Mixture-of-Adapters", arXiv:2310.11031), read against the official code cvlab-kaist/MoA.

A frozen linear layer (the attention qkv projection of chosen blocks; OpenCLIP's fused ``in_proj`` of
``nn.MultiheadAttention``, see ``robustft.adapters.attention``) becomes

    y = W x + b + g(x) * H_{e(x)} x (+ b_adapter for KAdaptation),

with experts ``H_1..H_E`` of different capacity and a per-token top-1 router (docs/methods.md, `mixture_of_adapters`):

- router: ``s = exp(min(t, log 100)) * cos(P x, m_e)`` with ``P`` linear D -> 256 (with bias), expert
  embeddings ``m_e ~ N(0, 0.01)`` and a learnable log-temperature ``t`` initialised at ``log 2``;
  in training Gaussian noise of std ``1/E`` is added to ``s``; the chosen expert is the argmax of
  ``softmax(s + noise)`` and its gate ``g`` is that (noisy, not renormalised) probability. Every
  token, the class token included, is routed.
- load balancing (Shazeer et al. 2017, as in the official code): ``0.01 * (CV^2(importance) +
  CV^2(load)) / 2`` with importance = sum over tokens of the clean softmax and load = sum over
  tokens of ``Phi((p_clean - g) / sigma)``, ``sigma = 1/E`` (the official code hard-codes 4 experts).
- experts ``lora``: ``H_e = B_e A_e`` of ranks 1, 2, 4, 8, ``A ~ N(0, 1/r)``, ``B = 0``, scale 1.
- experts ``kadaptation`` (He et al., AAAI 2023): ``H_e = sum_i R_i kron (L_ei R'_ei)`` over ``n``
  rule matrices ``R_i = u_i v_i^T`` (rank 1, ``n x n``, uniform(-0.01, 0.01)) shared by every expert
  and every adapted layer, factors of rank 1, 2, 4, 8 (Glorot uniform, gain sqrt 2), plus a
  zero-initialised bias.

Dispatch is dense and batched: every expert's low-rank factors are concatenated, the gate (one-hot
times ``g``) is expanded to the concatenated rank columns, and the mixed update is two small GEMMs
(LoRA) or a chain of einsums (KAdaptation). Experts are tiny (total rank 15), so computing all of
them costs about one rank-15 adapter, needs no gather/scatter of a data-dependent number of tokens
and no host-device sync; a per-expert token gather would only pay off for large experts.
KAdaptation is evaluated without ever forming ``H_e`` (``in x out``): with rank-1 rules,
``x H_e = sum_i v_i kron ((u_i^T X) L_ei R'_ei)`` where ``X`` is ``x`` reshaped to ``n x in/n``.
The official code also applies dropout 0.5 to ``H_e`` in training; that needs the explicit matrices,
so it is an option (``kron_dropout``, default 0) that switches training to the explicit path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustft.adapters.targets import DEFAULT_QKV_TARGET, attach, select_linear_layers
from robustft.errors import ConfigError

ExpertKind = Literal["lora", "kadaptation"]
MAX_LOG_TEMPERATURE = math.log(100.0)


# --- router -----------------------------------------------------------------------------------


class CosineRouter(nn.Module):
    """Per-token logits ``exp(min(t, log 100)) * cos(P x, m_e)`` over ``num_experts`` experts."""

    def __init__(self, dim: int, num_experts: int, projection_dim: int = 256) -> None:
        super().__init__()
        self.projection = nn.Linear(dim, projection_dim)
        self.expert_embeddings = nn.Parameter(torch.randn(projection_dim, num_experts) * 0.01)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(2.0)))

    def forward(self, tokens: Tensor) -> Tensor:
        similarity = F.normalize(self.projection(tokens), dim=-1) @ F.normalize(self.expert_embeddings, dim=0)
        return similarity * self.log_temperature.clamp(max=MAX_LOG_TEMPERATURE).exp()


@dataclass
class Routing:
    """Top-1 routing of ``N`` tokens over ``E`` experts.

    Attributes:
        gates: ``[N, E]``, zero except the chosen expert's column, which holds its gate ``g``.
        expert: ``[N]`` chosen expert per token.
        gate: ``[N]`` the (noisy) softmax probability of the chosen expert.
        clean_probs: ``[N, E]`` softmax of the logits without noise (for the balancing loss).
    """

    gates: Tensor
    expert: Tensor
    gate: Tensor
    clean_probs: Tensor


def route_top1(logits: Tensor, noise_std: float) -> Routing:
    """Noisy top-1 gating: ``argmax softmax(logits + N(0, noise_std^2))``, gated by that probability.

    ``noise_std = 0`` (evaluation) routes on the clean logits.
    """
    logits = logits.float()
    noisy = logits + torch.randn_like(logits) * noise_std if noise_std > 0 else logits
    probs = noisy.softmax(dim=-1)
    gate, expert = probs.max(dim=-1)
    gates = torch.zeros_like(probs).scatter(1, expert.unsqueeze(1), gate.unsqueeze(1))
    clean = probs if noise_std == 0 else logits.softmax(dim=-1)
    return Routing(gates, expert, gate, clean)


def cv_squared(values: Tensor) -> Tensor:
    """Squared coefficient of variation ``var / mean^2`` (unbiased variance, as the official code)."""
    values = values.float()
    return values.var() / (values.mean() ** 2 + 1e-10)


def load_balancing_loss(clean_probs: Tensor, gate: Tensor, noise_std: float) -> Tensor:
    """``(CV^2(importance) + CV^2(load)) / 2`` (unweighted; MoA multiplies it by 0.01).

    importance_e = sum_t p_clean[t, e]; load_e = sum_t Phi((p_clean[t, e] - g_t) / noise_std), a smooth
    estimate of how many tokens expert ``e`` would win under the training noise (Shazeer et al. 2017,
    eq. 8-10, applied to probabilities as in cvlab-kaist/MoA). Both are 0 when every expert gets the
    same share and grow as routing collapses onto fewer experts.
    """
    importance = clean_probs.float().sum(dim=0)
    standardized = (clean_probs.float() - gate.float().unsqueeze(1)) / noise_std
    load = (0.5 * (1.0 + torch.erf(standardized / math.sqrt(2.0)))).sum(dim=0)
    return (cv_squared(importance) + cv_squared(load)) / 2


# --- experts ----------------------------------------------------------------------------------


def _rank_owner(ranks: Sequence[int]) -> Tensor:
    """Expert index of each concatenated rank column: ranks (1, 2) -> [0, 1, 1]."""
    return torch.repeat_interleave(torch.arange(len(ranks)), torch.tensor(list(ranks)))


class LoRAExperts(nn.Module):
    """``E`` LoRA experts of ranks ``ranks``, stored concatenated: ``A [sum r, in]``, ``B [out, sum r]``."""

    def __init__(self, in_features: int, out_features: int, ranks: Sequence[int]) -> None:
        super().__init__()
        self.ranks = tuple(int(r) for r in ranks)
        self.lora_A = nn.Parameter(torch.cat([torch.randn(r, in_features) / r for r in self.ranks]))
        self.lora_B = nn.Parameter(torch.zeros(out_features, sum(self.ranks)))
        self.register_buffer("rank_owner", _rank_owner(self.ranks), persistent=False)

    def forward(self, tokens: Tensor, gates: Tensor) -> Tensor:
        hidden = F.linear(tokens, self.lora_A) * gates[:, self.rank_owner].to(tokens.dtype)
        return F.linear(hidden, self.lora_B)

    def expert_matrices(self) -> Tensor:
        """``[E, in, out]``: ``(B_e A_e)^T``, so that a token's update is ``x @ H_e``."""
        blocks = torch.split(torch.arange(sum(self.ranks)), self.ranks)
        return torch.stack([(self.lora_B[:, cols] @ self.lora_A[cols]).t() for cols in blocks])


class KroneckerRules(nn.Module):
    """``n`` rank-1 rule matrices ``R_i = u_i v_i^T`` (``n x n``), shared by all KAdaptation experts."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.empty(n, n).uniform_(-0.01, 0.01))
        self.v = nn.Parameter(torch.empty(n, n).uniform_(-0.01, 0.01))

    @property
    def n(self) -> int:
        return self.u.shape[0]

    def matrices(self) -> Tensor:
        """``[n, n, n]``: ``R_i[a, c] = u_i[a] v_i[c]``."""
        return self.u.unsqueeze(2) * self.v.unsqueeze(1)


class KAdaptationExperts(nn.Module):
    """``E`` KAdaptation experts ``H_e = sum_i R_i kron (L_ei R'_ei)`` with shared ``rules``.

    Args:
        rules: the shared ``KroneckerRules``; ``rules.n`` must divide ``in_features`` and ``out_features``.
        dropout: dropout on ``H_e`` in training (official code: 0.5); > 0 evaluates ``H_e`` explicitly.
    """

    def __init__(
        self, in_features: int, out_features: int, ranks: Sequence[int], rules: KroneckerRules, dropout: float = 0.0
    ) -> None:
        super().__init__()
        n = rules.n
        if in_features % n or out_features % n:
            raise ConfigError(
                f"method.kron_dim: {n} must divide the layer's in ({in_features}) and out ({out_features}) features"
            )
        self.ranks = tuple(int(r) for r in ranks)
        self.rules = rules
        left = [_glorot(torch.empty(n, in_features // n, r)) for r in self.ranks]
        right = [_glorot(torch.empty(n, r, out_features // n)) for r in self.ranks]
        self.left = nn.Parameter(torch.cat(left, dim=2))
        self.right = nn.Parameter(torch.cat(right, dim=1))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.register_buffer("rank_owner", _rank_owner(self.ranks), persistent=False)

    def forward(self, tokens: Tensor, gates: Tensor) -> Tensor:
        if self.dropout is not None and self.training:
            matrices = self.dropout(self.expert_matrices()).to(tokens.dtype)
            per_expert = torch.einsum("ti,eio->teo", tokens, matrices)
            return torch.einsum("teo,te->to", per_expert, gates.to(tokens.dtype)) + self.bias.to(tokens.dtype)
        n, count, dtype = self.rules.n, tokens.shape[0], tokens.dtype
        # Rule index i leads every intermediate, so each contraction is one GEMM or one bmm without copies.
        blocks = tokens.reshape(count, n, -1).transpose(0, 1).reshape(n, -1)  # X as [a, N * in/n]
        projected = (self.rules.u.to(dtype) @ blocks).view(n, count, -1)  # u_i^T X: [i, N, in/n]
        hidden = torch.bmm(projected, self.left.to(dtype))  # [i, N, sum r]
        hidden = hidden * gates[:, self.rank_owner].to(dtype)  # top-1 gate on the chosen expert's columns
        mixed = torch.bmm(hidden, self.right.to(dtype))  # [i, N, out/n]
        update = self.rules.v.t().to(dtype) @ mixed.view(n, -1)  # sum_i v_i kron (...): [c, N * out/n]
        return update.view(n, count, -1).transpose(0, 1).reshape(count, -1) + self.bias.to(dtype)

    def expert_matrices(self) -> Tensor:
        """``[E, in, out]``: the explicit ``H_e`` (a token's update is ``x @ H_e + bias``)."""
        n, rules = self.rules.n, self.rules.matrices()
        matrices = []
        for cols in torch.split(torch.arange(sum(self.ranks)), self.ranks):
            factors = torch.bmm(self.left[:, :, cols], self.right[:, cols, :])  # [n, in/n, out/n]
            kron = torch.einsum("iac,ibd->abcd", rules, factors)
            matrices.append(kron.reshape(n * factors.shape[1], n * factors.shape[2]))
        return torch.stack(matrices)


def _glorot(tensor: Tensor) -> Tensor:
    """Glorot-uniform (gain sqrt 2) on each ``[:, i]`` slice, as the official KAdaptation init."""
    for matrix in tensor:
        nn.init.xavier_uniform_(matrix, gain=math.sqrt(2.0))
    return tensor


# --- the adapted layer ------------------------------------------------------------------------


class MixtureUpdate(nn.Module):
    """A router and experts that add ``g(x) * H_{e(x)} x`` to a projection's output.

    ``forward(x, projected)`` returns ``projected`` plus the routed update; it is the ``in_proj`` of an
    adapted ``nn.MultiheadAttention`` (whose fused projection has no module) and the update half of
    ``MixtureOfAdapters``. In training each forward stores ``aux_loss`` (the unweighted balancing loss of
    this layer) and ``expert_fractions`` (``[E]``, share of tokens routed to each expert) for the method's
    loss hook.
    """

    def __init__(
        self, in_features: int, out_features: int, experts: nn.Module, num_experts: int, projection_dim: int = 256
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_routing(experts, num_experts, projection_dim)

    def _init_routing(self, experts: nn.Module, num_experts: int, projection_dim: int) -> None:
        self.router = CosineRouter(self.in_features, num_experts, projection_dim)
        self.experts = experts
        self.num_experts = num_experts
        self.noise_std = 1.0 / num_experts
        self.aux_loss: Tensor | None = None
        self.expert_fractions: Tensor | None = None

    def forward(self, x: Tensor, projected: Tensor) -> Tensor:
        return self.add_update(x, projected)

    def add_update(self, x: Tensor, projected: Tensor) -> Tensor:
        tokens = x.reshape(-1, self.in_features)
        routing = route_top1(self.router(tokens), self.noise_std if self.training else 0.0)
        update = self.experts(tokens, routing.gates)
        if self.training:
            self.aux_loss = load_balancing_loss(routing.clean_probs, routing.gate, self.noise_std)
            self.expert_fractions = F.one_hot(routing.expert, self.num_experts).float().mean(0).detach()
        else:
            self.aux_loss = self.expert_fractions = None
        return projected + update.view(projected.shape).to(projected.dtype)

    def extra_repr(self) -> str:
        return f"experts={type(self.experts).__name__}{list(self.experts.ranks)}"


class MixtureOfAdapters(MixtureUpdate, nn.Linear):
    """``nn.Linear`` plus a routed mixture of adapters; shares (does not copy) the base ``weight``/``bias``."""

    def __init__(self, base: nn.Linear, experts: nn.Module, num_experts: int, projection_dim: int = 256) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self._init_routing(experts, num_experts, projection_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.add_update(x, F.linear(x, self.weight, self.bias))

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, {MixtureUpdate.extra_repr(self)}"


def choose_blocks(count: int, blocks: str | Sequence[int]) -> list[int]:
    """Indices of the adapted blocks: ``even`` (0, 2, 4, ..., the official code), ``odd``, ``all`` or a list.

    Raises:
        ConfigError: an index outside ``0..count-1``.
    """
    if blocks == "even":
        return list(range(0, count, 2))
    if blocks == "odd":
        return list(range(1, count, 2))
    if blocks == "all":
        return list(range(count))
    chosen = sorted(set(int(b) for b in blocks))
    bad = [b for b in chosen if not 0 <= b < count]
    if bad or not chosen:
        raise ConfigError(
            f"method.blocks: {list(blocks)} must be block indices in 0..{count - 1} (the model has "
            f"{count} adaptable layers)"
        )
    return chosen


def inject_mixture(
    model: nn.Module,
    kind: ExpertKind = "kadaptation",
    ranks: Sequence[int] = (1, 2, 4, 8),
    blocks: str | Sequence[int] = "even",
    target: str = DEFAULT_QKV_TARGET,
    projection_dim: int = 256,
    kron_dim: int = 64,
    kron_dropout: float = 0.0,
) -> dict[int, str]:
    """Wrap the ``target`` layer of the chosen blocks of ``model`` in ``MixtureOfAdapters``, in place.

    The matches of ``target`` are taken in module order, one per block. KAdaptation experts of all
    layers share one ``KroneckerRules`` (registered under each layer; the optimiser sees it once).

    Returns:
        ``{block index: layer name}``.
    """
    names = select_linear_layers(model, [target], option="method.target")
    chosen = {index: names[index] for index in choose_blocks(len(names), blocks)}
    rules = None

    def make_experts(in_features: int, out_features: int) -> nn.Module:
        nonlocal rules
        if kind == "lora":
            return LoRAExperts(in_features, out_features, ranks)
        rules = rules if rules is not None else KroneckerRules(kron_dim)
        return KAdaptationExperts(in_features, out_features, ranks, rules, kron_dropout)

    def linear(base: nn.Linear) -> MixtureOfAdapters:
        layer = MixtureOfAdapters(base, make_experts(base.in_features, base.out_features), len(ranks), projection_dim)
        return layer.to(base.weight.device)  # the base's own tensors are already there

    def in_proj(in_features: int, out_features: int, device: torch.device, dtype: torch.dtype) -> MixtureUpdate:
        experts = make_experts(in_features, out_features)
        return MixtureUpdate(in_features, out_features, experts, len(ranks), projection_dim).to(device)

    for name in chosen.values():
        attach(model, name, linear, in_proj)
    return chosen


def mixture_layers(model: nn.Module) -> dict[str, MixtureUpdate]:
    """Every routed layer (``MixtureOfAdapters`` and attention ``in_proj`` updates), by name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, MixtureUpdate)}
