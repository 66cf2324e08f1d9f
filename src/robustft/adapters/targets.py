"""Which layers an adapter wraps: ``nn.Linear`` modules chosen by name patterns.

timm ViTs compute attention through ``blocks[i].attn.qkv`` and ``blocks[i].attn.proj``, both
``nn.Linear``, so an adapter can replace the module. OpenCLIP's default blocks use
``nn.MultiheadAttention``, which reads its fused ``in_proj_weight`` and ``out_proj.weight`` inside
``F.multi_head_attention_forward`` and never calls a submodule's ``forward``: a wrapped ``out_proj``
would be silently ignored. Such layers are refused with a one-line error that names the layer type.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from robustft.errors import ConfigError, UnsupportedModelError

DEFAULT_LORA_TARGETS = (r"attn\.qkv$", r"attn\.proj$")
DEFAULT_QKV_TARGET = r"attn\.qkv$"
_TIMM_HINT = (
    "load the weights as a timm ViT whose attention uses nn.Linear qkv/proj "
    "(e.g. model.source: timm, name: vit_base_patch16_clip_224.laion2b)"
)


def select_linear_layers(model: nn.Module, patterns: Sequence[str], option: str = "method.target_modules") -> list[str]:
    """Names of the ``nn.Linear`` modules of ``model`` whose full name matches one of ``patterns`` (``re.search``).

    Raises:
        UnsupportedModelError: a match lives inside ``nn.MultiheadAttention`` (its forward bypasses
            submodules), or nothing matched and the model's attention is ``nn.MultiheadAttention``.
        ConfigError: a bad regular expression, or no layer matched.
    """
    try:
        compiled = [re.compile(pattern) for pattern in patterns]
    except re.error as error:
        raise ConfigError(f"{option}: invalid regular expression {error.pattern!r} ({error})") from None
    multihead = {name for name, module in model.named_modules() if isinstance(module, nn.MultiheadAttention)}
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not any(p.search(name) for p in compiled):
            continue
        parent = name.rpartition(".")[0]
        if parent in multihead:
            raise UnsupportedModelError(
                f"{option}: {name} belongs to nn.MultiheadAttention, which bypasses its forward; {_TIMM_HINT}"
            )
        names.append(name)
    if names:
        return names
    if multihead:
        first = sorted(multihead)[0]
        raise UnsupportedModelError(
            f"{option}: no nn.Linear matches {list(patterns)}; {first} is nn.MultiheadAttention (fused "
            f"in_proj_weight, not supported); {_TIMM_HINT}"
        )
    raise ConfigError(f"{option}: no nn.Linear layer of the model matches {list(patterns)}")


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted path ``name`` of ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
