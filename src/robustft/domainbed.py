"""``robustft domainbed CONFIG``: the DomainBed protocol over every held-out domain x trial x method; resumable.

DomainBed (Gulrajani & Lopez-Paz 2021) scores a method on a multi-domain dataset by holding each domain
out in turn, training on the others, and selecting the model on held-out images of the *training*
domains only ("training-domain validation"). It reports, per held-out domain, the mean and standard
error over trials of the selected model's accuracy on that domain, and their average.

CONFIG is a normal run config (model, data, optim, train, ...) plus a ``domainbed:`` section::

    data: {benchmark: digits_domains}         # or {benchmark: null, root: PACS/} (root/<domain>/<class>/)
    optim: {lr: 3.0e-4}
    train: {steps: 300}
    domainbed:
      methods: [finetune, linear_probe, zeroshot]   # or {name: lora, label: lora_r8, rank: 8, set: {optim.lr: 1e-3}}
      trials: 3
      test_domains: null        # every domain
      holdout_fraction: 0.2
      grid: {optim.lr: [1.0e-4, 3.0e-4]}   # candidates; the best id_val accuracy is reported

Every (method, held-out domain, trial, candidate) is one normal run (config.yaml, results.json,
checkpoints) in ``<output_dir>/<name>/<method>/<domain>/trial<k>/`` (``.../trial<k>/<candidate>/``
when the grid has several points), made by ``runner.fit`` with ``data.domains`` set, so ``robustft
evaluate`` works on it. A run whose results.json exists is skipped and an interrupted one resumes,
so running the command again finishes the protocol. ``domainbed.json`` and ``domainbed.md`` in the
same directory hold every run's selection and the table.

Model selection follows DomainBed's training-domain validation over an explicit candidate list: the
``grid`` points (default: a single candidate, the config as it is), scored by ``id_val`` accuracy,
the held-out part of the training domains. Unlike DomainBed it does not also select among
intermediate checkpoints: each candidate is scored once, at the end of training. Methods that do
not train (``zeroshot``, ``linear_probe``) run once; the grid does not apply to them.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, PositiveInt, ValidationError

from robustft.config import (
    StrictModel,
    apply_overrides,
    format_validation_errors,
    parse_config,
    read_config_yaml,
    set_key,
)
from robustft.data.domainbed import list_domains, ood_split_name
from robustft.errors import ConfigError
from robustft.files import atomic_write
from robustft.sweep import SweepPoint, expand_grid, parse_value, point_name, split_values

MANIFEST = "domainbed.json"
TABLE = "domainbed.md"
SELECTION = "training-domain validation: the candidate with the best id_val accuracy"
# Keys the protocol sets on every run itself.
_RESERVED = ("name", "output_dir", "seed", "data.domains")
_METHOD_STRING = re.compile(r"\s*([a-z][a-z0-9_]*)\s*(?:\((.*)\))?\s*")


class DomainBedConfig(StrictModel):
    """The ``domainbed:`` section of a config: what the protocol runs."""

    methods: list[str | dict[str, Any]] = Field(
        default_factory=lambda: ["finetune"],
        description="method names, 'name(option=value,...)', or {name, label, set: {dotted key: value}, options}",
    )
    trials: PositiveInt = Field(3, description="trials per held-out domain; each re-splits the data and re-seeds")
    test_domains: list[str] | None = Field(None, description="held-out domains to run; default every domain")
    holdout_fraction: float = Field(0.2, gt=0, lt=1, description="share of each training domain kept for id_val")
    grid: dict[str, list[Any]] = Field(
        default_factory=dict, description="dotted key -> candidate values; the best id_val accuracy is reported"
    )


@dataclass(frozen=True)
class MethodEntry:
    """One row of the table: a registered method with its options and its own config overrides."""

    label: str
    name: str
    options: dict[str, Any]
    overrides: dict[str, Any]


@dataclass
class Candidate(SweepPoint):
    """One run: a grid point of one (method, held-out domain, trial)."""

    def entry(self) -> dict[str, Any] | None:
        """The run's results.json entry (one method per run), if it finished."""
        methods = (self.results or {}).get("methods") or {}
        return next(iter(methods.values()), None)


