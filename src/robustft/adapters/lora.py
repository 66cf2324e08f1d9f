"""LoRA layers (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, arXiv:2106.09685).

A frozen linear map ``W x + b`` gains a trainable low-rank update, eq. (3) of the paper:

    h = W x + b + (alpha / r) * B A dropout(x),    A: r x in (Kaiming uniform),  B: out x r (zeros)

so at initialisation (``B = 0``) the model is exactly the pretrained one. ``LoRALinear`` *is* an
``nn.Linear`` holding the original ``weight``/``bias`` parameters under their original names plus
``lora_A``/``lora_B``; ``merge_lora`` folds ``W + (alpha/r) B A`` back into plain ``nn.Linear``
modules, so the final model has the run's original architecture and costs nothing extra at inference
(WiSE-FT, output ensembles and soups consume it like any fine-tuned run).

``nn.MultiheadAttention`` (OpenCLIP) has no module for its fused q/k/v projection: there ``LoRAUpdate``
holds ``lora_A``/``lora_B`` as the attention's ``in_proj`` and adds the same update to the projection's
output (``robustft.adapters.attention``); its ``out_proj`` takes a ``LoRALinear`` like any linear layer.
Merging folds the updates into ``in_proj_weight`` / ``out_proj.weight`` and gives back a plain
``nn.MultiheadAttention``: the state-dict keys are the pretrained model's.

Speed: the update is added inside the second GEMM (``torch.addmm(base, x A^T, B^T, alpha=alpha/r)``),
so there is no separate scale or add kernel over the ``[tokens, out]`` output, and no per-layer Python
dispatch beyond two ``F.linear`` calls and one ``addmm`` (peft's ``Linear`` adds dtype casts, adapter
loops and a scaled add; ``benchmarks/adapters_step.py`` compares them).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustft.adapters.attention import restore_multihead
from robustft.adapters.targets import attach, is_adaptable, multihead_owner, replace_module, select_linear_layers
from robustft.backbones.checkpoint_files import load_state_dict_file, load_state_dict_strict, save_state_dict_file
from robustft.errors import CheckpointError
from robustft.files import atomic_write

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_FORMAT = "robustft-lora/1"


class LoRALinear(nn.Linear):
    """``nn.Linear`` with a LoRA update; shares (does not copy) the base layer's ``weight`` and ``bias``.

    Args:
        base: the layer to adapt; its parameters become this module's ``weight`` and ``bias``.
        rank: ``r``, the rank of ``B A``.
        alpha: the update is scaled by ``alpha / r`` (so changing ``r`` does not change the step size).
        dropout: dropout on the adapter's input only (the base path sees the clean input).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a weight we then throw away
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's (and peft's) init for A
        self.rank = rank
        self.alpha = float(alpha)
        self.scale = self.alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return add_low_rank(self, x, F.linear(x, self.weight, self.bias))

    def delta_weight(self) -> Tensor:
        """``(alpha / r) B A`` in the weight's dtype (computed in float32)."""
        return (self.scale * (self.lora_B.float() @ self.lora_A.float())).to(self.weight.dtype)

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function (eval mode): ``W + (alpha/r) B A``, same bias."""
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(self.weight + self.delta_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.weight.requires_grad_(self.weight.requires_grad)
        if self.bias is not None:
            linear.bias.requires_grad_(self.bias.requires_grad)
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


class LoRAUpdate(nn.Module):
    """The LoRA update of a projection without a module of its own (``nn.MultiheadAttention``'s fused
    ``in_proj_weight``): ``forward(x, projected)`` returns ``projected + (alpha / r) B A dropout(x)``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.in_features, self.out_features = in_features, out_features
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.rank = rank
        self.alpha = float(alpha)
        self.scale = self.alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor, projected: Tensor) -> Tensor:
        return add_low_rank(self, x, projected)

    def delta_weight(self) -> Tensor:
        """``(alpha / r) B A`` (float32 product, in the factors' dtype)."""
        return (self.scale * (self.lora_B.float() @ self.lora_A.float())).to(self.lora_A.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def add_low_rank(layer: LoRALinear | LoRAUpdate, x: Tensor, base: Tensor) -> Tensor:
    """``base + (alpha / r) B A dropout(x)``, the update added inside the second GEMM (``addmm``)."""
    hidden = F.linear(layer.dropout(x), layer.lora_A)
    update = torch.addmm(
        base.reshape(-1, layer.out_features), hidden.reshape(-1, layer.rank), layer.lora_B.t(), alpha=layer.scale
    )
    return update.view(base.shape)


def inject_lora(
    model: nn.Module,
    target_modules: Sequence[str],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    layers: Sequence[str] | None = None,
) -> list[str]:
    """Give the targeted layers of ``model`` a LoRA update in place; returns their names.

    ``nn.Linear`` layers become ``LoRALinear``; the fused projection of an ``nn.MultiheadAttention``
    (``<attention>.in_proj``) gets a ``LoRAUpdate``. ``layers`` (exact names, e.g. from a saved adapter)
    overrides the ``target_modules`` patterns.

    Raises:
        ConfigError: nothing matches or a bad pattern. UnsupportedModelError: an attention geometry
            that cannot be adapted (see ``targets``).
    """
    names = list(layers) if layers is not None else select_linear_layers(model, target_modules)

    def linear(base: nn.Module) -> LoRALinear:
        if isinstance(base, LoRALinear) or not isinstance(base, nn.Linear):
            raise ValueError(f"{type(base).__name__} is not a plain nn.Linear to adapt")
        return LoRALinear(base, rank, alpha, dropout)

    def in_proj(in_features: int, out_features: int, device: torch.device, dtype: torch.dtype) -> LoRAUpdate:
        return LoRAUpdate(in_features, out_features, rank, alpha, dropout, device, dtype)

    for name in names:
        attach(model, name, linear, in_proj)
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear | LoRAUpdate]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear | LoRAUpdate)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight; the model becomes one of its original architecture."""
    for name, layer in lora_layers(model).items():
        if isinstance(layer, LoRALinear):
            replace_module(model, name, layer.merged())
            continue
        attention = multihead_owner(model, name)
        weight = attention.in_proj_weight
        with torch.no_grad():
            merged = weight + layer.delta_weight().to(weight.dtype)
        attention.in_proj_weight = nn.Parameter(merged, requires_grad=weight.requires_grad)
        attention.in_proj = None
    for module in model.modules():
        restore_multihead(module)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapter tensors (``<layer>.lora_A`` / ``<layer>.lora_B``): what ``save_adapter`` writes."""
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{name}.lora_A"] = layer.lora_A.detach()
        state[f"{name}.lora_B"] = layer.lora_B.detach()
    return state


