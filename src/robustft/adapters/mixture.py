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

The router's cosine is computed in one of two equal forms, the cheaper by shape: from the projection ``P x + b``,
or (where ``D + E + 1 < 256``, e.g. width 128) from one GEMM of the tokens with ``[P^T P | P^T m | 2 P^T b]``,
which gives ``|P x + b|^2`` and the numerators without forming ``P x`` (``gram_cosine``).

Dispatch is batched over tokens, with no per-expert Python loop. LoRA: every expert's low-rank
factors are concatenated, the gate (one-hot times ``g``) is expanded to the concatenated rank columns,
and the mixed update is two small GEMMs (total rank 15: about one rank-15 adapter), the second an ``addmm``
into the projection. KAdaptation on the CPU: the explicit ``H_e`` (``E x in x out``, built from the factors
in one einsum, a few MFLOP) and one grouped GEMM (``torch.nn.functional.grouped_mm``) over the tokens sorted
by their expert, so each token is multiplied by its own expert's matrix only (``g`` scales its inputs); the
bias and the routed rows are added into the frozen projection's output in place.
This costs one frozen projection's GEMM forward and two backward; the factored form, ``x H_e = sum_i v_i
kron ((u_i^T X) L_ei R'_ei)`` with ``X`` the ``n x in/n`` reshape of ``x``, has as many FLOPs but streams
``n x rank`` floats per token through memory and was ~5x slower than the projection it adapts at width 128.
The factored form is kept where grouped GEMMs are not available (other devices, feature counts that are not
multiples of 4). The official code also applies dropout 0.5 to ``H_e`` in training (``kron_dropout``,
default 0): the dropped matrices then go through the same dispatch (the factored path evaluates all
experts densely in that case).
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
    """Per-token logits ``exp(min(t, log 100)) * cos(P x + b, m_e)`` over ``num_experts`` experts.

    Two equal forms, the cheaper chosen by shape (``gram_form``): the projection form computes ``P x + b``
    (``[N, projection_dim]``) and divides its ``[N, E]`` dot products with the normalised keys by ``|P x + b|``;
    the Gram form (``gram_cosine``) never forms ``P x``: one GEMM of the tokens with ``[P^T P | P^T m | 2 P^T b]``
    (``D + E + 1`` columns) gives ``|P x + b|^2`` and the numerators, so where ``D + E + 1 < projection_dim``
    (width 128 against the paper's 256) it does about half the projection form's FLOPs forward and backward.
    """

    def __init__(self, dim: int, num_experts: int, projection_dim: int = 256) -> None:
        super().__init__()
        self.projection = nn.Linear(dim, projection_dim)
        self.expert_embeddings = nn.Parameter(torch.randn(projection_dim, num_experts) * 0.01)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(2.0)))

    @property
    def gram_form(self) -> bool:
        """Whether ``gram_cosine`` is the cheaper form here (fewer GEMM columns than the projection)."""
        dim, num_experts = self.projection.in_features, self.expert_embeddings.shape[1]
        return dim + num_experts + 1 < self.projection.out_features

    def forward(self, tokens: Tensor) -> Tensor:
        keys = F.normalize(self.expert_embeddings, dim=0)  # m_e / |m_e|: [projection_dim, E], once per call
        if self.gram_form:
            similarity = gram_cosine(tokens, self.projection.weight, self.projection.bias, keys)
        else:
            # normalize(P x) @ m = (P x @ m) / |P x|: the division is on [N, E], not on the [N, 256] projection.
            projected = self.projection(tokens)
            norms = torch.linalg.vector_norm(projected, dim=-1, keepdim=True).clamp_min(1e-12)  # F.normalize's eps
            similarity = (projected @ keys) / norms
        return similarity * self.log_temperature.clamp(max=MAX_LOG_TEMPERATURE).exp()


def gram_cosine(tokens: Tensor, weight: Tensor, bias: Tensor, keys: Tensor) -> Tensor:
    """``cos(P x + b, k_e)`` for unit-norm keys ``k`` (``[projection_dim, E]``) without forming ``P x`` (``[N, E]``).

    ``|P x + b|^2 = x^T (P^T P) x + 2 x . (P^T b) + |b|^2`` and ``(P x + b) . k_e = x . (P^T k_e) + b . k_e``: one
    GEMM of the tokens with ``[P^T P | P^T k | 2 P^T b]`` gives all three token-dependent terms. Computed in fp32
    (autocast off): the quadratic form subtracts nearly equal terms when ``P x`` is close to ``-b``, which bf16
    would not resolve; ``F.normalize``'s eps bounds ``|P x + b|`` from below as in the projection form.
    """
    with torch.autocast(tokens.device.type, enabled=False):
        tokens, weight, bias, keys = tokens.float(), weight.float(), bias.float(), keys.float()
        dim, num_experts = tokens.shape[-1], keys.shape[1]
        fused = weight.t() @ torch.cat([weight, keys, 2 * bias.unsqueeze(1)], dim=1)  # [D, D + E + 1]
        gram_x, numerators, cross = (tokens @ fused).split([dim, num_experts, 1], dim=-1)
        squared = (gram_x * tokens).sum(-1, keepdim=True) + cross + bias.square().sum()
        return (numerators + bias @ keys) / squared.clamp_min(1e-24).sqrt()


