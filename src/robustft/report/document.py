"""A report as a list of format-neutral blocks, so report.md and report.html say the same thing.

:func:`run_report` (one results file: ``robustft report``) and :func:`comparison_report` (a leaderboard:
``robustft compare``) build the blocks, write the figures they show, and add the sections the methods
declared (:mod:`robustft.report.sections`); :mod:`robustft.report.markdown` and
:mod:`robustft.report.html` render the same blocks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robustft.report.tables import (
    ECE_ID,
    ECE_OOD_AVG,
    MISSING,
    Column,
    Table,
    build_table,
    leaderboard_tables,
    macro_f1_table,
    marks_legend,
    ood_mean,
    ordered_methods,
    results_table,
    split_value,
)


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    """Text with Markdown code spans (backticks) and bold (``**``); ``bullets`` make it a list."""

    text: str = ""
    bullets: tuple[str, ...] = ()
    emphasis: bool = False


@dataclass(frozen=True)
class TableBlock:
    table: Table
    row_ids: bool = False  # HTML: each row gets id="method-<name>" (the leaderboard)


@dataclass(frozen=True)
class FigureBlock:
    """A written PNG (with an SVG beside it); ``key`` names it among the files a writer returns."""

    path: Path
    alt: str
    key: str = ""


Block = Heading | Paragraph | TableBlock | FigureBlock

NOTHING_TO_PLOT = "Nothing to plot: no run logged it."
HOW_TO_READ = (
    Heading("How to read this"),
    Paragraph(
        bullets=(
            "**ID** is accuracy on the `id_test` split (the distribution the model was fine-tuned on).",
            "**OOD avg** is the unweighted mean accuracy over the OOD splits, so every kind of shift counts equally.",
            "**Eff. robustness** is OOD accuracy above the zero-shot / fine-tune trade-off line, fitted in logit\n"
            "  space (Taori et al., 2020), in percentage points. Zero-shot and fine-tune sit on the line (0) by\n"
            "  construction; a positive value means a method keeps more robustness than its ID accuracy predicts.",
            "**[lo, hi]** after an accuracy is its 95% bootstrap confidence interval over the test images (and the\n"
            "  seeds, with several); **▲ft** / **▲wise** mark a method significantly above `finetune` / `wise_ft` on\n"
            "  the same images (paired bootstrap). Overlapping intervals do not mean no difference: the marks test it.",
            'All numbers are percentages; "-" means the method was not evaluated on that split.',
        )
    ),
)
COMPARISON_FIGURES = {
    "id_vs_ood": ("ID vs OOD accuracy", "comparison_id_vs_ood"),
    "per_split": ("Accuracy per split", "comparison_per_split"),
    "alpha_curves": ("Mixing-coefficient sweeps", "comparison_alpha_curves"),
    "training_curves": ("Training loss", "comparison_training_curves"),
}
FIGURE_NAME = "id_vs_ood.png"
INTERVAL_NOTE = (
    "[lo, hi]: 95% percentile bootstrap confidence interval over the test images of the run (1000 resamples); "
    "OOD avg's interval resamples every OOD split. Two methods whose intervals overlap may still differ "
    "significantly: a paired test on the same images (the marks, where the runs kept their predictions) is the "
    "sharper check."
)
ECE_NOTE = "ECE: expected calibration error in percentage points; lower is better."


def run_report(results: Mapping[str, Any], out_dir: Path, title: str | None = None) -> list[Block]:
    """The blocks of report.md / report.html for a results file (``results`` already has effective
    robustness); writes id_vs_ood.png/.svg and the declared sections' figures into ``out_dir``."""
    from robustft.report import figures
    from robustft.report.sections import results_sections

    benchmark = results.get("benchmark", "")
    blocks: list[Block] = [
        Heading(title or f"robustft results: {benchmark}", 1),
        Paragraph(bullets=(f"Benchmark: `{benchmark}`", f"Seed: {results.get('seed')}")),
        Heading("Accuracy (%)"),
        TableBlock(results_table(results), row_ids=True),
    ]
    if any("ci" in entry for entry in results["methods"].values()):
        blocks.append(Paragraph(INTERVAL_NOTE))
    legend = marks_legend(results["methods"])
    if legend:
        blocks.append(Paragraph(legend))
    f1 = macro_f1_table(results)
    if f1 is not None:
        blocks += [Heading("Macro-F1 per split"), TableBlock(f1)]
    figure = figures.plot_id_vs_ood(results, Path(out_dir) / FIGURE_NAME)
    blocks += [Heading("ID vs OOD"), FigureBlock(figure, "ID vs OOD accuracy", "id_vs_ood")]
    blocks += results_sections(results, Path(out_dir))
    blocks += calibration_section(results)
    return [*blocks, *HOW_TO_READ]


