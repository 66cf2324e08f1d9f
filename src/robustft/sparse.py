"""Sparse parameter updates: train a chosen subset of coordinates of chosen tensors.

Shared by SAFT (arXiv:2407.03036: a fixed top-k set chosen once) and GMixout (arXiv:2510.06982: a random active set
resampled every k steps). A chosen tensor ``W`` is replaced, through ``torch.nn.utils.parametrize``,
by a frozen dense *base* ``B`` plus a trainable 1-D ``values`` vector ``v`` at flat ``indices`` ``I``::

    W[i] = B[i]                          for i not in I
    W[I] = B[I] + c * (v - B[I])         (c = 1: W[I] = v exactly)

The optimiser is built from ``values`` only, so its state (AdamW: two moments) has ``|I|`` entries,
not ``W.numel()``; decoupled weight decay on ``values`` decays only the active entries, and the
inactive entries never change, bit for bit (the base is never written by the optimiser). Autograd
gives ``dL/dv = c * (dL/dW)[I]``, a gather of the dense gradient of ``W``: every inactive coordinate
receives no gradient and no update. ``merge_sparse`` removes the parametrizations and leaves plain
dense tensors under their original names, so the trained model is a model of the original
architecture with no inference overhead, loadable by plain timm / open_clip.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from robustft.errors import ConfigError

Scope = Literal["linear", "matrices", "all"]
NO_DECAY_SUFFIXES = ("pos_embed", "cls_token", "positional_embedding")


class SparseUpdate(nn.Module):
    """Parametrization ``B -> B`` with ``values`` written at ``indices`` (see the module docstring).

    Args:
        indices: flat indices into the tensor, unique (sorted is best for memory locality).
        values: initial values at ``indices`` (usually ``B.flatten()[indices]``).
        scale: ``c``; 1 writes ``values`` exactly (SAFT), ``1/(1-p)`` rescales as Mixout (GMixout).
        decay: whether the optimiser should apply weight decay to ``values`` (the tensor's own rule).
    """

    def __init__(self, indices: Tensor, values: Tensor, scale: float = 1.0, decay: bool = True) -> None:
        super().__init__()
        if indices.ndim != 1 or indices.shape != values.shape:
            raise ValueError(f"indices {tuple(indices.shape)} and values {tuple(values.shape)} must be equal 1-D")
        self.register_buffer("indices", indices.long())
        self.values = nn.Parameter(values.detach().clone())
        self.scale = float(scale)
        self.decay = decay

    def forward(self, base: Tensor) -> Tensor:
        flat = base.reshape(-1)
        active = self.values.to(base.dtype)
        if self.scale != 1.0:
            anchor = flat[self.indices]
            active = anchor + self.scale * (active - anchor)
        return flat.index_put((self.indices,), active).view_as(base)

    @property
    def num_active(self) -> int:
        return self.indices.numel()


def select_parameters(
    model: nn.Module, scope: Scope = "all", include: str = "", exclude: str | None = None
) -> list[str]:
    """Names of the parameters a sparse or mixing method acts on.

    Args:
        scope: ``linear``: weights of ``nn.Linear`` modules and the fused q/k/v ``in_proj_weight`` of
            ``nn.MultiheadAttention`` (OpenCLIP; timm's ``qkv`` is an ``nn.Linear``); ``matrices``: every
            parameter with two or more dimensions (linear and conv weights, position tables); ``all``: every parameter.
        include: regular expression the full name must match (``re.search``); empty: every name.
        exclude: regular expression of names to leave out.
    """
    linear = {f"{name}.weight" if name else "weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    linear |= {
        f"{name}.in_proj_weight" if name else "in_proj_weight"
        for name, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
    }
    names = []
    for name, parameter in model.named_parameters():
        in_scope = scope == "all" or (scope == "matrices" and parameter.ndim >= 2) or name in linear
        if in_scope and re.search(include, name) and not (exclude and re.search(exclude, name)):
            names.append(name)
    return names


def empty_selection(model: nn.Module, method: str, scope: Scope, include: str, exclude: str | None) -> str | None:
    """The one-line complaint when ``scope`` / ``include`` / ``exclude`` pick no tensor of ``model``, else None
    (a method's ``check_model``: the preflight names it before any training starts)."""
    if select_parameters(model, scope, include, exclude):
        return None
    return _nothing_selected(method, scope, include, exclude)


def selected_parameters(model: nn.Module, method: str, scope: Scope, include: str, exclude: str | None) -> list[str]:
    """``select_parameters``, refusing an empty selection with ``empty_selection``'s line."""
    names = select_parameters(model, scope, include, exclude)
    if not names:
        raise ConfigError(_nothing_selected(method, scope, include, exclude))
    return names


def _nothing_selected(method: str, scope: Scope, include: str, exclude: str | None) -> str:
    return (
        f"method.scope / method.include: {method} found no tensor for scope={scope!r} include={include!r} "
        f"exclude={exclude!r}"
    )


def decays(name: str, parameter: Tensor) -> bool:
    """The project's weight-decay rule (``default_parameter_groups``): matrices, not position tables."""
    return parameter.ndim >= 2 and not name.endswith(NO_DECAY_SUFFIXES)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, tensor_name = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), tensor_name


def sparsify(
    model: nn.Module,
    indices: dict[str, Tensor],
    scale: float = 1.0,
    factory: Callable[..., SparseUpdate] = SparseUpdate,
) -> dict[str, SparseUpdate]:
    """Replace each named tensor by a frozen base + trainable values at its indices (in place).

    Args:
        model: the model; its other parameters are left as they are (the caller freezes them or not).
        indices: parameter name -> flat indices to train.
        scale: ``c`` of every update (see the module docstring).
        factory: a ``SparseUpdate`` subclass to build (GMixout adds its dense weights buffer).

    Returns:
        parameter name -> its ``SparseUpdate`` module (the owner of ``values`` and ``indices``).
    """
    updates = {}
    for name, index in indices.items():
        module, tensor_name = _owner(model, name)
        parameter = getattr(module, tensor_name)
        index = index.to(parameter.device).long()
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= parameter.numel()):
            raise ValueError(f"{name}: indices out of range for {parameter.numel()} entries")
        update = factory(index, parameter.detach().reshape(-1)[index], scale=scale, decay=decays(name, parameter))
        parametrize.register_parametrization(module, tensor_name, update.to(parameter.device))
        module.parametrizations[tensor_name].original.requires_grad_(False)
        updates[name] = module.parametrizations[tensor_name][0]
    return updates


def sparse_updates(model: nn.Module) -> dict[str, SparseUpdate]:
    """Every ``SparseUpdate`` in the model, by the name of the tensor it parametrizes."""
    found = {}
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name, chain in module.parametrizations.items():
            for update in chain:
                if isinstance(update, SparseUpdate):
                    found[f"{module_name}.{tensor_name}" if module_name else tensor_name] = update
    return found


def merge_sparse(model: nn.Module, tensors: Callable[[str, SparseUpdate], Tensor] | None = None) -> nn.Module:
    """Remove every sparse parametrization, leaving plain dense parameters under the original names.

    Args:
        model: a model with ``SparseUpdate`` parametrizations (changed in place and returned).
        tensors: optional ``(name, update) -> dense tensor`` giving the final value of each tensor
            (GMixout: its weights or its EMA); by default the parametrized value (base with values).
    """
    for name, update in sparse_updates(model).items():
        module, tensor_name = _owner(model, name)
        final = tensors(name, update) if tensors is not None else None
        with torch.no_grad():
            parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=final is None)
            if final is not None:
                getattr(module, tensor_name).copy_(final)
        getattr(module, tensor_name).requires_grad_(False)
    return model


