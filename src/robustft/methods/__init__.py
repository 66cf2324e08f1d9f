"""Methods: one file, one class each; importing this package registers them all."""

from robustft.methods import (  # noqa: F401  (registration)
    finetune,
    flyp,
    gmixout,
    l2_sp,
    linear_probe,
    lora,
    lp_ft,
    masked_counterfactual,
    mixout,
    mixture_of_adapters,
    model_soup,
    output_ensemble,
    saft,
    vrf,
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