def calibration_section(results: Mapping[str, Any]) -> list[Block]:
    """ECE (percent) and NLL (nats) on ID and OOD, raw and after temperature scaling fitted on id_val."""
    methods = results["methods"]
    calibrated = [name for name in ordered_methods(methods) if "ece" in methods[name]]
    if not calibrated:
        return []

    def per_split(header: str, key: str, decimals: int = 2) -> Column:
        return Column(header, key, lambda entry: split_value(entry, key), decimals=decimals)

    def ood(header: str, key: str, decimals: int = 2) -> Column:
        return Column(header, key, lambda entry: ood_mean(entry, key), decimals=decimals)

    columns = [
        ECE_ID,
        ECE_OOD_AVG,
        per_split("NLL ID", "nll", 3),
        ood("NLL OOD avg", "nll", 3),
        Column(
            "T (id_val)",
            "temperature",
            lambda e: MISSING if e.get("temperature") is None else f"{e['temperature']:.3g}",
            "text",
        ),
        per_split("ECE ID, TS", "ece_ts"),
        ood("ECE OOD avg, TS", "ece_ts"),
        ood("NLL OOD avg, TS", "nll_ts", 3),
    ]
    note = (
        "ECE: expected calibration error over 15 equal-width confidence bins, in percentage points; NLL: mean "
        "negative log-likelihood in nats; lower is better for both. TS: after dividing the logits by one "
        "temperature T fitted on `id_val` only (Guo et al., 2017); it never changes accuracy."
    )
    return [Heading("Calibration"), TableBlock(build_table(columns, methods, calibrated, False)), Paragraph(note)]


def comparison_notes(leaderboard: Mapping[str, Any]) -> list[str]:
    """Plain sentences a reader needs before the numbers: seeds, and whether the trade-off line exists."""
    reference = leaderboard.get("reference") or {}
    methods = leaderboard["methods"]
    missing = [role for role in ("zero_shot", "finetuned") if reference.get(role) not in methods]
    seeds = leaderboard.get("seeds") or []
    listed = ", ".join(map(str, seeds))
    if len(seeds) > 1:
        notes = [f"Mean ± standard deviation over {len(seeds)} seed(s) ({listed}); accuracies in %."]
    else:
        notes = [f"One seed ({listed}): no spread over seeds to show; accuracies in %."]
    if any("ci" in entry for entry in methods.values()):
        over = "seeds and test images" if len(seeds) > 1 else "test images"
        notes.append(f"An accuracy with an interval is `mean [lo, hi]`: its 95% bootstrap interval over {over}.")
    legend = marks_legend(methods)
    if legend:
        notes.append(legend)
    shared = [f"`{name}`" for name, row in methods.items() if row.get("seed_independent")]
    if shared and len(seeds) > 1:
        notes.append(
            f"Seed-independent (run once, the same numbers for every seed, so a std of 0): {', '.join(shared)}."
        )
    if missing:
        notes.append(
            f"No zero-shot / fine-tune trade-off line: the reference {' and '.join(missing)} method is "
            "missing from the leaderboard, so effective robustness is not defined."
        )
    else:
        notes.append(
            f"Effective robustness: OOD average above the line through `{reference['zero_shot']}` and "
            f"`{reference['finetuned']}` in logit space (Taori et al., 2020), in percentage points."
        )
    return notes


def comparison_report(leaderboard: Mapping[str, Any], out_dir: Path) -> list[Block]:
    """The blocks of the comparison report.md / report.html; writes its figures (PNG + SVG) into ``out_dir``.

    A figure with nothing to show (no sweep, no training log) is not written, and the report says so.
    """
    from robustft.report import figures
    from robustft.report.sections import leaderboard_sections

    out_dir = Path(out_dir)
    methods = leaderboard["methods"]
    order = ordered_methods(methods)
    colors = figures.method_colors(order)
    path = {key: out_dir / f"{stem}.png" for key, (_, stem) in COMPARISON_FIGURES.items()}
    trained = {name: figures.read_losses(methods[name].get("runs") or []) for name in order}
    trained = {name: losses for name, losses in trained.items() if methods[name].get("kind") == "trained"}
    written = {
        "id_vs_ood": figures.plot_leaderboard_id_vs_ood(leaderboard, order, path["id_vs_ood"]),
        "per_split": figures.plot_split_bars(leaderboard, order, path["per_split"]),
        "training_curves": figures.plot_training_curves(trained, colors, path["training_curves"]),
    }
    tables = leaderboard_tables(leaderboard)
    benchmark = leaderboard.get("benchmark", "")
    meta = (f"Benchmark: `{benchmark}`", f"Seeds: {leaderboard.get('seeds')}", f"Config: `{leaderboard.get('config')}`")
    blocks: list[Block] = [
        Heading(f"robustft comparison: {benchmark}", 1),
        Paragraph(bullets=meta),
        *(Paragraph(note) for note in comparison_notes(leaderboard)),
        Heading("Leaderboard"),
        TableBlock(tables["leaderboard"], row_ids=True),
    ]
    for key in ("id_vs_ood", "per_split"):
        blocks += _figure(key, written[key])
    blocks += leaderboard_sections(leaderboard, order, out_dir, colors, path)
    blocks += _figure("training_curves", written["training_curves"])
    blocks += [Heading("Cost"), TableBlock(tables["cost"])]
    if "calibration" in tables:
        blocks += [Heading("Calibration"), TableBlock(tables["calibration"]), Paragraph(ECE_NOTE)]
    return [*blocks, *HOW_TO_READ]


def _figure(key: str, png: Path | None) -> list[Block]:
    heading = COMPARISON_FIGURES[key][0]
    if png is None:
        return [Heading(heading), Paragraph(NOTHING_TO_PLOT, emphasis=True)]
    return [Heading(heading), FigureBlock(png, heading, key)]