@dataclass
class Cell:
    """One (method, held-out domain, trial): its candidates and the one training-domain validation picks."""

    method: str
    test_domain: str
    trial: int
    candidates: list[Candidate]

    def selected(self) -> Candidate | None:
        """The finished candidate with the best id_val accuracy (the first on ties), or None."""
        finished = [c for c in self.candidates if c.entry() is not None]
        return max(finished, key=lambda c: c.entry()["id_val"], default=None)

    def record(self) -> dict[str, Any]:
        chosen = self.selected()
        ood = ood_split_name(self.test_domain)
        return {
            "method": self.method,
            "test_domain": self.test_domain,
            "trial": self.trial,
            "selected": str(chosen.run_dir) if chosen else None,
            "id_val": chosen.entry()["id_val"] if chosen else None,
            "test": chosen.entry()["ood"][ood] if chosen else None,
            "candidates": [
                {
                    "name": c.name,
                    "overrides": c.overrides,
                    "run_dir": str(c.run_dir),
                    "status": c.status,
                    "id_val": c.entry()["id_val"] if c.entry() else None,
                    "test": c.entry()["ood"][ood] if c.entry() else None,
                    **({"error": c.error} if c.error else {}),
                }
                for c in self.candidates
            ],
        }


@dataclass
class DomainBedPlan:
    """Everything the protocol will run, validated; nothing has run and nothing is written."""

    source: str
    directory: Path
    domains: list[str]
    test_domains: list[str]
    section: DomainBedConfig
    methods: list[MethodEntry]
    cells: list[Cell] = field(default_factory=list)


def parse_method_entry(entry: str | dict[str, Any]) -> MethodEntry:
    """``"finetune"``, ``"lora(rank=8,alpha=16)"`` or ``{name, label?, set?: {key: value}, **options}``."""
    if isinstance(entry, str):
        match = _METHOD_STRING.fullmatch(entry)
        if not match:
            raise ConfigError(f"domainbed.methods: {entry!r} is not NAME or NAME(option=value,...)")
        name, inside = match.group(1), match.group(2)
        options = {}
        for item in split_values(inside) if inside and inside.strip() else []:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"domainbed.methods: {entry!r}: expected option=value, got {item.strip()!r}")
            options[key.strip()] = parse_value(value)
        label, overrides = None, {}
    elif isinstance(entry, dict):
        options = dict(entry)
        name = options.pop("name", None)
        if not isinstance(name, str):
            raise ConfigError(f"domainbed.methods: {entry!r} has no 'name'")
        label, overrides = options.pop("label", None), options.pop("set", None) or {}
        if not isinstance(overrides, dict):
            raise ConfigError(f"domainbed.methods: {name}: 'set' must map dotted keys to values")
    else:
        raise ConfigError(f"domainbed.methods: {entry!r} is neither a name nor a mapping")
    label = str(label) if label else (f"{name}-{point_name(options)}" if options else name)
    if not re.fullmatch(r"[^./\\\s][^/\\\s]*", label):
        raise ConfigError(f"domainbed.methods: label {label!r} must be usable as a folder name")
    return MethodEntry(label, name, options, dict(overrides))


def _check_reserved(keys: Sequence[str], where: str) -> None:
    for key in keys:
        if any(key == reserved or key.startswith(reserved + ".") for reserved in _RESERVED):
            raise ConfigError(f"{where}: '{key}' is set by the protocol itself (domain, trial seed, run directory)")