def save_adapter(
    model: nn.Module, path: str | Path, include: Sequence[str] = (), extra: dict[str, Any] | None = None
) -> Path:
    """Write the adapters of ``model`` to ``path`` (safetensors) and their settings to ``path`` + ``.json``.

    ``include`` names modules saved whole beside the adapters (the trained ``head``). The pair is a
    few MB for a ViT-B (rank 8 on qkv and proj: 1.2M parameters) and is enough to rebuild the adapted
    model from the pretrained one (``apply_adapter``).
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no LoRA layers")
    first = next(iter(layers.values()))
    meta = {
        "format": ADAPTER_FORMAT,
        "rank": first.rank,
        "alpha": first.alpha,
        "dropout": first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0,
        "layers": list(layers),
        "include": list(include),
        **(extra or {}),
    }
    state = lora_state_dict(model)
    for module_name in include:
        state |= {f"{module_name}.{key}": value for key, value in model.get_submodule(module_name).state_dict().items()}
    path = Path(path)
    save_state_dict_file(state, path)
    atomic_write(meta_path(path), lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
    return path


def meta_path(path: str | Path) -> Path:
    return Path(f"{path}.json")


def load_adapter(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and settings ``save_adapter`` wrote.

    Raises:
        CheckpointError: a missing or unreadable file, or a settings file of another format.
    """
    state = load_state_dict_file(path)
    sidecar = meta_path(path)
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{sidecar}: cannot read the adapter settings ({error})") from None
    if meta.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{sidecar}: format {meta.get('format')!r} is not {ADAPTER_FORMAT!r}")
    return state, meta


def apply_adapter(model: nn.Module, path: str | Path, merge: bool = False) -> nn.Module:
    """Inject the saved adapter at ``path`` into ``model`` (the pretrained model it was trained on).

    With ``merge`` the result is a plain model with the updates folded in. Modules saved whole
    (``include``, e.g. the head) are loaded too.

    Raises:
        CheckpointError: the adapter names layers the model lacks, or its shapes do not match.
    """
    state, meta = load_adapter(path)
    missing = [name for name in meta["layers"] if not is_adaptable(model, name)]
    if missing:
        raise CheckpointError(f"{path}: adapter layers not found in the model: {missing[:3]}")
    inject_lora(model, (), meta["rank"], meta["alpha"], meta.get("dropout", 0.0), layers=meta["layers"])
    for name, layer in lora_layers(model).items():
        for key in ("lora_A", "lora_B"):
            tensor = state.get(f"{name}.{key}")
            target = getattr(layer, key)
            if tensor is None or tensor.shape != target.shape:
                got = None if tensor is None else tuple(tensor.shape)
                raise CheckpointError(f"{path}: {name}.{key} is {got}, the model needs {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(tensor)
    for module_name in meta.get("include", []):
        module = _get(model, module_name)
        prefix = f"{module_name}."
        saved = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
        if module is None:
            raise CheckpointError(f"{path}: saved module {module_name!r} is not in the model")
        load_state_dict_strict(module, saved, path, f"the model's {module_name}")
    return merge_lora(model) if merge else model


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
