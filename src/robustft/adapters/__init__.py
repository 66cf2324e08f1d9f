"""Adapter layers shared by the LoRA and mixture-of-adapters methods (and their benchmarks)."""

from robustft.adapters.attention import AdaptedMultiheadAttention, adapt_multihead, restore_multihead
from robustft.adapters.lora import (
    ADAPTER_FILE,
    LoRALinear,
    LoRAUpdate,
    apply_adapter,
    inject_lora,
    load_adapter,
    lora_layers,
    lora_state_dict,
    merge_lora,
    save_adapter,
)
from robustft.adapters.mixture import (
    CosineRouter,
    KAdaptationExperts,
    KroneckerRules,
    LoRAExperts,
    MixtureOfAdapters,
    MixtureUpdate,
    Routing,
    cv_squared,
    inject_mixture,
    load_balancing_loss,
    mixture_layers,
    route_top1,
)
from robustft.adapters.targets import (
    DEFAULT_LORA_TARGETS,
    DEFAULT_QKV_TARGET,
    adaptable_layers,
    select_linear_layers,
)

__all__ = [
    "ADAPTER_FILE", "AdaptedMultiheadAttention", "LoRAUpdate", "MixtureUpdate", "adapt_multihead",
    "adaptable_layers", "restore_multihead", "DEFAULT_LORA_TARGETS", "DEFAULT_QKV_TARGET", "CosineRouter",
    "KAdaptationExperts",
    "KroneckerRules", "LoRAExperts", "LoRALinear", "MixtureOfAdapters", "Routing", "apply_adapter", "cv_squared",
    "inject_lora", "inject_mixture", "load_adapter", "load_balancing_loss", "lora_layers", "lora_state_dict",
    "merge_lora", "mixture_layers", "route_top1", "save_adapter", "select_linear_layers",
]  # fmt: skip