def sparse_parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Optimiser groups for a model with sparse updates: ``values`` decay iff their tensor would.

    ``values`` are 1-D, so the default rule (decay matrices only) would exempt them; here each follows
    the rule of the tensor it belongs to, so SAFT's selected matrix entries are decayed (and only
    they), as the paper's masked weight decay asks. Dense trainable tensors follow the default rule.
    """
    sparse = {id(u.values): u.decay for u in sparse_updates(model).values()}
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        wants = sparse[id(parameter)] if id(parameter) in sparse else decays(name, parameter)
        (decay if wants else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def count_active(model: nn.Module) -> int:
    """Coordinates that receive gradients: every ``values`` entry plus dense trainable tensors."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimiser's per-parameter state (moments, step counters)."""
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, Tensor)
    )


def remap_optimizer_state(optimizer: torch.optim.Optimizer, parameter: Tensor, old: Tensor, new: Tensor) -> None:
    """Move per-coordinate optimiser state from the sorted index set ``old`` to the sorted set ``new``.

    Slot ``j`` of ``parameter`` holds coordinate ``new[j]`` afterwards: coordinates active in both sets
    keep their moments, newly active ones start from zero (as a fresh AdamW entry would). Scalar
    state (AdamW's step count) is kept. Batched searchsorted/where, no host synchronisation.
    """
    state = optimizer.state.get(parameter)
    if not state or old.numel() == 0:
        return
    position = torch.searchsorted(old, new).clamp_(max=old.numel() - 1)
    kept = old[position] == new
    for key, value in state.items():
        if isinstance(value, Tensor) and value.shape == parameter.shape:
            state[key] = torch.where(kept, value[position], torch.zeros((), dtype=value.dtype, device=value.device))
