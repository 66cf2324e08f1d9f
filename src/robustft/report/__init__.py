"""Reports of results files and leaderboards: tables, Markdown, CSV, self-contained HTML and figures.

The point of robust fine-tuning is a trade-off between in-distribution (ID) and out-of-distribution (OOD)
accuracy, so every view here shows both side by side, plus effective robustness: OOD accuracy above the
zero-shot / fine-tune trade-off line (see :mod:`robustft.robustness`).

One schema (:mod:`robustft.results_schema`, ``docs/results.md``) is read; one table builder
(:mod:`robustft.report.tables`) formats every number; a report is one list of blocks
(:mod:`robustft.report.document`) rendered as Markdown (:mod:`~robustft.report.markdown`) and HTML
(:mod:`~robustft.report.html`); the leaderboard also goes to CSV (:mod:`~robustft.report.csv`). The extra
sections and columns a method contributes are rendered by the names it declares
(:mod:`robustft.report.sections`).
"""

from robustft.report.csv import leaderboard_csv
from robustft.report.document import COMPARISON_FIGURES, FIGURE_NAME, HOW_TO_READ, comparison_notes
from robustft.report.figures import DPI, plot_alpha_curve, plot_id_vs_ood
from robustft.report.figures import RUN_FIGSIZE as FIGSIZE  # the run report's figures (a comparison's: figures.FIGSIZE)
from robustft.report.markdown import leaderboard_markdown, markdown, markdown_table
from robustft.report.tables import (
    METHOD_ORDER,
    MISSING,
    Column,
    Table,
    human_count,
    leaderboard_table,
    leaderboard_tables,
    macro_f1_table,
    ordered_methods,
    results_table,
)
from robustft.report.writers import (
    LEADERBOARD,
    RESULTS_NAME,
    load_results,
    print_leaderboard,
    print_table,
    write_comparison_outputs,
    write_comparison_report,
    write_leaderboard,
    write_report,
)

comparison_tables = leaderboard_tables  # the name before the tables were unified

__all__ = [
    "COMPARISON_FIGURES",
    "DPI",
    "FIGSIZE",
    "FIGURE_NAME",
    "HOW_TO_READ",
    "LEADERBOARD",
    "METHOD_ORDER",
    "MISSING",
    "RESULTS_NAME",
    "Column",
    "Table",
    "comparison_notes",
    "comparison_tables",
    "human_count",
    "leaderboard_csv",
    "leaderboard_markdown",
    "leaderboard_table",
    "leaderboard_tables",
    "load_results",
    "macro_f1_table",
    "markdown",
    "markdown_table",
    "ordered_methods",
    "plot_alpha_curve",
    "plot_id_vs_ood",
    "print_leaderboard",
    "print_table",
    "results_table",
    "write_comparison_outputs",
    "write_comparison_report",
    "write_leaderboard",
    "write_report",
]
