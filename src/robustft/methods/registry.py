"""The method registry: names to classes, without importing a method until it is asked for.

Like timm's model registry, listing and looking up names costs nothing: the built-in methods are a
table of ``name -> module``, and a method's module (and with it torch and the method's own
dependencies) is imported only when :func:`get_method` is called for it. ``@register_method`` adds a
class under its ``name`` when its module is imported, so a user's own method registers the same way.
This module imports neither torch nor any method, so the config layer and ``robustft --help`` stay fast.
"""

from __future__ import annotations

import importlib
import re
from typing import TYPE_CHECKING, Any

from robustft.errors import ConfigError

if TYPE_CHECKING:
    from robustft.config import MethodConfig, MethodSpec
    from robustft.methods.base import Method

# In the order `robustft methods`, the demo and the leaderboard list them: references first, post-hoc last.
BUILTIN_METHODS: dict[str, str] = {
    "zeroshot": "robustft.methods.zeroshot",
    "linear_probe": "robustft.methods.linear_probe",
    "finetune": "robustft.methods.finetune",
    "lp_ft": "robustft.methods.lp_ft",
    "l2_sp": "robustft.methods.l2_sp",
    "flyp": "robustft.methods.flyp",
    "lora": "robustft.methods.lora",
    "mixout": "robustft.methods.mixout",
    "gmixout": "robustft.methods.gmixout",
    "saft": "robustft.methods.saft",
    "masked_counterfactual": "robustft.methods.masked_counterfactual",
    "mixture_of_adapters": "robustft.methods.mixture_of_adapters",
    "wise_ft": "robustft.methods.wise_ft",
    "output_ensemble": "robustft.methods.output_ensemble",
    "uniform_soup": "robustft.methods.model_soup",
    "greedy_soup": "robustft.methods.model_soup",
    "vrf": "robustft.methods.vrf",
}

_REGISTRY: dict[str, type[Method]] = {}
_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: add a method to the registry under ``cls.name``."""
    if not _NAME_PATTERN.match(cls.name):
        raise ValueError(f"method name {cls.name!r} must be lower snake case")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is already registered by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    """Every method name: the built-in ones in their listing order, then any registered by the user."""
    return [*BUILTIN_METHODS, *(name for name in _REGISTRY if name not in BUILTIN_METHODS)]


def is_method(name: str) -> bool:
    return name in BUILTIN_METHODS or name in _REGISTRY


def get_method(name: str) -> type[Method]:
    """The class registered as ``name``, importing its module on first use."""
    if name not in _REGISTRY and name in BUILTIN_METHODS:
        importlib.import_module(BUILTIN_METHODS[name])
    if name not in _REGISTRY:
        raise ConfigError(f"method.name: unknown method '{name}' (known: {', '.join(sorted(list_methods()))})")
    return _REGISTRY[name]


def method_options(spec: MethodSpec | Any, source: str | None = None) -> MethodConfig:
    """The validated option object of a ``method:`` section (a ``MethodSpec`` or a ``RunConfig``).

    The config layer keeps a method's options as a raw mapping; the method's own ``config_cls`` checks
    them here. Errors are one line naming ``method.<option>`` (and ``source``, the file, when given).
    """
    from pydantic import ValidationError

    from robustft.config import format_validation_errors

    spec = getattr(spec, "method", spec)
    prefix = f"{source}: " if source else ""
    try:
        method_cls = get_method(spec.name)
    except ConfigError as error:
        raise ConfigError(f"{prefix}{error}") from None
    try:
        return method_cls.config_cls(**spec.options())
    except ValidationError as error:
        raise ConfigError(prefix + format_validation_errors(error, prefix=("method",))) from None


def build_method(spec: MethodSpec | Any, source: str | None = None) -> Method:
    """The configured method: its class with its validated options."""
    options = method_options(spec, source)
    return get_method(getattr(spec, "method", spec).name)(options)


def method_options_help(cls: type[Method]) -> list[tuple[str, Any, str]]:
    """(option, default, description) for ``robustft methods``; an option of the paper preset says its value.

    ``preset`` is listed only for methods that have a paper preset.
    """
    paper = cls.config_cls.paper_preset
    rows = []
    for name, info in cls.config_cls.model_fields.items():
        if name == "preset" and not paper:
            continue
        description = info.description or ""
        if name in paper:
            description = f"{description} (paper: {paper[name]!r})"
        rows.append((name, info.default, description))
    return rows


def checked(config: Any, source: str | None = None) -> Any:
    """``config`` (a ``RunConfig``) once its method's options have been checked; for planners that
    validate every run they will do before the first one starts."""
    method_options(config, source)
    return config
