"""``robustft compare``: every chosen method on one config's data, over seeds, into one leaderboard.

A fair comparison of robust fine-tuning methods holds everything but the method fixed: the model, the
data, the optimiser recipe and the training budget come from one run config; each method adds only its
documented defaults (its ``MethodConfig``) and, where its paper tunes it separately, its own learning
rate (``compare.optim``). Shared work is done once per comparison or once per seed:

- the data and the zero-shot classifier are prepared once (``runner.prepare_run``) and copied per run; when
  the model starts from fixed weights (not randomly initialised from the seed) once for all seeds, with one
  logit cache (:mod:`robustft.logit_cache`), so no predictor scores a split twice;
- a seed-independent method (zero-shot, linear probe: ``Method.seed_independent``) runs once, for the first
  seed, and is reported for every seed with the same numbers (``seed_independent`` in the leaderboard);
- one zero-shot run is the reference every method's effective robustness is measured against;
- one fine-tuning run (``finetune``) is the input of every post-hoc method over a fine-tuned model
  (WiSE-FT, output-space ensembles, VRF) and the first ingredient of the soups; the soups' extra
  ingredients are fine-tunes at other learning rates (``compare.soup_learning_rates``).

Runs go to ``<out>/seed<k>/<run name>/`` as ordinary run directories. The comparison is resumable: a
finished run whose saved ``config.yaml`` matches what this comparison would run is read back, not
run again; an interrupted one continues from its last checkpoint; a post-hoc run is redone when one of
its input runs was redone. ``<out>/compare_runs.json`` records what each call fitted and reused.

The leaderboard (``leaderboard.json`` / ``.md`` / ``.csv``) gives, per method, the mean and population
standard deviation over seeds of ID accuracy, every OOD split, the OOD average, effective robustness
(:mod:`robustft.robustness`, per seed against that seed's zero-shot and fine-tune runs) and train time,
plus trainable parameters, peak GPU memory and inference cost. Two costs are measured here, not by
``runner.fit``, and stored beside each run in ``compare_costs.json`` (so a resumed comparison reports
the same numbers):

- **peak memory**: ``torch.cuda.max_memory_allocated`` over the run (reset before it), in MiB. It is
  ``null`` on the CPU: the process's peak resident memory only ever grows within one process, so it
  cannot be attributed to one run of many.
- **inference cost**: the median wall time of the run's predictor on one fixed batch of 64 ``id_test``
  images divided by that of one forward of the zero-shot model on the same batch, timed alternately
  (so both see the same machine load). An output-space ensemble of two models costs about 2, a
  weight-space ensemble (WiSE-FT, soups) about 1.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field, ValidationError
from torch import Tensor, nn

from robustft.config import (
    RunConfig,
    StrictModel,
    apply_overrides,
    format_validation_errors,
    parse_config,
    read_config_yaml,
)
from robustft.data import sequential_loader
from robustft.errors import ConfigError
from robustft.files import atomic_write
from robustft.methods import checked, get_method, list_methods
from robustft.posthoc import combines_runs, is_finished_run, load_run_predictor, randomly_initialised
from robustft.progress import RunsProgress, results_summary
from robustft.report import (  # noqa: F401 (the leaderboard's renderers, also importable from here as before)
    leaderboard_csv,
    leaderboard_markdown,
    leaderboard_table,
    print_leaderboard,
    write_comparison_outputs,
    write_leaderboard,
)
from robustft.results_schema import SCHEMA_VERSION, leaderboard_declarations
from robustft.robustness import add_effective_robustness, ood_average
from robustft.run_directory import config_differences
from robustft.runner import RESULTS_FILE, Prepared, fit, prepare_run, resolved_config
from robustft.safe_io import read_json_object, read_yaml_mapping
from robustft.statistics import leaderboard_statistics
from robustft.statistics import settings as statistics_settings
from robustft.sweep import point_name
from robustft.tracking import log_effective_robustness

if TYPE_CHECKING:
    from robustft.launchers import Launcher

LEADERBOARD = "leaderboard"
RUNS_MANIFEST = "compare_runs.json"
COSTS_FILE = "compare_costs.json"
INGREDIENTS_DIR = "soup_ingredients"
ZERO_SHOT, FINETUNED = "zeroshot", "finetune"
# One fixed batch for the inference-cost ratio; small, so timing every method adds seconds, not minutes.
INFERENCE_BATCH = 32
INFERENCE_REPEATS = 3
# Keys that differ between otherwise identical runs and do not change their results.
_IGNORED_CONFIG_KEYS = frozenset({"train.progress", "data.num_workers"})


class CompareSection(StrictModel):
    """The optional ``compare:`` section of a run config (``robustft compare`` reads it; ``fit`` never sees it)."""

    methods: list[str] | None = Field(None, description="methods to compare (default: all); --methods overrides")
    seeds: list[int] | None = Field(None, description="seeds (default: the config's seed); --seeds overrides")
    optim: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="per-method optimiser keys over the config's optim section, e.g. {lora: {lr: 1e-3}}",
    )
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-method options over the method's defaults, e.g. {vrf: {k: 10}}"
    )
    soup_learning_rates: list[float] | None = Field(
        None, description="learning rates of the soups' extra fine-tunes (default: optim.lr / 3 and optim.lr * 3)"
    )


@dataclass
class PlannedRun:
    """One run of the comparison: its config and the runs it combines (post-hoc methods)."""

    method: str
    kind: str  # zeroshot, trained, posthoc, or ingredient (a soup's extra fine-tune, not on the leaderboard)
    config: RunConfig
    inputs: list[Path] = field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir


@dataclass
class Comparison:
    """What ``execute_comparison`` did: the leaderboard (None when a run stopped early) and every run."""

    leaderboard: dict[str, Any] | None
    per_seed: dict[int, dict[str, Any]]
    statuses: list[dict[str, Any]]

    @property
    def fitted(self) -> list[str]:
        return [status["run_dir"] for status in self.statuses if status["status"] == "fitted"]


# ------------------------------------------------------------------------------------------- planning


def split_pair(name: str) -> tuple[str | None, str]:
    """``gmixout+vrf`` -> (``gmixout``, ``vrf``): a post-hoc method over another run; ``vrf`` -> (None, ``vrf``).

    Raises:
        ConfigError: an unknown part, a base that is not a trained method, or a second part that does not
            take one fine-tuned run (soups take several; ``finetune+vrf`` is plain ``vrf``).
    """
    if "+" not in name:
        get_method(name)  # a ConfigError naming the unknown method and the known ones
        return None, name
    base, _, posthoc = name.partition("+")
    base_cls, posthoc_cls = get_method(base), get_method(posthoc)
    if not combines_runs(posthoc_cls) or posthoc_cls.several_runs:
        raise ConfigError(
            f"--methods {name}: '{posthoc}' does not combine one fine-tuned run (wise_ft, output_ensemble, vrf do)"
        )
    if combines_runs(base_cls) or not base_cls.trains or base == FINETUNED:
        raise ConfigError(
            f"--methods {name}: the base must be a trained method other than finetune "
            f"(over finetune, write plain '{posthoc}')"
        )
    return base, posthoc


def method_class(name: str) -> type:
    """The registered class of a method or of a pair's post-hoc part."""
    return get_method(split_pair(name)[1])