def plan_domainbed(raw: dict[str, Any], source: str = "config") -> DomainBedPlan:
    """Validate the config and every run it implies; see the module docstring for the layout."""
    from robustft.methods import get_method
    from robustft.posthoc import combines_runs
    from robustft.preflight import PreflightError, Problem, checked_config

    raw = copy.deepcopy(raw)
    try:
        section = DomainBedConfig.model_validate(raw.pop("domainbed", None) or {})
    except ValidationError as error:
        raise ConfigError(f"{source}: {format_validation_errors(error, prefix=('domainbed',))}") from None
    data = raw.setdefault("data", {})
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: data must be a mapping")
    if "domains" in data:
        raise ConfigError(f"{source}: data.domains is set per run by robustft domainbed; use the domainbed: section")
    if "benchmark" not in data and "root" not in data:
        data["benchmark"] = "digits_domains"
    elif "benchmark" not in data:
        data["benchmark"] = None
    raw.setdefault("seed", 0)
    _check_reserved(list(section.grid), "domainbed.grid")

    probe = copy.deepcopy(raw)
    probe["data"]["domains"] = {"test_domain": "(probe)", "holdout_fraction": section.holdout_fraction}
    base = parse_config(probe, source=source)
    domains = list_domains(base.data)
    test_domains = section.test_domains or domains
    unknown = [domain for domain in test_domains if domain not in domains]
    if unknown:
        raise ConfigError(f"domainbed.test_domains: unknown domain '{unknown[0]}' (domains: {', '.join(domains)})")

    methods = [parse_method_entry(entry) for entry in section.methods]
    labels = [m.label for m in methods]
    if not methods or len(set(labels)) != len(labels):
        raise ConfigError(f"domainbed.methods: need distinct labels, got {labels} (give repeated methods a label)")
    for method in methods:
        if combines_runs(get_method(method.name)):
            raise ConfigError(f"domainbed.methods: '{method.name}' combines finished runs; list the runs' method")
        _check_reserved(list(method.overrides), f"domainbed.methods: {method.label}: set")

    plan = DomainBedPlan(source, base.output_dir / base.name, domains, list(test_domains), section, methods)
    points = expand_grid(list(section.grid.items())) or [{}]
    problems: list[Problem] = []
    for test_domain in plan.test_domains:
        for trial in range(section.trials):
            for method in methods:
                method_points = points if get_method(method.name).trains else [{}]
                cell_dir = plan.directory / method.label / test_domain
                candidates = []
                for point in method_points:
                    name = f"trial{trial}" if len(method_points) == 1 else point_name(point)
                    output_dir = cell_dir if len(method_points) == 1 else cell_dir / f"trial{trial}"
                    run = _run_raw(raw, method, point, test_domain, trial, section.holdout_fraction)
                    run.update(name=name, output_dir=str(output_dir))
                    where = f"{source} [{method.label}/{test_domain}/trial{trial}/{name}]"
                    candidates.append(Candidate(name, point, checked_config(run, where, problems)))
                plan.cells.append(Cell(method.label, test_domain, trial, candidates))
    if problems:
        raise PreflightError(problems)  # every bad run of the grid at once
    return plan


def _run_raw(
    raw: dict[str, Any], method: MethodEntry, point: dict[str, Any], test_domain: str, trial: int, fraction: float
) -> dict[str, Any]:
    """The raw config of one run: the base, the method and its overrides, the grid point, the domain split."""
    run = copy.deepcopy(raw)
    run["method"] = {"name": method.name, **copy.deepcopy(method.options)}
    for key, value in {**method.overrides, **point}.items():
        set_key(run, key, copy.deepcopy(value), option="domainbed")
    run["data"]["domains"] = {"test_domain": test_domain, "trial": trial, "holdout_fraction": fraction}
    run["seed"] = int(raw["seed"]) + trial
    return run


def load_domainbed_config(path: Path | str, overrides: list[str] | None = None) -> dict[str, Any]:
    """The raw config of ``robustft domainbed``: the YAML with ``--set`` overrides (``domainbed.*`` included)."""
    return apply_overrides(read_config_yaml(path), overrides or [])


def run_domainbed(plan: DomainBedPlan, log: Callable[[str], None] = print, launcher: Any = None) -> dict[str, Any]:
    """Run every candidate not finished yet (one loaded model + data per held-out domain and trial),
    write ``domainbed.json`` / ``domainbed.md`` after each, and return the summary (``summarize``).
    ``launcher`` (:mod:`robustft.launchers`) runs them as jobs first."""
    from robustft.sweep import run_point

    skip_incompatible_methods(plan, log)
    candidates = [candidate for cell in plan.cells for candidate in cell.candidates]
    launched = launcher.execute(launcher.point_tasks(candidates), plan.directory, log) if launcher else {}

    cache: dict[str, Any] = {}
    total = sum(len(cell.candidates) for cell in plan.cells)
    done = 0
    for cell in plan.cells:
        for candidate in cell.candidates:
            done += 1
            where = f"[{done}/{total}] {cell.method} / {cell.test_domain} / trial{cell.trial}"
            where += f" / {candidate.name}" if len(cell.candidates) > 1 else ""
            if candidate.run_dir in launched:  # run by a job
                candidate.results, candidate.status, candidate.error = launched[candidate.run_dir].point_state()
            else:
                run_point(
                    candidate, cache, where, log
                )  # a diverging candidate loses the selection, the protocol goes on
            if candidate.status != "skipped":
                write_outputs(plan)
    return write_outputs(plan)


def skip_incompatible_methods(plan: DomainBedPlan, log: Callable[[str], None]) -> None:
    """Check one unfinished run of each method before any starts (``robustft.preflight``): the runs of one
    method share model and data root, and the domain splits were checked when planning. A method that
    cannot work on the model is dropped from the plan with its reason; a model or data problem stops here."""
    from robustft.preflight import check_runs

    first: dict[str, Candidate] = {}
    for cell in plan.cells:
        for candidate in cell.candidates:
            if not (candidate.run_dir / "results.json").is_file():
                first.setdefault(cell.method, candidate)
    found = check_runs([(label, candidate.config) for label, candidate in first.items()], log)
    found.raise_problems(include_incompatible=False)
    for label, reason in found.incompatible.items():
        log(f"{label}: skipped ({reason})")
    if len(found.incompatible) == len(plan.methods):
        found.raise_problems()
    plan.methods = [method for method in plan.methods if method.label not in found.incompatible]
    plan.cells = [cell for cell in plan.cells if cell.method not in found.incompatible]


