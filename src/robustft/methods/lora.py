"""LoRA fine-tuning (Hu et al., ICLR 2022, arXiv:2106.09685): a frozen backbone with low-rank updates.

The backbone is frozen; the chosen linear layers (default: every attention ``qkv`` and ``proj``)
gain ``(alpha / r) B A`` (``robustft.adapters.lora``), and the head, initialised from the zero-shot
head as in FT, trains too (``train_head``). At ``finalize`` the updates are merged into the base
weights, so the saved model is a plain model of the run's architecture with no inference cost, and
WiSE-FT, output ensembles and soups take a LoRA run like any fine-tuned run. The adapters (and the
trained head) are also written alone to ``<run_dir>/adapter.safetensors`` + ``.json`` (a small file;
``robustft.adapters.apply_adapter`` puts them back on the pretrained model).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator
from torch import nn

from robustft.adapters import ADAPTER_FILE, DEFAULT_LORA_TARGETS, inject_lora, merge_lora, save_adapter
from robustft.adapters.targets import select_linear_layers
from robustft.config import MethodConfig
from robustft.errors import ConfigError
from robustft.methods.base import Method, RunContext, register_method


class LoraConfig(MethodConfig):
    rank: int = Field(8, ge=1, description="rank r of each update B A")
    alpha: float = Field(16.0, gt=0, description="the update is scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input")
    target_modules: list[str] = Field(
        list(DEFAULT_LORA_TARGETS), description="regexes (re.search) of the nn.Linear layers adapted"
    )
    train_head: bool = Field(True, description="train the head (initialised from the zero-shot head)")
    save_adapter: bool = Field(True, description="also write the adapters alone to <run_dir>/adapter.safetensors")

    @field_validator("target_modules")
    @classmethod
    def _not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("needs at least one pattern")
        return value


@register_method
class Lora(Method):
    """LoRA (docs/methods.md, `lora`): low-rank adapters on chosen linear layers, merged at the end."""

    name = "lora"
    config_cls = LoraConfig

    def check_model(self, model: nn.Module, model_spec: dict[str, Any]) -> str | None:
        """The adapter target finder's answer: does any layer of ``model`` match ``target_modules``?"""
        try:
            select_linear_layers(model, self.config.target_modules)
        except ConfigError as error:
            return str(error)
        return None

    def prepare(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        cfg = self.config
        model.requires_grad_(False)
        layers = inject_lora(model, cfg.target_modules, cfg.rank, cfg.alpha, cfg.dropout)
        model.head.requires_grad_(cfg.train_head)
        ctx.extras["adapted_layers"] = len(layers)
        ctx.extras["adapter_params"] = sum(
            p.numel() for name, p in model.named_parameters() if name.endswith(("lora_A", "lora_B"))
        )
        return model

    def finalize(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        cfg = self.config
        if cfg.save_adapter:
            include = ["head"] if cfg.train_head else []
            save_adapter(
                model, ctx.run_dir / ADAPTER_FILE, include=include, extra={"target_modules": cfg.target_modules}
            )
        model = merge_lora(model)
        return model.requires_grad_(False)
