"""The extra report sections and table columns a method contributes, by the name it declares.

A method class lists names in ``report_sections`` / ``report_columns`` (``robustft.methods.base.Method``);
``runner.fit`` copies them into its results entry and ``robustft compare`` into the leaderboard, so a report
renders them from the file alone: it never imports a method, and never guesses from a method's name or keys.
A name with no renderer here (a file from a newer robustft or a plugin's method) is skipped.

Sections (each renders a results file and, where it has one, a leaderboard):

- ``alpha_curve``: the mixing-coefficient sweep (WiSE-FT, output ensembles): chosen alpha, how it was chosen,
  the oracle alphas, and ID vs OOD along the sweep. Reads ``alpha``, ``alpha_chosen_on``, ``oracle_alpha_id``,
  ``oracle_alpha_ood``, ``curve``; in a comparison, each seed's ``<method>_curve.json`` in its run directory.
- ``ingredients``: model soups: how many runs went in (``ingredients``) and how many were kept (``kept``).

Columns: ``active_params`` (coordinates a sparse method updates per step: SAFT, Mixout, GMixout).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robustft.report.document import Block, FigureBlock, Heading, Paragraph, TableBlock
from robustft.report.tables import ID, MISSING, OOD_AVG, Column, build_table, format_alpha, ordered_methods

ResultsRenderer = Callable[[Mapping[str, Any], list[str], Path], list[Block]]
LeaderboardRenderer = Callable[[Mapping[str, Any], list[str], Path, Mapping[str, Any], Mapping[str, Path]], list[Block]]


@dataclass(frozen=True)
class Section:
    """``results`` renders a results file's declaring methods (in report order) into blocks, writing any
    figure into the output directory; ``leaderboard`` does the same for a comparison. ``placeholder``: a
    comparison always shows the section's heading, with this sentence when no method declares it."""

    name: str
    heading: str
    results: ResultsRenderer | None = None
    leaderboard: LeaderboardRenderer | None = None
    placeholder: str | None = None


SECTIONS: dict[str, Section] = {}
COLUMNS: dict[str, Column] = {}


def register_section(section: Section) -> Section:
    SECTIONS[section.name] = section
    return section


def register_column(name: str, column: Column) -> Column:
    COLUMNS[name] = column
    return column


def declaring(methods: Mapping[str, Mapping[str, Any]], section: str) -> list[str]:
    """The methods whose entry declares ``section``, in report order."""
    return [name for name in ordered_methods(methods) if section in (methods[name].get("report_sections") or [])]


def results_sections(results: Mapping[str, Any], out_dir: Path) -> list[Block]:
    """Every registered section that some method of ``results`` declares, in registration order."""
    blocks: list[Block] = []
    for section in SECTIONS.values():
        names = declaring(results["methods"], section.name)
        if names and section.results is not None:
            blocks += section.results(results, names, out_dir)
    return blocks


def leaderboard_sections(
    leaderboard: Mapping[str, Any],
    order: Sequence[str],
    out_dir: Path,
    colors: Mapping[str, Any],
    paths: Mapping[str, Path],
) -> list[Block]:
    """The comparison's declared sections; ``paths`` holds the comparison's figure paths by key."""
    blocks: list[Block] = []
    for section in SECTIONS.values():
        if section.leaderboard is None:
            continue
        names = declaring(leaderboard["methods"], section.name)
        rendered = section.leaderboard(leaderboard, names, out_dir, colors, paths) if names else []
        if rendered:
            blocks += rendered
        elif section.placeholder is not None:
            blocks += [Heading(section.heading), Paragraph(section.placeholder, emphasis=True)]
    return blocks


def file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


# ----------------------------------------------------------------------------------------- alpha_curve

ALPHA_NOTE = (
    "The oracle alphas are the best on the test splits: they show what a pick could reach and are not "
    "results. The reported alpha is chosen on `id_val` (or fixed in the run's config)."
)


def _alpha_column(header: str, key: str) -> Column:
    return Column(header, key, lambda entry: entry.get(key), style="alpha")


