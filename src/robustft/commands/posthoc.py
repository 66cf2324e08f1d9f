"""``robustft posthoc METHOD RUN...`` (and its aliases ``wise``, ``ose``, ``vrf``, ``soup``).

A post-hoc method declares what it combines (one finished run, or several: ``PosthocMethod``); this
command turns the run directories into that method's input options, takes the first input run's
model, data and seed, applies ``--set`` overrides and fits the post-hoc run like any other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from robustft.config import apply_overrides, parse_config
from robustft.errors import ConfigError
from robustft.methods import method_options
from robustft.posthoc import final_checkpoint, find_runs, read_run_config


def posthoc_class(method: str) -> Any:
    """The registered post-hoc method called ``method``; a trained method is a one-line error."""
    from robustft.methods import get_method
    from robustft.methods.base import PosthocMethod

    cls = get_method(method)
    if not issubclass(cls, PosthocMethod):
        raise ConfigError(
            f"{method} trains a model and combines no runs (post-hoc methods: {', '.join(posthoc_methods())})"
        )
    return cls


def posthoc_methods() -> list[str]:
    """The names of the registered post-hoc methods."""
    from robustft.methods import get_method, list_methods
    from robustft.methods.base import PosthocMethod

    return [name for name in list_methods() if issubclass(get_method(name), PosthocMethod)]


def method_overrides(overrides: Sequence[str]) -> list[str]:
    """``--set`` items with a bare key (``alpha=0.5``) taken as method options (``method.alpha=0.5``)."""
    items = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. alpha=0.5 or data.eval_batch_size=128")
        items.append(item if "." in key else f"method.{key.strip()}={value}")
    return items


def run_posthoc(
    method: str,
    runs: Sequence[str | Path],
    overrides: Sequence[str] = (),
    out: Path | None = None,
    log: Callable[[str], None] = print,
    options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Fit post-hoc ``method`` over finished ``runs`` into ``<out>/<method>/``; returns its results.

    ``out`` defaults to the input run for a method over one run (so ``robustft report RUN`` shows the
    run and its post-hoc variants together) and to the given folder for a soup over a sweep folder.
    ``options`` are method options given programmatically; ``overrides`` are ``--set`` items.
    """
    from robustft.runner import fit

    cls = posthoc_class(method)
    if not runs:
        raise ConfigError(f"{method}: give the finished run{'s' if cls.several_runs else ''} it combines")
    if cls.several_runs:
        inputs = list(dict.fromkeys(run for entry in runs for run in find_runs(entry)))
    else:
        inputs = [Path(run) for run in runs]
        final_checkpoint(inputs[0])
    spec = {"name": method, **cls.input_options(inputs)}
    raw = read_run_config(inputs[0])
    raw["method"] = {**spec, **(options or {})}
    directory = out or (Path(runs[0]) if len(runs) == 1 else Path(runs[0]).parent)
    raw.update(name=method, output_dir=str(directory))
    apply_overrides(raw, method_overrides(overrides))
    source = f"{Path(inputs[0]) / 'config.yaml'} (method {method})"
    config = parse_config(raw, source=source)
    method_options(config, source)
    return fit(config, log=log, overwrite=True)  # a derived run is re-made from its inputs


def run_soups(
    path: str | Path,
    methods: Sequence[str] = ("uniform_soup", "greedy_soup"),
    out: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Soups over the finished runs in ``path`` (a sweep directory) into ``<out>/<method>/`` (``robustft soup``).

    The ingredients are listed run by run in each soup's config.yaml, so it records exactly what was
    averaged. Returns the merged results of the soups.
    """
    for method in methods:
        if not posthoc_class(method).several_runs:
            raise ConfigError(f"not a soup method: {method} (soups: uniform_soup, greedy_soup)")
    runs = find_runs(path)
    log(f"{len(runs)} ingredients: {', '.join(run.name for run in runs)}")
    merged: dict[str, Any] = {}
    for method in methods:
        results = run_posthoc(method, [path], out=Path(out or path), log=log)
        merged = {**results, "methods": {**merged.get("methods", {}), **results["methods"]}}
    return merged
