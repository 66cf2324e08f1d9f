"""The ``robustft`` command: thin wrappers over runner / demo / report functions."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from robustft.errors import RobustftError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Robust fine-tuning of vision foundation models.")
console = Console(width=None if sys.stdout.isatty() else 160)  # logs and pipes get the whole table

SetOption = Annotated[list[str] | None, typer.Option("--set", help="override a config key: KEY=VALUE (repeatable)")]


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="output directory")] = Path("runs/demo"),
    seed: Annotated[int, typer.Option(help="training seed")] = 0,
    methods: Annotated[str | None, typer.Option(help="comma-separated subset of methods")] = None,
    epochs: Annotated[int | None, typer.Option(help="shorter budget (default: the recipe's)")] = None,
) -> None:
    """Every registered method on the built-in digits-shift benchmark: table, report and plot."""
    from robustft.demo import run_demo
    from robustft.report import print_table

    start = time.perf_counter()
    chosen = [m.strip() for m in methods.split(",")] if methods else None
    results = run_demo(out, seed=seed, methods=chosen, epochs=epochs, log=console.print)
    print_table(results, console)
    console.print(f"total time: {time.perf_counter() - start:.1f}s; report: {out / 'report.md'}")


@app.command("fit")
def fit_command(
    config: Annotated[Path, typer.Argument(help="run config (YAML)")],
    overrides: SetOption = None,
    resume: Annotated[bool, typer.Option(help="continue from the run's last checkpoint")] = False,
) -> None:
    """Train one method from a config; writes the run directory (config, metrics, checkpoints, results)."""
    from robustft.config import load_config
    from robustft.report import print_table
    from robustft.runner import fit

    run_config = load_config(config, overrides)
    results = fit(run_config, resume=resume, log=console.print)
    if results:
        print_table(results, console)
        console.print(f"run directory: {run_config.run_dir}")


@app.command()
def evaluate(run_dir: Annotated[Path, typer.Argument(help="a finished run directory")]) -> None:
    """Re-evaluate a finished run on every split of its config."""
    from robustft.report import print_table
    from robustft.runner import evaluate_run

    print_table(evaluate_run(run_dir, log=console.print), console)


@app.command("methods")
def methods_command() -> None:
    """List every registered method with its options and defaults."""
    from rich.table import Table

    from robustft.methods import get_method, list_methods, method_options_help

    table = Table("method", "trains", "option", "default", "description")
    for name in list_methods():
        cls = get_method(name)
        options = method_options_help(cls) or [("-", "", "")]
        for i, (option, default, description) in enumerate(options):
            first = i == 0
            table.add_row(name if first else "", ("yes" if cls.trains else "no") if first else "",
                          option, repr(default) if option != "-" else "", description)
    console.print(table)


@app.command()
def report(
    paths: Annotated[list[Path], typer.Argument(help="run directories or results.json files")],
    out: Annotated[Path, typer.Option(help="where to write report.md and figures")] = Path("report"),
) -> None:
    """Merge results of several runs into one table, report.md and ID-vs-OOD plot."""
    from robustft.report import load_results, print_table, write_report

    results = load_results(paths)
    path = write_report(results, out)
    print_table(results, console)
    console.print(f"report: {path}")


@app.command("pretrain-digits")
def pretrain_digits(
    out: Annotated[Path, typer.Option(help="where to write the checkpoint")] = Path("digits_vit.safetensors"),
    steps: Annotated[int, typer.Option(help="optimiser steps")] = 3000,
) -> None:
    """Re-create the built-in benchmark's pretrained tiny ViT (deterministic on CPU)."""
    from robustft.pretrain import pretrain_digits_vit

    pretrain_digits_vit(out, steps=steps, log=console.print)
    console.print(f"wrote {out}")


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except RobustftError as error:
        print(f"robustft: error: {error}", file=sys.stderr)
        sys.exit(2)
