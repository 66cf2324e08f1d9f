"""Hyper-parameter sweeps: every point of a grid, one run each, in one directory; resumable.

``robustft sweep ft.yaml --grid optim.lr=1e-5,3e-5 --grid seed=0,1,2`` runs the six combinations with
``runner.fit`` into ``<output_dir>/<config name>/<point name>/`` (``runs/ft/lr=1e-05,seed=0/``). A point
whose ``results.json`` exists is skipped and an interrupted point resumes from its last checkpoint, so
running the same command again finishes a sweep. Every point is validated before the first one trains,
so a bad value fails in seconds, not hours later. Runs of a sweep share one initialisation: they are
the ingredients of Model Soups (``robustft soup SWEEP_DIR``).
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from robustft.config import RunConfig, apply_overrides, parse_config, read_config_yaml, set_key
from robustft.errors import ConfigError
from robustft.files import atomic_write
from robustft.preflight import PreflightError, check_runs, checked_config

GridAxis = tuple[str, list[Any]]
MANIFEST = "sweep.json"
# Keys that place a run; the sweep sets them itself.
_RESERVED = ("name", "output_dir")
# PyYAML reads "1e-5" (no dot) as a string; a grid of learning rates must not.
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_INTEGER = re.compile(r"[+-]?\d+")
_OPENERS, _CLOSERS = "[{(", "]})"


def parse_value(text: str) -> Any:
    """One grid value: numbers as numbers (``1e-5`` included), anything else as YAML (``true``, ``[1, 2]``)."""
    text = text.strip()
    if _INTEGER.fullmatch(text):
        return int(text)
    if _NUMBER.fullmatch(text):
        return float(text)
    return yaml.safe_load(text)


def split_values(text: str) -> list[str]:
    """Split ``a,b,[c,d]`` on the commas outside brackets and quotes: ``["a", "b", "[c,d]"]``."""
    parts, depth, quote, current = [], 0, "", []
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in _OPENERS:
            depth += 1
        elif char in _CLOSERS:
            depth -= 1
        elif char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return parts


def parse_grid_option(text: str) -> GridAxis:
    """``"optim.lr=1e-5,3e-5"`` -> ``("optim.lr", [1e-05, 3e-05])``."""
    key, sep, values = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--grid {text!r}: expected KEY=V1,V2,..., e.g. optim.lr=1e-5,3e-5")
    raw = split_values(values)
    if any(not value.strip() for value in raw):
        raise ConfigError(f"--grid {text!r}: empty value; separate values with single commas")
    if key in _RESERVED:
        raise ConfigError(f"--grid {text!r}: the sweep sets '{key}' itself (runs go to <output_dir>/<name>/<point>)")
    return key, [parse_value(value) for value in raw]


def expand_grid(axes: Sequence[GridAxis]) -> list[dict[str, Any]]:
    """Every combination of the axes' values, the first axis varying slowest (as nested loops)."""
    keys = [key for key, _ in axes]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ConfigError(f"--grid: key given twice: {', '.join(repeated)}; list all its values in one --grid")
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(v for _, v in axes))]


def format_value(value: Any) -> str:
    """A value as it appears in a run name: ``1e-05``, ``0.0003``, ``3``, ``true``, ``[1,2]``."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int | float | str):
        return repr(value) if isinstance(value, float) else str(value)
    return json.dumps(value, separators=(",", ":"))


def point_name(point: Mapping[str, Any]) -> str:
    """The run name of a grid point: ``lr=1e-05,seed=0`` (last key part; the full key where two clash)."""
    leaves = [key.rsplit(".", 1)[-1] for key in point]
    labels = [leaf if leaves.count(leaf) == 1 else key for key, leaf in zip(point, leaves, strict=True)]
    name = ",".join(f"{label}={format_value(value)}" for label, value in zip(labels, point.values(), strict=True))
    name = re.sub(r"[/\\\s]", "_", name)
    return name if name.strip(".") else "point"


@dataclass
class SweepPoint:
    """One grid point: its overrides, its run config, and what this invocation did with it."""

    name: str
    overrides: dict[str, Any]
    config: RunConfig
    status: str = "pending"  # trained, skipped (finished before), stopped (train.stop_after), failed
    results: dict[str, Any] | None = None
    error: str | None = None

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir


@dataclass
class Sweep:
    directory: Path
    points: list[SweepPoint]


def plan_sweep(config: Path | str, axes: Sequence[GridAxis], overrides: list[str] | None = None) -> Sweep:
    """The sweep directory and every point's validated run config; nothing runs and nothing is written."""
    base_raw = read_config_yaml(config)
    apply_overrides(base_raw, overrides or [])
    base = parse_config(copy.deepcopy(base_raw), source=str(config))
    directory = base.output_dir / base.name
    points, problems = [], []
    for point in expand_grid(axes):
        name = point_name(point)
        raw = copy.deepcopy(base_raw)
        for key, value in point.items():
            set_key(raw, key, copy.deepcopy(value), option="--grid")
        raw.update(name=name, output_dir=str(directory))
        where = f"{config} [{name}]"
        points.append(SweepPoint(name, point, checked_config(raw, where, problems)))
    if problems:
        raise PreflightError(problems)  # every bad point at once, not the first one
    names = [point.name for point in points]
    if len(set(names)) != len(names):
        raise ConfigError(f"--grid: two points get the same run name ({names}); use distinct values")
    return Sweep(directory, points)


