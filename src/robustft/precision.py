"""The run's precision: one autocast rule for training, evaluation and every pre-pass."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype forward passes run in under ``train.precision`` (auto: bf16 on a GPU); None: fp32, no autocast.

    Training, evaluation and every pre-pass use it, so a GPU run does not score its splits in fp32."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device`` (``autocast_dtype``'s answer); None: fp32, no autocast."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
