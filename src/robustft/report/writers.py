"""Read results files, write every report file, print the terminal tables.

``robustft report`` merges results.json files (:func:`load_results`) and writes :func:`write_report`;
``robustft compare`` writes :func:`write_leaderboard` and :func:`write_comparison_report`. Every file written
here carries ``schema_version`` (:mod:`robustft.results_schema`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table as RichTable

from robustft.errors import DataError
from robustft.files import atomic_write
from robustft.report.csv import leaderboard_csv
from robustft.report.document import FIGURE_NAME, FigureBlock, comparison_report, run_report
from robustft.report.html import render_html
from robustft.report.markdown import leaderboard_markdown, render_markdown
from robustft.report.tables import leaderboard_table, results_table
from robustft.results_schema import read_results, stamped, upgrade_leaderboard, upgrade_results
from robustft.robustness import add_effective_robustness

RESULTS_NAME = "results.json"
LEADERBOARD = "leaderboard"


def load_results(paths: list[Path]) -> dict[str, Any]:
    """Merge the results.json files at ``paths`` (files, or directories searched recursively).

    Methods are run separately (one job per method, often per machine), so a report starts by gathering
    their files. Results from different benchmarks are not comparable and are refused. When two files hold
    the same method with different numbers, neither is silently dropped: the later keeps the plain name
    and the earlier one is kept as ``<method>@<its parent directory>``. Every file is read through
    :func:`robustft.results_schema.read_results` (older versions upgraded, newer ones refused by name).
    """
    files = _find_results_files(paths)
    if not files:
        raise DataError(f"no {RESULTS_NAME} found in: {', '.join(str(p) for p in paths) or '(no paths)'}")
    merged: dict[str, Any] | None = None
    first_file = files[0]
    origin: dict[str, Path] = {}
    for file in files:
        data = read_results(file)
        if merged is None:
            merged = stamped({"benchmark": data["benchmark"], "seed": data.get("seed"), "methods": {}})
        elif data["benchmark"] != merged["benchmark"]:
            raise DataError(
                f"cannot mix benchmarks: {merged['benchmark']!r} in {first_file} but {data['benchmark']!r} in {file}"
            )
        _merge_methods(merged["methods"], origin, data["methods"], file)
    assert merged is not None
    _add_significance(merged["methods"], origin)
    return merged


def _add_significance(methods: dict[str, Any], origin: Mapping[str, Path]) -> None:
    """Each method whose run directory kept its predictions gets ``significance`` against the baselines
    (``robustft.statistics.paired_test``: the same test images), as a leaderboard row has."""
    from robustft.statistics import BASELINES, paired_test, run_correctness

    correct = {name: run_correctness([origin[name].parent]) for name in methods}
    for name, table in correct.items():
        tests = {}
        for baseline in BASELINES:
            if baseline == name or table is None or correct.get(baseline) is None:
                continue
            try:
                tests[baseline] = paired_test(table, correct[baseline])  # type: ignore[arg-type]
            except DataError:  # not scored on the same images (another benchmark config): no pairing
                continue
        if tests:
            methods[name]["significance"] = tests


def _find_results_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(sorted(path.rglob(RESULTS_NAME)))
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"results path does not exist: {path}")
    unique: dict[Path, Path] = {}
    for file in files:
        unique.setdefault(file.resolve(), file)
    return list(unique.values())


def _merge_methods(merged: dict[str, Any], origin: dict[str, Path], methods: dict[str, Any], file: Path) -> None:
    for name, entry in methods.items():
        if name in merged and merged[name] != entry and origin[name] != file:
            kept = _unique_name(f"{name}@{origin[name].parent.name}", merged)
            merged[kept] = merged[name]
            origin[kept] = origin[name]
        merged[name] = entry
        origin[name] = file


def _unique_name(name: str, taken: dict[str, Any]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}#{n}", n + 1
    return candidate


def _write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_report(results: Mapping[str, Any], out_dir: Path, title: str | None = None) -> Path:
    """Write results.json (with effective robustness), id_vs_ood.png/.svg, the declared sections' figures,
    report.md and report.html (self-contained); return report.md.

    The merged results.json sits next to the report so the numbers behind every table stay inspectable.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = add_effective_robustness(upgrade_results(results))
    _write_text(out_dir / RESULTS_NAME, json.dumps(results, indent=2) + "\n")
    blocks = run_report(results, out_dir, title)
    report = _write_text(out_dir / "report.md", render_markdown(blocks))
    page_title = title or f"robustft results: {results.get('benchmark', '')}"
    _write_text(out_dir / "report.html", render_html(blocks, page_title))
    return report


