"""``robustft demo``: every registered method on digits-shift, one table, one report, under 10 minutes on CPU."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from robustft.config import RunConfig, parse_config
from robustft.methods import list_methods
from robustft.report import write_report
from robustft.runner import fit, prepare_run

# The digits-shift fine-tuning recipe every trained method shares (FT's, as the papers compare).
DEMO_RECIPE: dict[str, Any] = {
    "data": {"benchmark": "digits_shift", "batch_size": 64, "eval_batch_size": 512},
    "optim": {"name": "adamw", "lr": 3e-4, "weight_decay": 0.1, "warmup_fraction": 0.1},
    "train": {"epochs": 8, "grad_clip": 1.0, "checkpoint_every": 1000, "log_every": 10},
}


def demo_config(method: str, seed: int, out: Path, epochs: int | None = None, **train: Any) -> RunConfig:
    """The run config of one method in the demo (``epochs`` shortens the budget for tests)."""
    raw = {
        "name": method,
        "seed": seed,
        "output_dir": str(out),
        "method": {"name": method},
        "data": dict(DEMO_RECIPE["data"]),
        "optim": dict(DEMO_RECIPE["optim"]),
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
    """Run the methods (default: all registered) and write ``out/report.md`` + figures; returns results."""
    start = time.perf_counter()
    names = methods or list_methods()
    prepared = prepare_run(demo_config(names[0], seed, out, epochs), log)
    merged: dict[str, Any] = {"benchmark": prepared.benchmark, "seed": seed, "methods": {}}
    for name in names:
        config = demo_config(name, seed, out, epochs, progress=progress)
        log(f"{name}: training..." if _trains(name) else f"{name}: evaluating...")
        results = fit(config, log=log, prepared=prepared)
        merged["methods"].update(results["methods"])
    report = write_report(merged, out, title="robustft demo: digits-shift")
    merged["total_seconds"] = time.perf_counter() - start
    log(f"report: {report}")
    return merged


def _trains(name: str) -> bool:
    from robustft.methods import get_method

    return get_method(name).trains
