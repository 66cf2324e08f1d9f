"""``robustft demo``: every registered method on digits-shift, one table, one report, under 10 minutes on CPU."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from robustft.config import RunConfig, parse_config
from robustft.methods import get_method, list_methods
from robustft.posthoc import combines_runs
from robustft.report import write_report
from robustft.runner import Prepared, fit, prepare_run
from robustft.sweep import point_name

# The digits-shift fine-tuning recipe every trained method shares (FT's, as the papers compare).
DEMO_RECIPE: dict[str, Any] = {
    "data": {"benchmark": "digits_shift", "batch_size": 64, "eval_batch_size": 512},
    "optim": {"name": "adamw", "lr": 3e-4, "weight_decay": 0.1, "warmup_fraction": 0.1},
    "train": {"epochs": 8, "grad_clip": 1.0, "checkpoint_every": 1000, "log_every": 10},
}
# Adapter methods train ~1% of the weights and underfit at FT's rate (measured on digits-shift, seed 0, in
# docs/benchmarks.md: LoRA 91.4 ID at 3e-4 vs 96.0 at 1e-3; MoA 89.4 at 3e-4 vs 95.2 at 3e-3), so, as in
# their papers, they get their own learning rate.
METHOD_OPTIM: dict[str, dict[str, Any]] = {"lora": {"lr": 1e-3}, "mixture_of_adapters": {"lr": 3e-3}}
# Model Soups need several fine-tunes from one initialisation: the main run plus these learning rates.
SOUP_LEARNING_RATES = (1e-4, 1e-3)
INGREDIENTS_DIR = "soup_ingredients"


def demo_config(
    method: str,
    seed: int,
    out: Path,
    epochs: int | None = None,
    *,
    name: str | None = None,
    method_options: dict[str, Any] | None = None,
    optim: dict[str, Any] | None = None,
    **train: Any,
) -> RunConfig:
    """The run config of one method in the demo (``epochs`` shortens the budget for tests).

    ``method_options`` fill the method's section (a post-hoc method's input runs); ``optim``
    overrides the recipe's optimiser keys (soup ingredients); ``name`` the run directory's name.
    """
    raw = {
        "name": name or method,
        "seed": seed,
        "output_dir": str(out),
        "method": {"name": method, **(method_options or {})},
        "data": dict(DEMO_RECIPE["data"]),
        "optim": {**DEMO_RECIPE["optim"], **METHOD_OPTIM.get(method, {}), **(optim or {})},
        "train": {**DEMO_RECIPE["train"], **train, **({"epochs": epochs} if epochs else {})},
    }
    return parse_config(raw, source=f"demo:{method}")


def run_demo(
    out: Path,
    seed: int = 0,
    methods: list[str] | None = None,
    epochs: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the methods (default: all registered) and write ``out/report.md`` + figures; returns results.

    Methods that train or evaluate one model run first; post-hoc methods (WiSE-FT, OSE, soups) then
    combine the demo's own runs: the ``finetune`` run (added if not requested) and, for soups, extra
    fine-tunes at ``SOUP_LEARNING_RATES`` into ``out/soup_ingredients/``.
    """
    start = time.perf_counter()
    names = _runnable_on_builtin_model(methods or list_methods(), log)
    single = [name for name in names if not combines_runs(get_method(name))]
    combined = [name for name in names if combines_runs(get_method(name))]
    if combined and "finetune" not in single:
        log(f"{', '.join(combined)} combine(s) a fine-tuned run: running finetune too")
        single.append("finetune")
    prepared = prepare_run(demo_config(single[0], seed, out, epochs), log)
    merged: dict[str, Any] = {"benchmark": prepared.benchmark, "seed": seed, "methods": {}}
    for name in single:
        config = demo_config(name, seed, out, epochs, progress=progress)
        log(f"{name}: training..." if _trains(name) else f"{name}: evaluating...")
        results = fit(config, log=log, prepared=prepared)
        merged["methods"].update(results["methods"])
    ingredients = []
    if any(get_method(name).needs_ingredients for name in combined):
        ingredients = [out / "finetune", *_soup_ingredients(out, seed, epochs, progress, prepared, log)]
    for name in combined:
        options = _posthoc_options(name, out, ingredients)
        config = demo_config(name, seed, out, epochs, method_options=options, progress=progress)
        log(f"{name}: combining runs...")
        results = fit(config, log=log, prepared=prepared)
        merged["methods"].update(results["methods"])
    report = write_report(merged, out, title="robustft demo: digits-shift")
    merged["total_seconds"] = time.perf_counter() - start
    log(f"report: {report}")
    return merged


def _runnable_on_builtin_model(names: list[str], log: Callable[[str], None]) -> list[str]:
    """The methods the built-in digits ViT can run; the others are skipped with a logged reason."""
    runnable = []
    for name in names:
        if get_method(name).requires_text_tower:
            log(f"{name}: skipped (needs a CLIP-style model with a text tower; the built-in digits_vit has none)")
        else:
            runnable.append(name)
    return runnable


def _trains(name: str) -> bool:
    return get_method(name).trains


def _posthoc_options(name: str, out: Path, ingredients: list[Path]) -> dict[str, Any]:
    """A post-hoc method's inputs from the demo's runs, read off what the method says it needs."""
    cls = get_method(name)
    options: dict[str, Any] = {}
    if cls.needs_finetuned_run:
        options["finetuned_run"] = str(out / "finetune")
    if cls.needs_ingredients:
        options["ingredients"] = [str(run) for run in ingredients]
    return options


def _soup_ingredients(
    out: Path, seed: int, epochs: int | None, progress: bool, prepared: Prepared, log: Callable[[str], None]
) -> list[Path]:
    """Extra fine-tunes from the same initialisation at other learning rates (soup ingredients)."""
    runs = []
    for lr in SOUP_LEARNING_RATES:
        name = point_name({"optim.lr": lr})
        config = demo_config("finetune", seed, out / INGREDIENTS_DIR, epochs, name=name, optim={"lr": lr},
                             progress=progress)
        log(f"soup ingredient {name}: training...")
        entry = fit(config, log=log, prepared=prepared)["methods"]["finetune"]
        log(f"soup ingredient {name}: ID {entry['id']:.2f}, OOD avg {entry['ood_avg']:.2f}")
        runs.append(config.run_dir)
    return runs
