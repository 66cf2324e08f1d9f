"""Logits of a predictor on a split, computed once and read back wherever the same predictor meets the same split.

Forward-only scoring is most of a comparison's time, and much of it is repeated: WiSE-FT's alpha 0 and 1 are
the zero-shot and fine-tuned models already scored, output ensembles and the final evaluation of a post-hoc
run score models whose logits exist, and a seed-independent run (zero-shot) scores the same weights once per
seed. The cache is keyed by the *content* of the predictor (a hash of its state dict, buffers and scalar
settings; the head is part of the state dict, so an OpenCLIP model with another zero-shot head is another
predictor), the split (the dataset object and its transform), the class space, the batch size and the
autocast dtype, so a hit returns exactly the logits a fresh forward would have returned (bit-identical on
the CPU, where a forward is deterministic). Entries are held in memory, least recently used first out.
Next to the logits the cache keeps backbone features (``features``), so predictors that share a backbone and
differ in the head pay for one backbone pass per split (``robustft.feature_cache``).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

# Enough for every split of a comparison on the built-in benchmark many times over; an ImageNet-sized
# split of 1000 classes is 200 MB, so a few predictors' worth of such splits still fit.
DEFAULT_MAX_BYTES = 2 * 2**30
_SCALARS = (bool, int, float, str, type(None), torch.dtype)


def predictor_fingerprint(predictor: nn.Module) -> str:
    """A hash of everything in ``predictor`` that decides its output: the modules' types, the state dict
    (parameters and persistent buffers, the head included), non-persistent buffers, tensor attributes and
    scalar settings (a VRF ``k``, an ensemble's mixing weight). ``training`` is left out: scoring sets eval.
    """
    digest = hashlib.blake2b(digest_size=20)
    for name, module in predictor.named_modules():
        digest.update(f"{name}:{type(module).__module__}.{type(module).__qualname__}".encode())
        for key, value in sorted(vars(module).items()):
            if key == "training" or key.startswith("_"):
                continue
            if isinstance(value, _SCALARS) or (
                isinstance(value, tuple | list) and all(isinstance(item, _SCALARS) for item in value)
            ):
                digest.update(f"{key}={value!r};".encode())
            elif isinstance(value, Tensor):
                _update_with_tensor(digest, key, value)
    for key, value in predictor.state_dict().items():
        _update_with_tensor(digest, key, value)
    for key, value in predictor.named_buffers():  # non-persistent buffers are not in the state dict
        _update_with_tensor(digest, f"buffer:{key}", value)
    return digest.hexdigest()


def _update_with_tensor(digest: Any, key: str, tensor: Tensor) -> None:
    tensor = tensor.detach()
    digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
    data = tensor.reshape(-1).contiguous().cpu()
    if data.numel():
        digest.update(data.view(torch.uint8).numpy().data)


def split_key(dataset: Any) -> tuple[Any, ...]:
    """What identifies a split's inputs: the dataset object, its length and its transform (or, for an in-memory
    split, its normalisation and input size). The object itself is held by the cache, so its id is not reused."""
    transform = getattr(dataset, "transform", None)
    normalisation = tuple(
        tuple(value.flatten().tolist()) if isinstance(value, Tensor) else value
        for value in (getattr(dataset, attribute, None) for attribute in ("mean", "std", "input_size"))
    )
    return (id(dataset), type(dataset).__qualname__, len(dataset), repr(transform), normalisation)


def class_space_key(space: Any) -> Any:
    return "identity" if space is None or space.kind == "identity" else repr(space)


@dataclass
class CachedLogits:
    logits: Tensor
    labels: Tensor
    dataset: Any  # held so that the split's id in the key stays unique

    @property
    def num_bytes(self) -> int:
        return self.logits.numel() * self.logits.element_size() + self.labels.numel() * self.labels.element_size()


class LogitCache:
    """Logits ``[N, C]`` (float32, CPU) and labels per (predictor content, split, class space, batch size, dtype)."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, feature_max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple[Any, ...], CachedLogits] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.features: LogitCache | None = LogitCache(feature_max_bytes, 0) if feature_max_bytes > 0 else None
        """Backbone features per split, a store of the same kind (``robustft.feature_cache``); None: not kept."""

    @property
    def num_bytes(self) -> int:
        return sum(entry.num_bytes for entry in self.entries.values())

    def key(self, fingerprint: str, dataset: Any, space: Any, batch_size: int, dtype: torch.dtype | None) -> tuple:
        return (fingerprint, split_key(dataset), class_space_key(space), batch_size, str(dtype))

    def get_or_compute(
        self, key: tuple[Any, ...], dataset: Any, compute: Callable[[], tuple[Tensor, Tensor]]
    ) -> tuple[Tensor, Tensor]:
        """The cached logits and labels under ``key``, else ``compute()``'s, stored. Callers must not modify them."""
        entry = self.entries.get(key)
        if entry is not None:
            self.hits += 1
            self.entries.move_to_end(key)
            return entry.logits, entry.labels
        self.misses += 1
        logits, labels = compute()
        entry = CachedLogits(logits, labels, dataset)
        if entry.num_bytes <= self.max_bytes:
            self.entries[key] = entry
            while self.num_bytes > self.max_bytes:
                self.entries.popitem(last=False)
        return logits, labels

    def clear(self) -> None:
        self.entries.clear()
        if self.features is not None:
            self.features.clear()
