"""Image features of a backbone on a split, computed once and shared by every predictor built on that backbone.

Most predictors of a comparison are a backbone followed by a cheap head, and many share the backbone bit for
bit: the zero-shot model and the linear probe (the same frozen tower, another head), VRF's and the output
ensemble's zero-shot side, an LP-FT's probing stage. Their forward cost is almost all backbone, so the
evaluator keeps each split's backbone output in the logit cache's ``features`` store, keyed like the logits by
the backbone's *content* (``logit_cache.predictor_fingerprint``), the split and its transform, the batch size
and the autocast dtype, and applies each predictor's head to the cached features.

A predictor opts in with two methods (``ImageClassifier`` and ``VrfPredictor`` have them):

- ``feature_extractors() -> list[nn.Module]``: the modules mapping images to features, each cached on its own
  (empty: no opt-in, the predictor is run as a whole);
- ``logits_from_features(features: list[Tensor]) -> Tensor``: its forward, given those modules' outputs on one
  batch.

Features are kept in the dtype the extractor produced them in (bf16 under a bf16 autocast), and the head is
applied batch by batch with the evaluator's batches, so the logits are bit-identical to a fresh forward on the
CPU, where a forward is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from robustft.logit_cache import LogitCache, predictor_fingerprint


def feature_key(store: LogitCache, extractor: nn.Module, dataset: Any, batch_size: int, dtype: torch.dtype | None):
    """The key of ``extractor``'s features of ``dataset`` in ``store`` (a ``LogitCache.features``): no class space,
    features precede it."""
    return store.key(predictor_fingerprint(extractor), dataset, None, batch_size, dtype)


def feature_extractors(predictor: nn.Module) -> list[nn.Module]:
    """The predictor's declared feature extractors, or [] when it does not opt in (runs as a whole)."""
    declared = getattr(predictor, "feature_extractors", None)
    if declared is None or getattr(predictor, "logits_from_features", None) is None:
        return []
    return list(declared())


def split_features(
    extractor: nn.Module,
    dataset: Any,
    store: LogitCache | None,
    compute: Callable[[], tuple[Tensor, Tensor]],
    batch_size: int,
    dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor]:
    """``compute()`` (the extractor's features and labels of the whole split), read from ``store`` (a logit
    cache's ``features``) when it holds them."""
    if store is None:
        return compute()
    return store.get_or_compute(feature_key(store, extractor, dataset, batch_size, dtype), dataset, compute)


@torch.no_grad()
def apply_in_batches(
    head: Callable[[list[Tensor]], Tensor | tuple[Tensor, ...]],
    features: list[Tensor],
    batch_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> Any:
    """``head`` on every ``batch_size`` rows of ``features`` (one tensor per extractor), as the batches of a
    fresh forward were: the same shapes, so the same kernels and the same bits. Float32 outputs on the CPU,
    a tensor or a tuple of them as ``head`` returns."""
    on_device = [tensor.to(device, non_blocking=True) for tensor in features]
    total = len(on_device[0]) if on_device else 0
    context = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    outputs: list[tuple[Tensor, ...]] = []
    single = True
    with context:
        for start in range(0, total, batch_size):
            output = head([tensor[start : start + batch_size] for tensor in on_device])
            single = isinstance(output, Tensor)
            outputs.append((output,) if single else tuple(output))
    if not outputs:
        return torch.empty(0)
    joined = tuple(torch.cat([output[part].float() for output in outputs]).cpu() for part in range(len(outputs[0])))
    return joined[0] if single else joined