def write_comparison_report(leaderboard: Mapping[str, Any], out: Path) -> dict[str, Path]:
    """Figures (PNG + SVG), ``report.md`` and one self-contained ``report.html`` for a multi-seed leaderboard.

    ``leaderboard`` is what ``robustft compare`` builds: per method the mean and std over seeds of every
    accuracy (percent), its costs and the run directory of each seed (read for training curves and alpha
    sweeps). Returns ``{"report_md", "report_html", <figure>_png, <figure>_svg, ...}`` for what was written;
    a figure with nothing to show (no sweep, no training log) is left out, and the report says so.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    leaderboard = upgrade_leaderboard(leaderboard)
    blocks = comparison_report(leaderboard, out)
    markdown = _write_text(out / "report.md", render_markdown(blocks))
    html = _write_text(out / "report.html", render_html(blocks, f"robustft: {leaderboard.get('benchmark', '')}"))
    paths = {"report_md": markdown, "report_html": html}
    for block in blocks:
        if isinstance(block, FigureBlock) and block.key:
            paths[f"{block.key}_png"], paths[f"{block.key}_svg"] = block.path, block.path.with_suffix(".svg")
    return paths


def write_leaderboard(leaderboard: Mapping[str, Any], out: Path) -> Path:
    """``leaderboard.json`` (with ``schema_version``), ``.md`` and ``.csv`` in ``out``; returns the JSON path."""
    leaderboard = upgrade_leaderboard(leaderboard)
    _write_text(out / f"{LEADERBOARD}.md", leaderboard_markdown(leaderboard))
    _write_text(out / f"{LEADERBOARD}.csv", leaderboard_csv(leaderboard))
    return _write_text(out / f"{LEADERBOARD}.json", json.dumps(leaderboard, indent=2) + "\n")


def write_comparison_outputs(
    leaderboard: Mapping[str, Any], first_seed: Mapping[str, Any], out: Path, log: Callable[[str], None] = print
) -> dict[str, Path]:
    """What ``robustft compare`` writes beside its leaderboard: the comparison report, and the first seed's
    runs merged as ``results.json`` (with effective robustness) with its ``id_vs_ood.png``, as ``robustft
    report`` writes them, so one seed's raw entries stay inspectable."""
    from robustft.report.figures import plot_id_vs_ood

    results = add_effective_robustness(upgrade_results(first_seed))
    _write_text(Path(out) / RESULTS_NAME, json.dumps(results, indent=2) + "\n")
    plot_id_vs_ood(results, Path(out) / FIGURE_NAME)
    written = write_comparison_report(leaderboard, out)
    log(f"report: {written['report_md']}")
    return written


def print_table(results: Mapping[str, Any], console: Console | None = None) -> None:
    """Print the results table to the terminal (rich)."""
    header, rows = results_table(results)
    _print(f"{results.get('benchmark', '')} (seed {results.get('seed')})", header, rows, 1, console)


def print_leaderboard(leaderboard: Mapping[str, Any], console: Console | None = None) -> None:
    """The leaderboard as a terminal table (rich): the same cells as leaderboard.md."""
    header, rows = leaderboard_table(leaderboard)
    seeds = ", ".join(str(seed) for seed in leaderboard.get("seeds") or [])
    _print(f"{leaderboard['benchmark']} (seeds {seeds})", header, rows, 2, console)


def _print(title: str, header: list[str], rows: list[list[str]], text_columns: int, console: Console | None) -> None:
    table = RichTable(title=title)
    for i, column in enumerate(header):
        table.add_column(column, justify="left" if i < text_columns else "right", no_wrap=i == 0)
    for row in rows:
        table.add_row(*row)
    (console or Console()).print(table)