def alpha_curve_results(results: Mapping[str, Any], names: list[str], out_dir: Path) -> list[Block]:
    """One row per sweep (chosen alpha, its accuracy, the oracle alphas) and one figure per sweep."""
    from robustft.report.figures import plot_alpha_curve

    methods = results["methods"]
    swept = [name for name in names if isinstance(methods[name].get("curve"), list) and methods[name]["curve"]]
    if not swept:
        return []
    columns = [
        _alpha_column("alpha", "alpha"),
        Column("chosen on", "alpha_chosen_on", lambda entry: entry.get("alpha_chosen_on"), style="text"),
        ID,
        OOD_AVG,
        _alpha_column("oracle alpha: best ID", "oracle_alpha_id"),
        _alpha_column("oracle alpha: best OOD", "oracle_alpha_ood"),
    ]
    figures: list[Block] = []
    for name in swept:
        png = plot_alpha_curve(
            methods[name]["curve"],
            Path(out_dir) / f"{file_stem(name)}_curve.png",
            title=f"{name}: ID vs OOD over alpha",
            chosen=methods[name].get("alpha"),
        )
        figures.append(FigureBlock(png, f"{name}: ID vs OOD over alpha", f"{file_stem(name)}_curve"))
    table = TableBlock(build_table(columns, methods, swept, several_seeds=False))
    return [Heading("Mixing-coefficient sweeps"), table, Paragraph(ALPHA_NOTE), *figures]


def seed_sweeps(leaderboard: Mapping[str, Any], names: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """Each method's per-seed sweeps, read from its own run directories.

    Keyed by the leaderboard name, not the name inside the curve file, so that two pairs over different
    bases (``finetune+wise_ft``, ``lp_ft+wise_ft``) stay two curves.
    """
    from robustft.report.figures import read_curves

    sweeps = {}
    for name in names:
        found = read_curves(leaderboard["methods"][name].get("runs") or [])
        matching = [found[key] for key in (name, name.rsplit("+", 1)[-1]) if key in found]
        if matching or len(found) == 1:
            sweeps[name] = matching[0] if matching else next(iter(found.values()))
    return sweeps


def alpha_curve_leaderboard(
    leaderboard: Mapping[str, Any],
    names: list[str],
    out_dir: Path,
    colors: Mapping[str, Any],
    paths: Mapping[str, Path],
) -> list[Block]:
    """The sweeps of every seed in one figure, and the alpha each seed's run chose."""
    from robustft.report.figures import plot_alpha_curves

    sweeps = seed_sweeps(leaderboard, names)
    png = plot_alpha_curves(sweeps, colors, paths["alpha_curves"])
    if png is None:
        return []
    chosen = {
        name: {
            "alpha": ", ".join(format_alpha(curve.get("alpha")) for curve in curves),
            "on": ", ".join(sorted({str(curve.get("alpha_chosen_on", MISSING)) for curve in curves})),
        }
        for name, curves in sweeps.items()
    }
    columns = [
        Column("chosen alpha (per seed)", "alpha", lambda entry: entry["alpha"], style="text"),
        Column("chosen on", "alpha_chosen_on", lambda entry: entry["on"], style="text"),
    ]
    table = build_table(columns, chosen, list(sweeps), several_seeds=False)
    return [
        Heading("Mixing-coefficient sweeps"),
        FigureBlock(png, "Mixing-coefficient sweeps", "alpha_curves"),
        TableBlock(table),
    ]


register_section(
    Section(
        "alpha_curve",
        "Mixing-coefficient sweeps",
        alpha_curve_results,
        alpha_curve_leaderboard,
        placeholder="Nothing to plot: no run logged it.",
    )
)


# ----------------------------------------------------------------------------------------- ingredients


def ingredients_results(results: Mapping[str, Any], names: list[str], out_dir: Path) -> list[Block]:
    methods = results["methods"]
    soups = [name for name in names if isinstance(methods[name].get("ingredients"), list)]
    if not soups:
        return []
    columns = [
        Column("ingredients", "ingredients", lambda entry: str(len(entry["ingredients"])), style="text"),
        Column("kept", "kept", lambda entry: str(len(entry.get("kept", entry["ingredients"]))), style="text"),
        ID,
        OOD_AVG,
    ]
    return [Heading("Model soups"), TableBlock(build_table(columns, methods, soups, several_seeds=False))]


register_section(Section("ingredients", "Model soups", ingredients_results))

# ---------------------------------------------------------------------------------------------- columns

register_column(
    "active_params", Column("active params", "active_params", lambda entry: entry.get("active_params"), style="count")
)
