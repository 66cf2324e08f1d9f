"""Preflight: check every run a command will do before the first one starts, and report every problem at once.

A comparison, sweep or DomainBed grid that fails on its fifth run has wasted the first four. Before any
run starts, ``check_runs`` loads each distinct model once and each distinct data set once (no training,
no zero-shot head), and asks each run's method whether it can work on that model
(:meth:`robustft.methods.base.Method.check_model`) and whether it can run under the configured
``train.strategy``. Problems of the shared model or data stop the command up front, all of them listed,
one line each (:class:`PreflightError`); a method that cannot work on the model is reported per run, so a
multi-method command can skip it with its reason and run the rest.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from robustft.config import RunConfig
from robustft.errors import ConfigError, RobustftError

# Shown as the ``where`` of a problem of the shared model or data: every run that uses it.
_SHOWN_RUNS = 3


@dataclass(frozen=True)
class Problem:
    """One thing that would make a run fail: where (a run, or the runs sharing a model or data) and why."""

    where: str
    message: str

    def line(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


def checked_config(raw: dict[str, Any], where: str, problems: list[Problem]) -> RunConfig | None:
    """The validated run config of ``raw`` (method options included), or None with its error added to
    ``problems``: planning goes on, so every bad run of a grid is reported, not the first."""
    from robustft.config import parse_config
    from robustft.methods import checked

    try:
        return checked(parse_config(raw, source=where), where)
    except ConfigError as error:
        problems.append(Problem("", str(error)))  # the message names ``where`` already
        return None


class PreflightError(ConfigError):
    """Problems found before any run started; ``str`` holds one line per problem (the CLI prefixes each)."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(problem.line() for problem in self.problems))


@dataclass
class Preflight:
    """What ``check_runs`` found: problems shared by runs (fatal) and, per run label, why its method cannot run."""

    problems: list[Problem] = field(default_factory=list)
    incompatible: dict[str, str] = field(default_factory=dict)

    def raise_problems(self, include_incompatible: bool = True) -> None:
        """Stop with every problem found (and every incompatible run, unless the caller skips those)."""
        problems = list(self.problems)
        if include_incompatible:
            problems += [Problem(label, reason) for label, reason in self.incompatible.items()]
        if problems:
            raise PreflightError(problems)


def model_key(config: RunConfig) -> str:
    """Runs with equal keys load the same model (a model with random initial weights is keyed by its seed too)."""
    from robustft.posthoc import randomly_initialised

    spec = config.model.model_dump(mode="json")
    return json.dumps([spec, config.seed if randomly_initialised(spec) else None], sort_keys=True)


def data_key(config: RunConfig) -> str:
    """Runs with equal keys read the same data (transforms aside: preflight checks files, labels and counts)."""
    return json.dumps(config.data.model_dump(mode="json"), sort_keys=True)


def check_runs(
    runs: Sequence[tuple[str, RunConfig]],
    log: Callable[[str], None] = print,
    model: nn.Module | None = None,
) -> Preflight:
    """Check ``runs`` (label, config) without training: model, data, method-model compatibility, strategy.

    Each distinct model spec is loaded once and each distinct data section read once, whatever the number
    of runs. ``model`` is an already prepared classifier that every run starts from (the demo, tests):
    then nothing is loaded and only the methods are asked.
    """
    found = Preflight()
    for label, config in runs:
        _check_strategy(label, config, found)
    if not runs:
        return found
    if model is not None:
        for label, config in runs:
            reason = method_model_problem(config, model)
            if reason and label not in found.incompatible:
                found.incompatible[label] = reason
        return found
    models: dict[str, Any] = {}
    by_model: dict[str, list[str]] = {}
    for label, config in runs:
        key = model_key(config)
        by_model.setdefault(key, []).append(label)
        if key not in models:
            models[key] = _load_model(config)
    for key, loaded in models.items():
        if isinstance(loaded, RobustftError):
            found.problems.append(Problem(_runs_label(by_model[key]), str(loaded)))
    classes: dict[str, Any] = {}
    by_data: dict[str, list[str]] = {}
    for label, config in runs:
        key = data_key(config)
        by_data.setdefault(key, []).append(label)
        if key not in classes:
            loaded = models[model_key(config)]
            classes[key] = _load_data(config, None if isinstance(loaded, RobustftError) else loaded.data_config)
    for key, names in classes.items():
        if isinstance(names, RobustftError):
            found.problems.append(Problem(_runs_label(by_data[key]), str(names)))
    probes: dict[tuple[str, int], nn.Module] = {}
    for label, config in runs:
        loaded, names = models[model_key(config)], classes[data_key(config)]
        if isinstance(loaded, RobustftError) or not isinstance(names, list):
            continue
        probe_key = (model_key(config), len(names))
        if probe_key not in probes:
            probes[probe_key] = probe_classifier(loaded, len(names))
        reason = method_model_problem(config, probes[probe_key])
        if reason and label not in found.incompatible:
            found.incompatible[label] = reason
    if found.incompatible or found.problems:
        log(f"preflight: {len(found.problems) + len(found.incompatible)} problem(s) in {len(runs)} run(s)")
    else:
        log(f"preflight: {len(runs)} run(s) checked ({len(models)} model(s), {len(classes)} data set(s))")
    return found


