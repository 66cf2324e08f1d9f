"""A class-token ViT's embedding with its last block run for the class token alone.

A ViT that pools its class token (timm ``global_pool='token'``, OpenCLIP ``pool_type='tok'`` without
an attention pooler) reads one row of its last block's output. That row needs the other tokens only as
the keys and values of the last attention; its query, the attention output, the output projection and
the MLP are per-token, so running them for the class token alone computes the same embedding (up to
float rounding) at about a fifth of the last block's cost. Everything before the last block runs
unchanged, through the model's own modules, so hooks on those modules (``robustft.cam``'s attention
capture, adapters) still see their calls; the last attention then yields only its class-token row
``[B, heads, 1, L]``, the one row the attention rollout's ``R[CLS]`` reads from the last block.

Supported: timm ``VisionTransformer`` with a plain ``Block`` / ``Attention`` last block, and OpenCLIP's
``VisionTransformer`` with its default ``ResidualAttentionBlock`` (a plain batch-first
``nn.MultiheadAttention``, not an adapted subclass), each inside a plain ``ImageClassifier``. Anything else
(another pooling, custom blocks, gradient checkpointing, hooks on a module whose forward is skipped, a
subclass that overrides a forward) falls back to the model's own forward.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from robustft.backbones.classifier import ImageClassifier


class _Path(NamedTuple):
    """The ViT a class-token forward walks and which library's it is (``timm`` or ``open_clip``)."""

    vit: nn.Module
    kind: str  # "timm" or "open_clip"


def _hooked(*modules: nn.Module) -> bool:
    return any(module._forward_hooks or module._forward_pre_hooks for module in modules)


def _timm_path(vit: nn.Module) -> _Path | None:
    """A timm ViT whose head reads the class token and whose last block this module can split."""
    if not isinstance(vit, VisionTransformer) or vit.cls_token is None or vit.attn_pool is not None:
        return None
    if vit.global_pool != "token" or vit.grad_checkpointing or not isinstance(vit.blocks, nn.Sequential):
        return None
    if type(vit).forward is not VisionTransformer.forward or (
        type(vit).forward_features is not VisionTransformer.forward_features
    ):
        return None
    last = vit.blocks[-1]
    if type(last) is not Block or type(last.attn) is not Attention or getattr(last.attn, "gate", None) is not None:
        return None
    return None if _hooked(vit, vit.blocks, last, last.attn) else _Path(vit, "timm")


def _open_clip_path(encoder: nn.Module) -> _Path | None:
    """OpenCLIP's image tower (``OpenClipImageEncoder``) with class-token pooling and default blocks."""
    transformer_module = sys.modules.get("open_clip.transformer")  # an OpenCLIP model means it is imported
    if transformer_module is None:
        return None
    from robustft.backbones.open_clip_backbone import OpenClipImageEncoder

    if type(encoder) is not OpenClipImageEncoder:
        return None
    visual = encoder.visual
    if type(visual) is not transformer_module.VisionTransformer or visual.attn_pool is not None:
        return None
    transformer = visual.transformer
    if visual.pool_type != "tok" or not transformer.batch_first or transformer.grad_checkpointing:
        return None
    last = transformer.resblocks[-1]
    if type(last) is not transformer_module.ResidualAttentionBlock or hasattr(last, "ln_1_kv"):
        return None
    # a subclass (an adapted attention) may run self-attention only, not the class token's query
    if type(last.attn) is not nn.MultiheadAttention or not last.attn.batch_first:
        return None
    if _hooked(encoder, visual, transformer, last):
        return None
    return _Path(visual, "open_clip")


def class_token_path(model: nn.Module) -> _Path | None:
    """The backbone walk of ``class_token_embedding``, or None when ``model`` needs its own forward."""
    if type(model) is not ImageClassifier or _hooked(model):
        return None
    return _timm_path(model.backbone) or _open_clip_path(model.backbone)


