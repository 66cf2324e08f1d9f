"""Adapter layers shared by the LoRA and mixture-of-adapters methods (and their benchmarks)."""

from robustft.adapters.lora import (
    ADAPTER_FILE,
    LoRALinear,
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
    Routing,
    cv_squared,
    inject_mixture,
    load_balancing_loss,
    mixture_layers,
    route_top1,
)
from robustft.adapters.targets import DEFAULT_LORA_TARGETS, DEFAULT_QKV_TARGET, select_linear_layers

__all__ = [
    "ADAPTER_FILE", "DEFAULT_LORA_TARGETS", "DEFAULT_QKV_TARGET", "CosineRouter", "KAdaptationExperts",
    "KroneckerRules", "LoRAExperts", "LoRALinear", "MixtureOfAdapters", "Routing", "apply_adapter", "cv_squared",
    "inject_lora", "inject_mixture", "load_adapter", "load_balancing_loss", "lora_layers", "lora_state_dict",
    "merge_lora", "mixture_layers", "route_top1", "save_adapter", "select_linear_layers",
]  # fmt: skip
