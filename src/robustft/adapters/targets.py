"""Which layers an adapter wraps: projections chosen by name patterns.

timm ViTs compute attention through ``blocks[i].attn.qkv`` and ``blocks[i].attn.proj``, both
``nn.Linear``, so an adapter replaces the module. OpenCLIP's default blocks use
``nn.MultiheadAttention``, whose fused q/k/v projection (``in_proj_weight``) has no module; it is
offered as the layer ``<attention>.in_proj``, its output projection as ``<attention>.out_proj``, and
the attention is switched to ``robustft.adapters.attention.AdaptedMultiheadAttention`` when one of
them is adapted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from robustft.adapters.attention import IN_PROJ, AdaptedMultiheadAttention, adapt_multihead, unsupported_reason
from robustft.errors import ConfigError, UnsupportedModelError

DEFAULT_LORA_TARGETS = (r"attn\.(qkv|in_proj)$", r"attn\.(proj|out_proj)$")
DEFAULT_QKV_TARGET = r"attn\.(qkv|in_proj)$"


def adaptable_layers(model: nn.Module) -> list[str]:
    """Names of every layer an adapter can take, in module order: ``nn.Linear`` modules and, for each
    ``nn.MultiheadAttention``, its fused projection ``<name>.in_proj`` (before its ``out_proj``)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            names.append(f"{name}.{IN_PROJ}" if name else IN_PROJ)
        elif isinstance(module, nn.Linear):
            names.append(name)
    return names


def multihead_owner(model: nn.Module, name: str) -> nn.MultiheadAttention | None:
    """The ``nn.MultiheadAttention`` whose ``in_proj`` / ``out_proj`` ``name`` is, else None."""
    parent_name, _, child = name.rpartition(".")
    if child not in (IN_PROJ, "out_proj"):
        return None
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        return None
    return parent if isinstance(parent, nn.MultiheadAttention) else None


def is_adaptable(model: nn.Module, name: str) -> bool:
    """Whether ``name`` is a layer ``adaptable_layers`` lists (a saved adapter's layer exists in ``model``)."""
    if multihead_owner(model, name) is not None:
        return True
    try:
        return isinstance(model.get_submodule(name), nn.Linear)
    except AttributeError:
        return False


def select_linear_layers(model: nn.Module, patterns: Sequence[str], option: str = "method.target_modules") -> list[str]:
    """Names of the adaptable layers of ``model`` (``adaptable_layers``) matching one of ``patterns`` (``re.search``).

    Raises:
        ConfigError: a bad regular expression, or no layer matched (the message shows names that exist).
        UnsupportedModelError: a match is the projection of an ``nn.MultiheadAttention`` this package
            cannot run with adapters (separate q/k/v weights, bias_kv, zero attention).
    """
    try:
        compiled = [re.compile(pattern) for pattern in patterns]
    except re.error as error:
        raise ConfigError(f"{option}: invalid regular expression {error.pattern!r} ({error})") from None
    candidates = adaptable_layers(model)
    names = [name for name in candidates if any(pattern.search(name) for pattern in compiled)]
    for name in names:
        owner = multihead_owner(model, name)
        reason = None if owner is None or isinstance(owner, AdaptedMultiheadAttention) else unsupported_reason(owner)
        if reason is not None:
            raise UnsupportedModelError(f"{option}: {name} belongs to an nn.MultiheadAttention with {reason}")
    if names:
        return names
    examples = ", ".join(candidates[:4]) or "none"
    raise ConfigError(
        f"{option}: no nn.Linear layer or attention projection of the model matches {list(patterns)} "
        f"(its layers include: {examples})"
    )


def attach(model: nn.Module, name: str, make_linear, make_in_proj) -> None:
    """Put an adapter at layer ``name``: ``make_linear(base nn.Linear)`` replaces an ``nn.Linear`` (an attention's
    ``out_proj`` included, the attention switched so that it calls it); ``make_in_proj(in_features, out_features,
    device, dtype)`` becomes the ``in_proj`` update of an attention's fused projection."""
    owner = multihead_owner(model, name)
    if owner is not None:
        attention = adapt_multihead(owner, name.rpartition(".")[0])
        if name.rpartition(".")[2] == IN_PROJ:
            if attention.in_proj is not None:
                raise ValueError(f"{name} already has an adapter")
            weight = attention.in_proj_weight
            attention.in_proj = make_in_proj(weight.shape[1], weight.shape[0], weight.device, weight.dtype)
            return
    replace_module(model, name, make_linear(model.get_submodule(name)))


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted path ``name`` of ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