def _timm_query_key_value(attn: Attention, normed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The class token's query and every token's key and value, ``[B, heads, 1 or L, head_dim]``.

    A plain ``nn.Linear`` ``qkv`` (rows: queries, keys, values) is applied as two products, the query rows
    on the class token only; any other layer (an adapter's) is called as a module and its query sliced.
    """
    batch, length, _ = normed.shape
    heads, head_dim, dim = attn.num_heads, attn.head_dim, attn.attn_dim
    if type(attn.qkv) is nn.Linear and not _hooked(attn.qkv):
        weight, bias = attn.qkv.weight, attn.qkv.bias
        query = F.linear(normed[:, :1], weight[:dim], None if bias is None else bias[:dim])
        key_value = F.linear(normed, weight[dim:], None if bias is None else bias[dim:])
        key, value = key_value.reshape(batch, length, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return query.reshape(batch, 1, heads, head_dim).transpose(1, 2), key, value
    query, key, value = attn.qkv(normed).reshape(batch, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return query[:, :, :1], key, value


def _timm_class_token_block(block: Block, tokens: Tensor) -> Tensor:
    """timm ``Block.forward`` for the class token's row only: ``[B, L, D]`` -> ``[B, 1, D]``.

    The block's own submodules, called in the order of ``Block.forward`` / ``Attention.forward``.
    """
    attn = block.attn
    query, key, value = _timm_query_key_value(attn, block.norm1(tokens))
    query, key = attn.q_norm(query), attn.k_norm(key)
    if attn.fused_attn:
        dropout = attn.attn_drop.p if attn.training else 0.0
        mixed = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout)
    else:
        weights = ((query * attn.scale) @ key.transpose(-2, -1)).softmax(dim=-1)
        mixed = attn.attn_drop(weights) @ value
    mixed = attn.norm(mixed.transpose(1, 2).reshape(tokens.shape[0], 1, attn.attn_dim))
    cls = tokens[:, :1] + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(mixed))))
    return cls + block.drop_path2(block.ls2(block.mlp(block.norm2(cls))))


def _open_clip_class_token_block(block: nn.Module, tokens: Tensor) -> Tensor:
    """OpenCLIP ``ResidualAttentionBlock.forward`` for the class token's row: its query attends to all tokens."""
    normed = block.ln_1(tokens)
    cls = tokens[:, :1] + block.ls_1(block.attention(q_x=normed[:, :1], k_x=normed, v_x=normed))
    return cls + block.ls_2(block.mlp(block.ln_2(cls)))


def _timm_embedding(vit: VisionTransformer, images: Tensor) -> Tensor:
    """``vit(images)`` (``forward_features`` then ``forward_head``), the last block on the class token."""
    tokens = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
    for block in vit.blocks[:-1]:
        tokens = block(tokens)
    return vit.forward_head(vit.norm(_timm_class_token_block(vit.blocks[-1], tokens)))


def _open_clip_embedding(visual: nn.Module, images: Tensor) -> Tensor:
    """OpenCLIP ``VisionTransformer.forward`` (pooled output), the last block on the class token."""
    tokens = visual._embeds(images)
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        tokens = block(tokens)
    pooled, _ = visual._pool(_open_clip_class_token_block(blocks[-1], tokens))
    return pooled @ visual.proj if visual.proj is not None else pooled


def _embedding_along(path: _Path, images: Tensor) -> Tensor:
    if path.kind == "timm":
        return _timm_embedding(path.vit, images)
    return _open_clip_embedding(path.vit, images)


def class_token_embedding(model: nn.Module, images: Tensor) -> Tensor:
    """``model.image_embedding(images)`` with the last block run for the class token only (module docstring).

    Falls back to ``model.image_embedding`` when ``class_token_path`` finds no supported ViT.
    """
    path = class_token_path(model)
    return model.image_embedding(images) if path is None else _embedding_along(path, images)


def class_token_logits(model: nn.Module, images: Tensor) -> Tensor:
    """``model(images)`` through ``class_token_embedding`` (or ``model(images)`` itself when unsupported)."""
    path = class_token_path(model)
    return model(images) if path is None else model.logits_from_features([_embedding_along(path, images)])
