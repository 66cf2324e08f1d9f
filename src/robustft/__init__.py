"""Robust fine-tuning of vision foundation models.

``import robustft`` loads nothing heavy; ``robustft.load`` (``robustft.api.load``) imports torch and the
backbones on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load"]


def __getattr__(name: str) -> Any:
    if name == "load":
        from robustft.api import load

        return load
    raise AttributeError(f"module 'robustft' has no attribute {name!r}")