def run_sweep(
    config: Path | str,
    axes: Sequence[GridAxis],
    overrides: list[str] | None = None,
    log: Callable[[str], None] = print,
    launcher: Any = None,
) -> Sweep:
    """Run every point of the grid not finished yet; returns the sweep with each point's status and results.

    Points with the same model and data reuse one loaded model and data set (``runner.fit``'s
    ``prepared``), which is what a cold start of each run would rebuild identically.
    """
    sweep = plan_sweep(config, axes, overrides)
    pending = [point for point in sweep.points if not (point.run_dir / "results.json").is_file()]
    check_runs([(f"{config} [{point.name}]", point.config) for point in pending], log).raise_problems()
    launched = launcher.execute(launcher.point_tasks(sweep.points), sweep.directory, log) if launcher else {}
    cache: dict[str, Any] = {}
    for i, point in enumerate(sweep.points, 1):
        if point.run_dir in launched:  # run by a job (robustft.launchers)
            point.results, point.status, point.error = launched[point.run_dir].point_state()
        else:
            run_point(point, cache, f"[{i}/{len(sweep.points)}] {point.name}", log)
        if point.status != "skipped":
            write_manifest(sweep, config, axes)
    write_manifest(sweep, config, axes)
    return sweep


def write_manifest(sweep: Sweep, config: Path | str, axes: Sequence[GridAxis]) -> Path:
    """``sweep.json``: the config, the grid and each point's run directory and last status."""
    manifest = {
        "config": str(config),
        "grid": {key: values for key, values in axes},
        "points": [
            {
                "name": p.name,
                "overrides": p.overrides,
                "run_dir": str(p.run_dir),
                "status": p.status,
                **({"error": p.error} if p.error else {}),
            }
            for p in sweep.points
        ],
    }
    text = json.dumps(manifest, indent=2, default=str) + "\n"  # YAML values may be dates
    return atomic_write(sweep.directory / MANIFEST, lambda tmp: tmp.write_text(text))


def run_point(point: SweepPoint, cache: dict[str, Any], where: str, log: Callable[[str], None]) -> None:
    """Fit ``point`` (resuming), or read it back if it finished before; sets its status, results and error.

    ``cache`` holds one loaded model and data set, shared by consecutive points with equal
    ``prepared_data_key``. A diverging point (NaN loss) is marked failed and the caller goes on: a
    learning rate that diverges is a result of a sweep or a DomainBed grid, not its end.
    """
    from robustft.engine import NonFiniteLossError
    from robustft.runner import RESULTS_FILE, fit, prepare_run

    finished = point.run_dir / RESULTS_FILE
    if finished.is_file():
        point.status, point.results = "skipped", json.loads(finished.read_text())
        log(f"{where}: finished before, skipped")
        return
    log(f"{where}: running")
    key = prepared_data_key(point.config)
    if key not in cache:
        cache.clear()  # one loaded data set at a time
        cache[key] = prepare_run(point.config, log)
    try:
        point.results = fit(point.config, resume=True, log=log, prepared=cache[key]) or None
        point.status = "trained" if point.results else "stopped"
    except NonFiniteLossError as error:
        point.status, point.error = "failed", str(error)
        log(f"{where}: failed: {error}")


def prepared_data_key(config: RunConfig) -> str:
    """Points with equal keys get identical prepared models and data from ``prepare_run``."""
    from robustft.posthoc import randomly_initialised

    model = config.model.model_dump(mode="json")
    seed = config.seed if randomly_initialised(model) else None  # random weights come from the seed
    return json.dumps([model, config.data.model_dump(mode="json"), config.train.device, seed])
