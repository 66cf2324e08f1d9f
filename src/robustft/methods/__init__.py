"""Methods: one file, one class each, behind the interface in ``methods/base.py``.

Importing this package imports no method (and not torch): the registry (:mod:`robustft.methods.registry`)
imports a method's module when it is first asked for. ``Method`` and ``RunContext`` load on first access.
"""

from __future__ import annotations

from typing import Any

from robustft.methods.registry import (
    build_method,
    checked,
    get_method,
    is_method,
    list_methods,
    method_options,
    method_options_help,
    register_method,
)

__all__ = [
    "Method",
    "RunContext",
    "build_method",
    "checked",
    "get_method",
    "is_method",
    "list_methods",
    "method_options",
    "method_options_help",
    "register_method",
]


def __getattr__(name: str) -> Any:
    if name in ("Method", "RunContext", "PosthocMethod"):
        from robustft.methods import base

        return getattr(base, name)
    raise AttributeError(f"module 'robustft.methods' has no attribute {name!r}")
