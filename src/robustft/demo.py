"""``robustft demo``: every registered method on a built-in benchmark, one table, one report, minutes on CPU.

The demo is ``robustft compare`` (:mod:`robustft.compare`) with a fixed recipe: a built-in model and its
benchmark, the fine-tuning recipe below, and the per-method learning rates the adapters' papers call for.
The default model is the tiny CLIP (``glyph_clip``: OpenCLIP, loaded like any user's CLIP checkpoint, on
glyphs-shift), so text zero-shot heads, FLYP and OpenCLIP's attention take the path real CLIPs take; the
classifier-head timm ViT on digits-shift (``digits_vit``) stays as the second built-in model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robustft.compare import INGREDIENTS_DIR, CompareSection, execute_comparison, seed_workers_launcher
from robustft.config import RunConfig, parse_config
from robustft.errors import ConfigError
from robustft.methods import checked

BENCHMARK_TITLES = {"glyph_clip": "glyphs-shift, tiny CLIP", "digits_vit": "digits-shift, tiny ViT"}

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
DEMO_SPLIT_SIZES = {
    "train": 640, "id_val": 400, "id_test": 600,
    "ood_fonts": 300, "ood_corruption": 300, "ood_color": 300, "ood_rotation": 300,
}  # fmt: skip
BUILTIN_MODELS = ("glyph_clip", "digits_vit")
# Post-hoc sweeps in the tiny CLIP's demo: three interior mixing coefficients instead of nine, each one a
# forward over every split (the full sweep stays the default for users' runs).
DEMO_ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0]


@dataclass(frozen=True)
class ModelRecipe:
    """What the demo changes for one built-in model on top of ``DEMO_RECIPE``: data and train keys, the
    soup ingredients' learning rates and per-method options."""

    data: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    soup_learning_rates: tuple[float, ...] = SOUP_LEARNING_RATES
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)


# The tiny CLIP's demo budget: a step of its image tower costs about what the digits ViT's does, and every
# method must fit 6 minutes on two CPU cores, so its demo trains 40 steps of 32 images (2 epochs of 640),
# evaluates on 300-600-image splits (``DEMO_SPLIT_SIZES``), makes its soup from one extra fine-tune and sweeps
# ``DEMO_ALPHAS``. Fine-tuning still shows the trade-off after those steps (docs/benchmarks.md has the
# budget's measurements and three-seed runs on larger splits).
MODEL_RECIPES: dict[str, ModelRecipe] = {
    "digits_vit": ModelRecipe(),
    "glyph_clip": ModelRecipe(
        data={"batch_size": 32},
        train={"epochs": 2},
        soup_learning_rates=(1e-3,),
        method_options={"wise_ft": {"alphas": DEMO_ALPHAS}, "output_ensemble": {"alphas": DEMO_ALPHAS}},
    ),
}


