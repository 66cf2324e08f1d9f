"""Methods: one file, one class each; importing this package registers them all."""

from robustft.methods import finetune, linear_probe, lp_ft, zeroshot  # noqa: F401  (registration)
from robustft.methods.base import (
    Method,
    RunContext,
    get_method,
    list_methods,
    method_options_help,
    register_method,
)

__all__ = ["Method", "RunContext", "get_method", "list_methods", "method_options_help", "register_method"]
