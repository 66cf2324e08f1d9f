"""Adapters inside ``nn.MultiheadAttention``, OpenCLIP's default attention.

``nn.MultiheadAttention`` hands its fused ``in_proj_weight`` and its ``out_proj.weight`` straight to
``F.multi_head_attention_forward``: no submodule's ``forward`` runs, so a wrapped ``out_proj`` would be
silently ignored, and the fused q/k/v projection has no module at all. ``AdaptedMultiheadAttention``
is the same module (same parameters under the same names, switched in place like ``torch.nn.utils.parametrize``
does) whose self-attention forward runs the projections itself: ``out_proj`` through its ``forward``,
and the fused projection ``in_proj_weight x + in_proj_bias`` followed by an optional ``in_proj`` module
that adds its update to that output (a LoRA update in the same GEMM as timm's ``qkv`` LoRA, or a routed
mixture of adapters). With no adapter attached it computes what ``nn.MultiheadAttention`` computes
(``scaled_dot_product_attention``, or the explicit softmax when the weights are asked for, which
``robustft.cam`` does). ``restore_multihead`` switches a module back once its adapters are merged.

Adapter layer names: ``<attention>.in_proj`` (the fused q/k/v projection, timm's ``qkv``) and
``<attention>.out_proj`` (timm's ``proj``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustft.errors import UnsupportedModelError

IN_PROJ = "in_proj"


def unsupported_reason(module: nn.MultiheadAttention) -> str | None:
    """Why ``module`` cannot take adapters (None when it can): only plain self-attention geometry is run here."""
    if not module._qkv_same_embed_dim:
        return "separate q/k/v projection weights (kdim/vdim differ from embed_dim)"
    if module.bias_k is not None or module.add_zero_attn:
        return "add_bias_kv / add_zero_attn"
    if type(module) not in (nn.MultiheadAttention, AdaptedMultiheadAttention):
        return f"type {type(module).__name__} (already parametrized or a subclass)"
    return None


class AdaptedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose projections run through modules, so adapters reach them (see module docs).

    Attributes:
        in_proj: None, or a module ``(tokens, projected) -> projected + update`` applied to the fused q/k/v
            projection of the tokens (``projected``: ``[batch * length, 3 * dim]``, which it may update in place).
    """

    in_proj: nn.Module | None

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if key_padding_mask is not None or not (query is key and key is value):
            raise UnsupportedModelError(
                "an adapted nn.MultiheadAttention runs self-attention only (query is key is value, no key_padding_mask)"
            )
        tokens = query if self.batch_first else query.transpose(0, 1)
        batch, length, dim = tokens.shape
        # 2-D (tokens flattened), a fresh tensor and not a view: an ``in_proj`` may add into it in place.
        projected = F.linear(tokens.reshape(batch * length, dim), self.in_proj_weight, self.in_proj_bias)
        if self.in_proj is not None:
            projected = self.in_proj(tokens, projected)
        heads, head_dim = self.num_heads, dim // self.num_heads
        q, k, v = projected.view(batch, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        bias = _additive_mask(attn_mask, is_causal, batch, heads, length, q.dtype, q.device)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * head_dim**-0.5) @ k.transpose(-2, -1)
            weights = (scores + bias if bias is not None else scores).softmax(dim=-1)
            context = F.dropout(weights, dropout) @ v if dropout > 0 else weights @ v
        else:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
        output = self.out_proj(context.transpose(1, 2).reshape(batch, length, dim))
        if not self.batch_first:
            output = output.transpose(0, 1)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        return output, weights


def _additive_mask(
    mask: Tensor | None, is_causal: bool, batch: int, heads: int, length: int, dtype: torch.dtype, device: torch.device
) -> Tensor | None:
    """``nn.MultiheadAttention``'s ``attn_mask`` (``[L, L]`` or ``[B*heads, L, L]``; bool True = blocked) as an
    additive float mask broadcastable to ``[B, heads, L, L]``."""
    if mask is None and is_causal:
        mask = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(mask, float("-inf"))
    mask = mask.to(dtype)
    return mask.view(batch, heads, length, length) if mask.ndim == 3 else mask


def adapt_multihead(module: nn.MultiheadAttention, name: str = "") -> AdaptedMultiheadAttention:
    """Switch ``module`` to ``AdaptedMultiheadAttention`` in place (parameters and their names unchanged).

    Raises:
        UnsupportedModelError: a geometry this forward does not run (see ``unsupported_reason``).
    """
    if isinstance(module, AdaptedMultiheadAttention):
        return module
    reason = unsupported_reason(module)
    if reason is not None:
        raise UnsupportedModelError(f"{name or 'nn.MultiheadAttention'}: cannot adapt an attention with {reason}")
    module.__class__ = AdaptedMultiheadAttention
    module.register_module(IN_PROJ, None)
    return module


def restore_multihead(module: nn.Module) -> None:
    """Back to plain ``nn.MultiheadAttention`` when nothing is attached any more (after a merge)."""
    if not isinstance(module, AdaptedMultiheadAttention) or module.in_proj is not None:
        return
    if type(module.out_proj) not in (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return
    del module._modules[IN_PROJ]
    module.__class__ = nn.MultiheadAttention