def builtin_model_sections(
    model: str, split_sizes: dict[str, int] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``model:`` and ``data:`` sections of a built-in model: the tiny CLIP through the open_clip path
    a user's checkpoint takes, or the timm digits ViT (the config defaults). ``split_sizes`` replaces the
    demo's glyphs-shift sizes (benchmarks run larger splits)."""
    if model == "digits_vit":
        return {}, {"benchmark": "digits_shift"}
    if model != "glyph_clip":
        raise ConfigError(f"demo: unknown built-in model '{model}' (known: {', '.join(BUILTIN_MODELS)})")
    from robustft.backbones.builtin import GLYPH_CLIP, glyph_clip_checkpoint
    from robustft.data.glyphs_shift import TEMPLATES

    model_section = {
        "source": "open_clip",
        "name": GLYPH_CLIP,
        "checkpoint": str(glyph_clip_checkpoint()),
        "templates": list(TEMPLATES),
    }
    sizes = {**DEMO_SPLIT_SIZES, **(split_sizes or {})}
    return model_section, {"benchmark": "glyphs_shift", "split_sizes": sizes}


__all__ = [
    "BUILTIN_MODELS",
    "DEMO_RECIPE",
    "DEMO_ALPHAS",
    "DEMO_SPLIT_SIZES",
    "INGREDIENTS_DIR",
    "METHOD_OPTIM",
    "MODEL_RECIPES",
    "ModelRecipe",
    "SOUP_LEARNING_RATES",
    "demo_config",
    "run_demo",
]


def demo_config(
    method: str,
    seed: int,
    out: Path,
    epochs: int | None = None,
    *,
    name: str | None = None,
    method_options: dict[str, Any] | None = None,
    optim: dict[str, Any] | None = None,
    model: str = "digits_vit",
    split_sizes: dict[str, int] | None = None,
    **train: Any,
) -> RunConfig:
    """The run config of one method in the demo (``epochs`` shortens the budget for tests).

    ``model`` is a built-in model (``BUILTIN_MODELS``); the default here is the digits ViT, whose
    small benchmark the tests share, while ``run_demo`` defaults to the tiny CLIP.

    ``method_options`` fill the method's section (a post-hoc method's input runs); ``optim``
    overrides the recipe's optimiser keys (soup ingredients); ``name`` the run directory's name;
    ``split_sizes`` the tiny CLIP's glyphs-shift split sizes.
    """
    model_section, data_section = builtin_model_sections(model, split_sizes)
    recipe = MODEL_RECIPES[model]
    raw = {
        "name": name or method,
        "seed": seed,
        "output_dir": str(out),
        "method": {"name": method, **(method_options or {})},
        "model": model_section,
        "data": {**DEMO_RECIPE["data"], **recipe.data, **data_section},
        "optim": {**DEMO_RECIPE["optim"], **METHOD_OPTIM.get(method, {}), **(optim or {})},
        "train": {**DEMO_RECIPE["train"], **recipe.train, **train, **({"epochs": epochs} if epochs else {})},
    }
    return checked(parse_config(raw, source=f"demo:{method}"), f"demo:{method}")


def run_demo(
    out: Path,
    seed: int = 0,
    methods: list[str] | None = None,
    epochs: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    seeds: list[int] | None = None,
    model: str = "glyph_clip",
    split_sizes: dict[str, int] | None = None,
    seed_workers: int = 1,
) -> dict[str, Any]:
    """``robustft compare`` on a built-in model's benchmark with the demo recipe; writes ``out/report.md`` and
    ``out/leaderboard.*``.

    Returns the first seed's merged results (``{"benchmark", "seed", "methods"}``, as ``runner.fit``
    returns for one run) plus ``total_seconds`` and the ``leaderboard``. Only the methods asked for
    run (default: all registered), plus the ``finetune`` run that post-hoc methods combine; soups also
    get fine-tunes at the model recipe's ``soup_learning_rates`` (``MODEL_RECIPES``) in
    ``out/soup_ingredients/``. With one seed the runs sit
    directly in ``out/``; with several (``seeds``) in ``out/seed<k>/``. Finished runs are reused.
    ``seed_workers`` above 1 runs the seeds side by side in that many worker processes
    (``compare.seed_workers_launcher``).
    """
    start = time.perf_counter()
    launcher = seed_workers_launcher(seed_workers)
    seeds = seeds or [seed]
    base = demo_config("finetune", seeds[0], out, epochs, progress=progress, model=model, split_sizes=split_sizes)
    settings = CompareSection(
        optim=METHOD_OPTIM,
        soup_learning_rates=list(MODEL_RECIPES[model].soup_learning_rates),
        options=MODEL_RECIPES[model].method_options,
    )
    comparison = execute_comparison(
        base,
        methods,
        seeds,
        out,
        log=log,
        progress=progress,
        settings=settings,
        references=False,
        seed_dirs=len(seeds) > 1,
        source="demo",
        title=f"robustft demo: {BENCHMARK_TITLES[model]}",
        launcher=launcher,
    )
    merged = dict(comparison.per_seed[seeds[0]])
    merged["total_seconds"] = time.perf_counter() - start
    merged["leaderboard"] = comparison.leaderboard
    return merged
