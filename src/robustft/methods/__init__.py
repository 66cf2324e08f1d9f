"""Methods: one file, one class each; importing this package registers them all."""

from robustft.methods import (  # noqa: F401  (registration)
    finetune,
    gmixout,
    linear_probe,
    lp_ft,
    masked_counterfactual,
    mixout,
    model_soup,
    output_ensemble,
    saft,
    wise_ft,
    zeroshot,
)
from robustft.methods.base import (
    Method,
    RunContext,
    get_method,
    list_methods,
    method_options_help,
    register_method,
)

__all__ = ["Method", "RunContext", "get_method", "list_methods", "method_options_help", "register_method"]