def parse_methods_option(text: str | None) -> list[str] | None:
    """``--methods``: ``all`` (or nothing) is None, meaning every registered method; else checked names,
    which may be pairs ``base+posthoc`` (``gmixout+vrf``)."""
    if text is None or text.strip() in ("", "all"):
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        split_pair(name)
    return list(dict.fromkeys(names))


def parse_seeds_option(text: str) -> list[int]:
    """``--seeds 0,1,2`` -> ``[0, 1, 2]``."""
    try:
        seeds = [int(seed) for seed in text.split(",") if seed.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: give distinct integers, e.g. 0,1,2")
    return seeds


def load_compare_config(path: Path | str, overrides: list[str] | None = None) -> tuple[RunConfig, CompareSection]:
    """A run config and its ``compare:`` section (``--set compare.optim.lora.lr=1e-3`` works too)."""
    raw = apply_overrides(read_config_yaml(path), overrides or [])
    section = raw.pop("compare", None) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: compare: must be a mapping (methods, seeds, optim, options, soup_learning_rates)")
    try:
        settings = CompareSection.model_validate(section)
    except ValidationError as error:
        raise ConfigError(f"{path}: {format_validation_errors(error, prefix=('compare',))}") from None
    return parse_config(raw, source=str(path)), settings


def runnable_methods(names: Sequence[str], base: RunConfig, log: Callable[[str], None]) -> list[str]:
    """The methods ``base``'s model can run; a method needing a text tower is skipped (logged) on other models."""
    runnable = []
    for name in names:
        parts = [part for part in split_pair(name) if part is not None]
        if any(get_method(part).requires_text_tower for part in parts) and base.model.source != "open_clip":
            log(f"{name}: skipped (needs a CLIP-style model with a text tower; {base.model.name} has none)")
        else:
            runnable.append(name)
    return runnable


def method_kind(name: str) -> str:
    """zeroshot (trains nothing, combines nothing), posthoc (combines runs) or trained."""
    cls = method_class(name)
    if combines_runs(cls):
        return "posthoc"
    return "trained" if cls.trains or name != ZERO_SHOT else "zeroshot"


def default_soup_learning_rates(lr: float) -> list[float]:
    """The soups' extra fine-tunes: a third and three times the recipe's rate (3 significant digits)."""
    return [float(f"{lr / 3:.3g}"), float(f"{lr * 3:.3g}")]


def plan_seed(
    base: RunConfig,
    methods: Sequence[str],
    seed: int,
    root: Path,
    settings: CompareSection,
    progress: bool = False,
) -> list[PlannedRun]:
    """The runs of one seed in the order they must run: single-model methods, soup ingredients, post-hoc."""
    raw = base.model_dump(mode="json")
    raw.pop("method")
    own_options = {base.method.name: base.method.options()}

    def config(method: str, name: str, output_dir: Path, options: dict[str, Any], optim: dict[str, Any]):
        run = copy.deepcopy(raw)
        run.update(name=name, seed=seed, output_dir=str(output_dir))
        run["method"] = {"name": method, **own_options.get(method, {}), **settings.options.get(method, {}), **options}
        run["optim"].update({**settings.optim.get(method, {}), **optim})
        run["train"]["progress"] = progress
        source = f"compare: {method} (seed {seed})"
        return checked(parse_config(run, source=source), source)

    single = [name for name in methods if not combines_runs(method_class(name))]
    combined = [name for name in methods if combines_runs(method_class(name))]
    plans = [PlannedRun(name, method_kind(name), config(name, name, root, {}, {})) for name in single]
    finetuned = root / FINETUNED
    ingredients: list[Path] = []
    if any(method_class(name).several_runs for name in combined):
        lrs = settings.soup_learning_rates or default_soup_learning_rates(base.optim.lr)
        ingredients = [finetuned]
        for lr in lrs:
            name = point_name({"optim.lr": lr})
            plan = PlannedRun(FINETUNED, "ingredient", config(FINETUNED, name, root / INGREDIENTS_DIR, {}, {"lr": lr}))
            plans.append(plan)
            ingredients.append(plan.run_dir)
    for name in combined:
        over, method = split_pair(name)
        cls = get_method(method)
        inputs = ingredients if cls.several_runs else [root / over if over else finetuned]
        options = cls.input_options(inputs)
        plans.append(PlannedRun(method, "posthoc", config(method, name, root, options, {}), list(inputs)))
    return plans


def with_references(names: Sequence[str], log: Callable[[str], None]) -> list[str]:
    """``names`` with the zero-shot and fine-tune runs effective robustness is measured against, first."""
    missing = [reference for reference in (ZERO_SHOT, FINETUNED) if reference not in names]
    if missing:
        log(f"adding {', '.join(missing)}: the references of effective robustness")
    return [*[name for name in (ZERO_SHOT, FINETUNED) if name in missing], *names]


# ------------------------------------------------------------------------------------------ running


def seed_workers_launcher(workers: int, launcher: str = "local") -> Launcher | None:
    """``--seed-workers N``: None for 1 (this process runs the seeds one after another), else the launcher that
    runs them side by side in N worker processes (``launchers.SeedWorkersLauncher``, imported only then).

    Raises:
        ConfigError: N below 1, or N above 1 with ``--launcher submitit`` (which already runs one job per run).
    """
    if workers < 1:
        raise ConfigError(f"--seed-workers {workers}: must be at least 1")
    if workers == 1:
        return None
    if launcher != "local":
        raise ConfigError(
            f"--seed-workers {workers} and --launcher {launcher} exclude each other: "
            f"--launcher {launcher} already runs every run as its own job; drop one of the two options"
        )
    from robustft.launchers import SeedWorkersLauncher

    return SeedWorkersLauncher(workers)


def run_compare(
    base: RunConfig,
    methods: list[str] | None,
    seeds: list[int],
    out: Path,
    log: Callable[[str], None] = print,
    progress: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Run the comparison into ``out`` and return the leaderboard (``{}`` when a run stopped early).

    ``options`` are those of :func:`execute_comparison` (``settings``, ``prepared``, ``source``...).
    """
    return execute_comparison(base, methods, seeds, out, log=log, progress=progress, **options).leaderboard or {}


def execute_comparison(
    base: RunConfig,
    methods: list[str] | None,
    seeds: list[int],
    out: Path,
    log: Callable[[str], None] = print,
    progress: bool = False,
    *,
    settings: CompareSection | None = None,
    prepared: Prepared | None = None,
    references: bool = True,
    seed_dirs: bool = True,
    source: str = "config",
    title: str | None = None,
    launcher: Launcher | None = None,
) -> Comparison:
    """Every planned run of every seed (fitted, or read back when finished), then the leaderboard and report.

    ``prepared`` reuses loaded data and model for every seed (tests); ``references`` False runs only the
    methods asked for (no zero-shot / fine-tune added for effective robustness); ``seed_dirs`` False puts
    the runs of a single seed directly in ``out`` (the demo's layout).
    """
    settings = settings or CompareSection()
    out = Path(out)
    if not seeds:
        raise ConfigError("--seeds: give at least one seed")
    if not seed_dirs and len(seeds) > 1:
        raise ValueError("several seeds need one directory each (seed_dirs=True)")
    names = runnable_methods(methods or list_methods(), base, log)
    if not names:
        raise ConfigError("--methods: none of the chosen methods can run on this model")
    bases = [base for base, _ in map(split_pair, names) if base is not None and base not in names]
    if bases:
        log(f"adding {', '.join(dict.fromkeys(bases))}: the base run(s) of the requested pairs")
        names = [*dict.fromkeys(bases), *names]
    if references:
        names = with_references(names, log)
    elif any(combines_runs(method_class(n)) and "+" not in n for n in names) and FINETUNED not in names:
        log(
            f"{', '.join(n for n in names if combines_runs(method_class(n)))} combine(s) a fine-tuned run: "
            "running finetune too"
        )
        names = [*names, FINETUNED]
    roots = {seed: out / f"seed{seed}" if seed_dirs else out for seed in seeds}
    names = preflight_comparison(base, names, seeds[0], roots[seeds[0]], settings, progress, prepared, log)
    statuses: list[dict[str, Any]] = []
    per_seed: dict[int, dict[str, Any]] = {}
    kinds: dict[str, str] = {}
    costs: dict[int, dict[str, dict[str, Any]]] = {}
    runs: dict[int, dict[str, str]] = {}
    seed_free = not randomly_initialised(base.model.model_dump(mode="json"))
    first_results: dict[str, dict[str, Any]] = {}  # seed-independent runs of the first seed, by method

    def shared(plan: PlannedRun) -> bool:
        return seed_free and plan.config.seed != seeds[0] and is_seed_independent(plan)

    all_plans = [plan for seed in seeds for plan in plan_seed(base, names, seed, roots[seed], settings, progress)]
    all_plans = [plan for plan in all_plans if not shared(plan)]
    launched = launcher.execute(launcher.comparison_tasks(all_plans), out, log) if launcher else {}
    overall = RunsProgress(len(all_plans), log)
    for seed in seeds:
        root = roots[seed]
        plans = plan_seed(base, names, seed, root, settings, progress)
        for saved in [plan.run_dir / "config.yaml" for plan in plans if (plan.run_dir / "config.yaml").is_file()]:
            read_yaml_mapping(saved)  # a torn or unsafe config.yaml is named before any run of the seed starts
        seed_run = _SeedRunner(plans[0].config, prepared, log)
        if seed_free:  # the data and the zero-shot model do not depend on the seed: prepared once
            prepared = seed_run.prepared_lazily()
        redone: set[Path] = set()
        merged: dict[str, Any] = {"benchmark": None, "seed": seed, "methods": {}}
        costs[seed], runs[seed] = {}, {}
        for plan in plans:
            if shared(plan):
                name, results = plan.config.name, first_results[plan.config.name]
                log(f"{plan.method} (seed {seed}): seed-independent, the seed {seeds[0]} run is reported for it")
                status = {"seed": seed, "method": plan.method, "run_dir": results["run_dir"], "status": "shared"}
                statuses.append(status)
                _write_manifest(out, statuses)
                merged["methods"][results["name"]] = results["entry"]
                kinds[results["name"]] = plan.kind
                costs[seed][results["name"]] = costs[seeds[0]][results["name"]]
                runs[seed][results["name"]] = results["run_dir"]
                continue
            label = f"{plan.config.name} ({plan.kind}, seed {seed})"
            overall.started(label)
            if plan.run_dir in launched and not launched[plan.run_dir].results:  # stopped early in its job
                results, status = None, launched[plan.run_dir].status
            else:
                results, status = seed_run.run(plan, redone)
            entry_of_run = next(iter((results or {}).get("methods", {}).values()), {})
            overall.finished(label, f"{status}: {results_summary(entry_of_run)}", timed=status == "fitted")
            entry = {"seed": seed, "method": plan.method, "run_dir": str(plan.run_dir), "status": status}
            if plan.run_dir in launched:  # run by a job: its status, not the read-back's
                entry |= {"status": launched[plan.run_dir].status, "job_id": launched[plan.run_dir].job_id}
            statuses.append(entry)
            _write_manifest(out, statuses)
            if not results:
                log(f"{plan.run_dir}: stopped early (train.stop_after); run the same command again to continue")
                return Comparison(None, per_seed, statuses)
            if status == "fitted":
                redone.add(plan.run_dir)
            if plan.kind == "ingredient":
                continue
            merged["benchmark"] = results["benchmark"]
            name, entry = next(iter(results["methods"].items()))
            if seed_free and is_seed_independent(plan):
                entry = {**entry, "seed_independent": True}
                first_results[plan.config.name] = {"name": name, "entry": entry, "run_dir": str(plan.run_dir)}
            merged["methods"][name] = entry
            kinds[name] = plan.kind
            costs[seed][name] = seed_run.costs(plan)
            runs[seed][name] = str(plan.run_dir)
        per_seed[seed] = merged
    leaderboard = build_leaderboard(per_seed, kinds, costs, runs, source)
    track_effective_robustness(per_seed, runs, log)
    write_leaderboard(leaderboard, out)
    _write_report(leaderboard, per_seed[seeds[0]], out, title, log)
    return Comparison(leaderboard, per_seed, statuses)


def track_effective_robustness(
    per_seed: Mapping[int, dict[str, Any]], runs: Mapping[int, Mapping[str, str]], log: Callable[[str], None]
) -> None:
    """Each run's effective robustness (against its seed's zero-shot and fine-tune runs) to its trackers.

    A run reported for several seeds (seed-independent) is sent the value of the first seed, the one it ran in.
    """
    sent: set[str] = set()
    for seed, results in per_seed.items():
        for name, entry in add_effective_robustness(results)["methods"].items():
            run_dir = runs[seed][name]
            if run_dir in sent or entry.get("effective_robustness") is None:
                continue
            sent.add(run_dir)
            step = int(entry.get("steps") or 0)
            log_effective_robustness(Path(run_dir), float(entry["effective_robustness"]), step, name, log)


def is_seed_independent(plan: PlannedRun) -> bool:
    """A single-model run whose method declares its result independent of the seed (zero-shot, linear probe)."""
    return plan.kind != "posthoc" and "+" not in plan.method and get_method(plan.method).seed_independent


def preflight_comparison(
    base: RunConfig,
    names: list[str],
    seed: int,
    root: Path,
    settings: CompareSection,
    progress: bool,
    prepared: Prepared | None,
    log: Callable[[str], None],
) -> list[str]:
    """The methods to run after checking every run before the first starts (``robustft.preflight``).

    Every method's config is planned on its own, so all bad options are reported at once; the model and
    the data are loaded once and each method is asked whether it works on the model. A method that does
    not is skipped with its reason (with the pairs built on it); a problem of the model, the data or a
    reference run (zero-shot, fine-tune) stops the comparison before any run, every problem on one line.
    Seeds change neither model nor data, so one seed's runs are checked; finished runs are not.
    """
    from robustft.preflight import PreflightError, Problem, check_runs

    problems = []
    for name in names:
        try:
            plan_seed(base, [name], seed, root, settings, progress)
        except ConfigError as error:
            problems.append(Problem(f"compare: {name}", str(error)))
    if problems:
        raise PreflightError(problems)
    plans = plan_seed(base, names, seed, root, settings, progress)
    pending = [plan for plan in plans if run_action(plan, set())[0] != "reuse"]
    labelled = [(FINETUNED if plan.kind == "ingredient" else plan.config.name, plan.config) for plan in pending]
    found = check_runs(labelled, log, prepared.model if prepared is not None else None)
    found.raise_problems(include_incompatible=False)
    reasons = found.incompatible
    fatal = [Problem(f"compare: {name}", reasons[name]) for name in (ZERO_SHOT, FINETUNED) if name in reasons]
    if fatal:
        raise PreflightError(fatal)  # every method is measured against these two
    kept = []
    for name in names:
        blocking = [part for part in (name, *(p for p in split_pair(name) if p)) if part in reasons]
        if blocking:
            log(f"{name}: skipped ({reasons[blocking[0]]})")
        else:
            kept.append(name)
    if not kept:
        raise ConfigError("--methods: none of the chosen methods can run on this model")
    return kept


class _SeedRunner:
    """Fits or reads back the runs of one seed, preparing data and model only when a run needs them."""

    def __init__(self, first: RunConfig, prepared: Prepared | _LazyPrepared | None, log: Callable[[str], None]) -> None:
        self.first, self.log = first, log
        self.shared = prepared if isinstance(prepared, _LazyPrepared) else _LazyPrepared(prepared)
        self.batch: Tensor | None = None

    @property
    def prepared(self) -> Prepared | None:
        return self.shared.prepared

    def prepared_lazily(self) -> _LazyPrepared:
        """The data this runner prepares when first needed, to hand to the next seed's runner."""
        return self.shared

    def data(self) -> Prepared:
        if self.shared.prepared is None:
            self.shared.prepared = prepare_run(self.first, self.log)
        return self.shared.prepared

    def run(self, plan: PlannedRun, redone: set[Path]) -> tuple[dict[str, Any], str]:
        action, reason = run_action(plan, redone)
        if action == "reuse":
            self.log(f"{plan.run_dir}: finished before, reused")
            return read_json_object(plan.run_dir / RESULTS_FILE), "reused"
        if reason:
            self.log(f"{plan.run_dir}: {reason}")
        prepared = self.data()
        cuda = prepared.ctx.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(prepared.ctx.device)
        self.log(f"{plan.method} ({plan.kind}, seed {plan.config.seed}): running into {plan.run_dir}")
        resume = action == "resume"
        results = fit(plan.config, resume=resume, log=self.log, prepared=prepared, overwrite=not resume)
        if results and plan.kind != "ingredient":
            peak = torch.cuda.max_memory_allocated(prepared.ctx.device) / 2**20 if cuda else None
            self._write_costs(plan, peak)
        return results, "fitted"

    def costs(self, plan: PlannedRun) -> dict[str, Any]:
        """The run's measured costs; a run finished by an older version without them gets its inference timed."""
        path = plan.run_dir / COSTS_FILE
        if not path.is_file():
            self._write_costs(plan, None)
        return json.loads(path.read_text())

    def _write_costs(self, plan: PlannedRun, peak_memory_mb: float | None) -> None:
        prepared = self.data()
        if self.batch is None:
            self.batch = inference_batch(prepared)
        predictor = load_run_predictor(copy.deepcopy(prepared.model), plan.run_dir, None).predictor
        ratio = inference_cost(predictor, prepared.model, self.batch)
        costs = {
            "peak_memory_mb": peak_memory_mb,
            "inference_cost": ratio,
            "inference_batch": len(self.batch),
            "device": str(prepared.ctx.device),
        }
        text = json.dumps(costs, indent=2) + "\n"
        atomic_write(plan.run_dir / COSTS_FILE, lambda tmp: tmp.write_text(text))


@dataclass
class _LazyPrepared:
    """Data and zero-shot model prepared on first use and shared by the seeds' runners (with its logit cache)."""

    prepared: Prepared | None = None


def run_action(plan: PlannedRun, redone: set[Path]) -> tuple[str, str]:
    """What to do with ``plan``'s run directory, and why: ``reuse`` it (finished, same config, inputs
    unchanged), ``resume`` it (interrupted, same config) or run it ``fresh`` (absent, changed or stale)."""
    if not (plan.run_dir / "config.yaml").is_file():
        return "fresh", ""
    saved = read_yaml_mapping(plan.run_dir / "config.yaml")  # a torn or unsafe config.yaml: one line naming it
    differences = config_differences(resolved_config(plan.config), saved, ignored=_IGNORED_CONFIG_KEYS)
    difference = differences[0] if differences else None  # paths compared resolved: --out runs vs /abs/runs
    if difference:
        return "fresh", f"its config.yaml differs ({difference}); running it again"
    if not is_finished_run(plan.run_dir):
        return "resume", "interrupted before; resuming it"
    stale = [path.name for path in plan.inputs if path in redone]
    if stale:
        return "fresh", f"its input run(s) {', '.join(stale)} were redone; running it again"
    return "reuse", ""


def inference_batch(prepared: Prepared) -> Tensor:
    """The first ``INFERENCE_BATCH`` images of ``id_test`` (else the first evaluation split), on the device."""
    splits = prepared.ctx.splits
    name = "id_test" if "id_test" in splits else next(name for name in splits if name != "train")
    images, _ = next(iter(sequential_loader(splits[name], INFERENCE_BATCH)))
    return images.to(prepared.ctx.device)


@torch.no_grad()
def inference_cost(
    predictor: nn.Module, reference: nn.Module, batch: Tensor, repeats: int = INFERENCE_REPEATS
) -> float:
    """Median forward time of ``predictor`` over that of ``reference`` on ``batch`` (1.0: the same cost).

    The two are timed alternately after one warm-up each, so a busy machine slows both alike; on a
    GPU each forward is bracketed by synchronisations (deliberate: a wall-clock time needs them).
    """
    predictor.eval()
    reference.eval()
    predictor(batch)
    reference(batch)
    times: dict[str, list[float]] = {"predictor": [], "reference": []}
    for _ in range(repeats):
        for key, model in (("reference", reference), ("predictor", predictor)):
            times[key].append(_timed_forward(model, batch))
    return statistics.median(times["predictor"]) / statistics.median(times["reference"])


def _timed_forward(model: nn.Module, batch: Tensor) -> float:
    cuda = batch.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(batch.device)
    start = time.perf_counter()
    model(batch)
    if cuda:
        torch.cuda.synchronize(batch.device)
    return time.perf_counter() - start


def _write_manifest(out: Path, statuses: list[dict[str, Any]]) -> None:
    text = json.dumps({"runs": statuses}, indent=2) + "\n"
    atomic_write(out / RUNS_MANIFEST, lambda tmp: tmp.write_text(text))


# ---------------------------------------------------------------------------------------- leaderboard


def mean_std(values: Sequence[float | None]) -> dict[str, float] | None:
    """Mean and population standard deviation (0 for one value); None when any value is missing."""
    if not values or any(value is None for value in values):
        return None
    numbers = [float(value) for value in values]  # type: ignore[arg-type]
    return {"mean": statistics.fmean(numbers), "std": statistics.pstdev(numbers)}


def _ece_ood_avg(entry: Mapping[str, Any]) -> float | None:
    values = [value for split, value in (entry.get("ece") or {}).items() if split.startswith("ood_")]
    return statistics.fmean(values) if values else None


def build_leaderboard(
    per_seed: Mapping[int, dict[str, Any]],
    kinds: Mapping[str, str],
    costs: Mapping[int, Mapping[str, Mapping[str, Any]]],
    runs: Mapping[int, Mapping[str, str]],
    source: str,
) -> dict[str, Any]:
    """The leaderboard from each seed's merged results (``{"methods": {name: results entry}}``).

    Effective robustness is computed per seed against that seed's zero-shot and fine-tune runs, then
    averaged, so its spread over seeds includes the spread of the references.
    """
    seeds = list(per_seed)
    scored = {seed: add_effective_robustness(results)["methods"] for seed, results in per_seed.items()}
    benchmark = next(iter(per_seed.values()))["benchmark"]
    methods: dict[str, Any] = {}
    for name in scored[seeds[0]]:
        entries = [scored[seed][name] for seed in seeds]
        splits = sorted({split for entry in entries for split in entry.get("ood", {})})
        row: dict[str, Any] = {
            "kind": kinds[name],
            "id": mean_std([entry["id"] for entry in entries]),
            "ood_avg": mean_std([ood_average(entry) for entry in entries]),
            "effective_robustness": mean_std([entry.get("effective_robustness") for entry in entries]),
            "ood": {split: mean_std([entry.get("ood", {}).get(split) for entry in entries]) for split in splits},
        }
        if all("base_to_new" in entry for entry in entries):  # CoOp's base / new / harmonic mean
            row["base_to_new"] = {
                k: mean_std([entry["base_to_new"][k] for entry in entries]) for k in ("base", "new", "hm")
            }
        if all("ece" in entry for entry in entries):
            row["ece_id"] = mean_std([entry["ece"].get("id_test") for entry in entries])
            row["ece_ood_avg"] = mean_std([_ece_ood_avg(entry) for entry in entries])
        peaks = [costs[seed][name].get("peak_memory_mb") for seed in seeds]
        ratios = [costs[seed][name].get("inference_cost") for seed in seeds]
        row |= {
            "train_seconds": mean_std([entry.get("train_seconds") for entry in entries]),
            "peak_memory_mb": max(peaks) if all(peak is not None for peak in peaks) else None,
            "trainable_params": int(entries[0].get("trainable_params", 0)),
            "inference_cost": statistics.fmean(ratios) if all(r is not None for r in ratios) else None,
            "runs": [runs[seed][name] for seed in seeds],
        }
        if all(entry.get("seed_independent") for entry in entries):
            row["seed_independent"] = True  # run once, reported for every seed
        declared = leaderboard_declarations(entries)  # the report's extra sections and columns, by name
        row |= declared | {key: mean_std([entry.get(key) for entry in entries]) for key in declared["report_columns"]}
        methods[name] = row
    for name, extra in leaderboard_statistics({name: row["runs"] for name, row in methods.items()}).items():
        methods[name] |= extra  # 95% intervals and paired tests from each run's predictions.safetensors
    return {
        "schema_version": SCHEMA_VERSION,
        "benchmark": benchmark,
        "seeds": seeds,
        "config": source,
        "reference": {"zero_shot": ZERO_SHOT, "finetuned": FINETUNED},
        "statistics": statistics_settings(),
        "methods": methods,
    }


def _write_report(
    leaderboard: dict[str, Any], first_seed: dict[str, Any], out: Path, title: str | None, log: Callable[[str], None]
) -> None:
    """The comparison report and the first seed's merged results.json (``report.write_comparison_outputs``)."""
    write_comparison_outputs(leaderboard, first_seed, out, log)