def _mean_and_stderr(values: Sequence[float]) -> dict[str, Any]:
    """Mean and standard error (population std / sqrt(n)), as DomainBed's ``format_mean``."""
    n = len(values)
    if n == 0:
        return {"mean": None, "stderr": None, "trials": 0}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    return {"mean": mean, "stderr": std / math.sqrt(n), "trials": n}


def aggregate(records: Sequence[dict[str, Any]], methods: Sequence[str], test_domains: Sequence[str]) -> dict:
    """``{method: {domain: {mean, stderr, trials}, "avg": ...}}`` from the cells' selected test accuracies.

    ``avg`` is over the trials finished on every held-out domain: each such trial's mean over the
    domains, then mean and standard error over trials (its mean equals the mean of the per-domain
    means when every trial finished). It is None while a domain has no finished trial.
    """
    table: dict[str, Any] = {}
    for method in methods:
        accs: dict[str, dict[int, float]] = {domain: {} for domain in test_domains}
        for record in records:
            if record["method"] == method and record["test"] is not None:
                accs[record["test_domain"]][record["trial"]] = record["test"]
        row = {domain: _mean_and_stderr(list(by_trial.values())) for domain, by_trial in accs.items()}
        complete = set.intersection(*(set(by_trial) for by_trial in accs.values())) if accs else set()
        per_trial = [sum(accs[d][t] for d in test_domains) / len(test_domains) for t in sorted(complete)]
        row["avg"] = _mean_and_stderr(per_trial)
        table[method] = row
    return table


def summarize(plan: DomainBedPlan) -> dict[str, Any]:
    """The ``domainbed.json`` content: protocol, every cell's candidates and selection, and the table."""
    records = [cell.record() for cell in plan.cells]
    return {
        "config": plan.source,
        "directory": str(plan.directory),
        "domains": plan.domains,
        "test_domains": plan.test_domains,
        "trials": plan.section.trials,
        "holdout_fraction": plan.section.holdout_fraction,
        "selection": SELECTION,
        "grid": plan.section.grid,
        "methods": [{"label": m.label, "name": m.name, "options": m.options, "set": m.overrides} for m in plan.methods],
        "table": aggregate(records, [m.label for m in plan.methods], plan.test_domains),
        "runs": records,
    }


def format_cell(entry: dict[str, Any]) -> str:
    """``87.3 ± 0.4`` (DomainBed's one decimal, mean ± standard error); ``X`` where no trial finished."""
    if entry["mean"] is None:
        return "X"
    return f"{entry['mean']:.1f} ± {entry['stderr']:.1f}"


def markdown_table(summary: dict[str, Any]) -> str:
    """Rows methods, columns held-out domains and Avg, as DomainBed's per-dataset tables."""
    domains = summary["test_domains"]
    lines = [
        "| method | " + " | ".join(domains) + " | Avg |",
        "|---|" + "---:|" * (len(domains) + 1),
    ]
    for method, row in summary["table"].items():
        lines.append(f"| {method} | " + " | ".join(format_cell(row[d]) for d in [*domains, "avg"]) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(plan: DomainBedPlan) -> dict[str, Any]:
    """Write ``domainbed.json`` and ``domainbed.md`` (atomically) and return the summary."""
    summary = summarize(plan)
    text = json.dumps(summary, indent=2, default=str) + "\n"
    atomic_write(plan.directory / MANIFEST, lambda tmp: tmp.write_text(text))
    header = (
        f"# DomainBed: {plan.source}\n\nHeld-out domain accuracy (%), mean ± standard error over "
        f"{plan.section.trials} trial(s); model selection: {SELECTION}; holdout fraction "
        f"{plan.section.holdout_fraction}.\n\n"
    )
    markdown = header + markdown_table(summary)
    atomic_write(plan.directory / TABLE, lambda tmp: tmp.write_text(markdown))
    return summary


def failed_runs(summary: dict[str, Any]) -> list[str]:
    """Run directories whose training diverged (re-running the command retries them)."""
    return [c["run_dir"] for run in summary["runs"] for c in run["candidates"] if c["status"] == "failed"]