@dataclass
class Routing:
    """Top-1 routing of ``N`` tokens over ``E`` experts.

    Attributes:
        expert: ``[N]`` chosen expert per token.
        gate: ``[N]`` the (noisy) softmax probability of the chosen expert.
        clean_probs: ``[N, E]`` softmax of the logits without noise (for the balancing loss).
    """

    expert: Tensor
    gate: Tensor
    clean_probs: Tensor

    @property
    def gates(self) -> Tensor:
        """``[N, E]``, zero except the chosen expert's column, which holds its gate ``g`` (built on demand: the
        grouped KAdaptation dispatch reads ``expert`` and ``gate`` only)."""
        return torch.zeros_like(self.clean_probs).scatter(1, self.expert.unsqueeze(1), self.gate.unsqueeze(1))


def route_top1(logits: Tensor, noise_std: float) -> Routing:
    """Noisy top-1 gating: ``argmax softmax(logits + N(0, noise_std^2))``, gated by that probability.

    ``noise_std = 0`` (evaluation) routes on the clean logits.
    """
    logits = logits.float()
    noisy = logits + torch.randn_like(logits) * noise_std if noise_std > 0 else logits
    probs = noisy.softmax(dim=-1)
    gate, expert = probs.max(dim=-1)
    clean = probs if noise_std == 0 else logits.softmax(dim=-1)
    return Routing(expert, gate, clean)


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

    def forward(self, tokens: Tensor, routing: Routing) -> Tensor:
        return F.linear(self._gated_hidden(tokens, routing), self.lora_B)

    def add_update(self, tokens: Tensor, routing: Routing, projected: Tensor) -> Tensor:
        """``projected + g B_e A_e x``, the update added inside the second GEMM (``addmm``, no ``[N, out]`` sum)."""
        hidden = self._gated_hidden(tokens, routing).to(projected.dtype)
        return torch.addmm(projected, hidden, self.lora_B.t().to(projected.dtype))

    def _gated_hidden(self, tokens: Tensor, routing: Routing) -> Tensor:
        """``A x`` (every expert's rank columns) times the top-1 gate on the chosen expert's columns, 0 elsewhere."""
        return F.linear(tokens, self.lora_A) * routing.gates[:, self.rank_owner].to(tokens.dtype)

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
        self.in_features, self.out_features = in_features, out_features
        self.rules = rules
        left = [_glorot(torch.empty(n, in_features // n, r)) for r in self.ranks]
        right = [_glorot(torch.empty(n, r, out_features // n)) for r in self.ranks]
        self.left = nn.Parameter(torch.cat(left, dim=2))
        self.right = nn.Parameter(torch.cat(right, dim=1))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.register_buffer("rank_owner", _rank_owner(self.ranks), persistent=False)

    def forward(self, tokens: Tensor, routing: Routing) -> Tensor:
        """The update ``g x H_e + bias`` of every token (``[N, out]``)."""
        return self.add_update(tokens, routing, tokens.new_zeros(tokens.shape[0], self.out_features))

    def add_update(self, tokens: Tensor, routing: Routing, projected: Tensor) -> Tensor:
        """``projected + g x H_e + bias`` (``[N, out]``). On the grouped path ``projected`` (a fresh projection
        output the caller hands over) is updated in place: the bias is added into it and the routed rows are
        index-added into it, so no ``[N, out]`` tensor besides the grouped GEMM's output is allocated, unsorted,
        gated or summed (on this CPU a fresh ``[N, out]`` buffer costs more in page faults than the add itself)."""
        dropout = self.dropout is not None and self.training
        if not grouped_dispatch_supported(tokens, self.in_features, self.out_features):
            return projected + self._dense_update(tokens, routing, dropout).to(projected.dtype)
        matrices = self.expert_matrices()
        matrices = (self.dropout(matrices) if dropout else matrices).to(tokens.dtype)
        order, ends = sort_by_expert(routing.expert, len(self.ranks))
        gated = tokens.index_select(0, order) * routing.gate.index_select(0, order).to(tokens.dtype).unsqueeze(1)
        routed = F.grouped_mm(gated, matrices.contiguous(), offs=ends)  # (g x) H_e = g (x H_e)
        return projected.add_(self.bias.to(projected.dtype)).index_add_(0, order, routed.to(projected.dtype))

    def _dense_update(self, tokens: Tensor, routing: Routing, dropout: bool) -> Tensor:
        if dropout:
            matrices = self.dropout(self.expert_matrices()).to(tokens.dtype)
            per_expert = torch.einsum("ti,eio->teo", tokens, matrices)
            return torch.einsum("teo,te->to", per_expert, routing.gates.to(tokens.dtype)) + self.bias.to(tokens.dtype)
        return self.factored_update(tokens, routing.gates)

    def factored_update(self, tokens: Tensor, gates: Tensor) -> Tensor:
        """The update without forming ``H_e``: ``sum_i v_i kron ((u_i^T X) L_ei R'_ei)``, every expert's columns
        computed and gated (``gates`` ``[N, E]``)."""
        n, count, dtype = self.rules.n, tokens.shape[0], tokens.dtype
        # Rule index i leads every intermediate, so each contraction is one GEMM or one bmm without copies.
        blocks = tokens.reshape(count, n, -1).transpose(0, 1).reshape(n, -1)  # X as [a, N * in/n]
        projected = (self.rules.u.to(dtype) @ blocks).view(n, count, -1)  # u_i^T X: [i, N, in/n]
        hidden = torch.bmm(projected, self.left.to(dtype))  # [i, N, sum r]
        hidden = hidden * gates[:, self.rank_owner].to(dtype)  # top-1 gate on the chosen expert's columns
        mixed = torch.bmm(hidden, self.right.to(dtype))  # [i, N, out/n]
        update = self.rules.v.t().to(dtype) @ mixed.view(n, -1)  # sum_i v_i kron (...): [c, N * out/n]
        return update.view(n, count, -1).transpose(0, 1).reshape(count, -1) + self.bias.to(dtype)

    def factor_products(self) -> Tensor:
        """``[n, E, in/n, out/n]``: ``L_ei R'_ei`` of every rule ``i`` and expert ``e`` (columns masked by owner)."""
        owner = F.one_hot(self.rank_owner, len(self.ranks)).t().to(self.left.dtype)  # [E, sum r]
        return (self.left.unsqueeze(1) * owner[None, :, None, :]) @ self.right.unsqueeze(1)

    def expert_matrices(self) -> Tensor:
        """``[E, in, out]``: the explicit ``H_e = sum_i R_i kron (L_ei R'_ei)`` (a token's update is
        ``x @ H_e + bias``); ``H_e[(a, b), (c, d)] = sum_i u_i[a] v_i[c] (L_ei R'_ei)[b, d]``."""
        matrices = torch.einsum("ia,ic,iebd->eabcd", self.rules.u, self.rules.v, self.factor_products())
        return matrices.reshape(len(self.ranks), self.in_features, self.out_features)


def grouped_dispatch_supported(tokens: Tensor, in_features: int, out_features: int) -> bool:
    """Whether KAdaptation's grouped dispatch runs here: CPU tensors (``grouped_mm`` documents bf16 on SM80+ CUDA
    only, so other devices keep the factored path) with 16-byte aligned rows (feature counts multiples of 4)."""
    return tokens.device.type == "cpu" and in_features % 4 == 0 and out_features % 4 == 0


def sort_by_expert(expert: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """Token order grouping the tokens by expert (stable) and the ``int32`` end of each expert's range.

    ``tokens[order]`` times ``grouped_mm(..., offs=ends)`` multiplies each token by its own expert's matrix
    only; the ranges stay a tensor (``offs``), nothing is read back to Python."""
    order = torch.argsort(expert, stable=True)
    return order, torch.bincount(expert, minlength=num_experts).cumsum(0).to(torch.int32)


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
    ``MixtureOfAdapters``. ``projected`` must be a fresh tensor the caller hands over: the KAdaptation experts
    add into it in place (a 2-D one is used as it is, so no view of it is modified). In training each forward
    stores ``aux_loss`` (the unweighted balancing loss of this layer) and ``expert_fractions`` (``[E]``, share
    of tokens routed to each expert) for the method's loss hook.
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
        rows = projected if projected.dim() == 2 else projected.reshape(-1, self.out_features)
        output = self.experts.add_update(tokens, routing, rows)
        if self.training:
            self.aux_loss = load_balancing_loss(routing.clean_probs, routing.gate, self.noise_std)
            self.expert_fractions = torch.bincount(routing.expert, minlength=self.num_experts) / routing.expert.numel()
        else:
            self.aux_loss = self.expert_fractions = None
        return output.view(projected.shape)

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
        # The projection of the flattened tokens is a fresh 2-D tensor, not a view, so the experts can add into it
        # in place without autograd copying the whole output gradient (CopySlices) in the backward.
        projected = F.linear(x.reshape(-1, self.in_features), self.weight, self.bias)
        return self.add_update(x, projected).view(*x.shape[:-1], self.out_features)

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