def method_model_problem(config: RunConfig, model: nn.Module) -> str | None:
    """Why the run's method cannot work on ``model`` (asked of the method), or None."""
    from robustft.methods import build_method

    try:
        return build_method(config).check_model(model, config.model.model_dump(mode="json"))
    except RobustftError as error:
        return str(error)


def probe_classifier(loaded: Any, num_classes: int) -> nn.Module:
    """The loaded backbone with a plain head of the right shape: what a method's ``prepare`` would receive,
    without the zero-shot head (a text or prototype head costs a pass over class names or training data)."""
    from robustft.backbones.classifier import ImageClassifier

    backbone = loaded.backbone
    width = embedding_width(backbone, loaded.data_config)
    return ImageClassifier(backbone, nn.Linear(width, num_classes), data_config=loaded.data_config)


def embedding_width(backbone: nn.Module, data_config: dict[str, Any]) -> int:
    """The backbone's embedding size: from its attributes (timm, OpenCLIP), else one forward of one image."""
    for name in ("num_features", "output_dim", "embed_dim"):
        width = getattr(backbone, name, None)
        if isinstance(width, int) and width > 0:
            return width
    size = tuple(data_config.get("input_size", (3, 224, 224)))
    was_training = backbone.training
    with torch.no_grad():
        width = int(backbone.eval()(torch.zeros(1, *size)).shape[-1])
    backbone.train(was_training)
    return width


def _check_strategy(label: str, config: RunConfig, found: Preflight) -> None:
    """What the engine refuses when it starts training (``distributed.check_strategy``), asked up front."""
    from robustft import distributed
    from robustft.methods import get_method

    if not get_method(config.method.name).trains:
        return
    try:
        distributed.check_strategy(config.train.strategy, config.method.name)
    except ConfigError as error:
        found.incompatible[label] = str(error)


def _load_model(config: RunConfig) -> Any:
    """The loaded backbone, or the error loading it (under a forked RNG: a check changes no run's random stream)."""
    from robustft.backbones.factory import load_backbone

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        try:
            return load_backbone(config.model)
        except RobustftError as error:
            return error


def _load_data(config: RunConfig, data_config: dict[str, Any] | None) -> Any:
    """The data's class names, or the error reading the splits (with a default data config when the model failed,
    so a broken model and broken data are both reported)."""
    from robustft.data import load_splits

    try:
        return list(load_splits(config.data, data_config or {"input_size": (3, 224, 224)})[1])
    except RobustftError as error:
        return error
    except Exception:  # noqa: BLE001  (only without the model's data config: the model's error is reported)
        if data_config is None:
            return None
        raise


def _runs_label(labels: Sequence[str]) -> str:
    shown = ", ".join(labels[:_SHOWN_RUNS])
    more = f" and {len(labels) - _SHOWN_RUNS} more" if len(labels) > _SHOWN_RUNS else ""
    return f"{shown}{more}" if len(labels) > 1 else labels[0]
