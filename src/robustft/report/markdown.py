"""Markdown: report.md (from the blocks of :mod:`robustft.report.document`), tables and leaderboard.md."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from robustft.report.document import Block, FigureBlock, Heading, Paragraph, TableBlock
from robustft.report.tables import leaderboard_table, marks_legend, results_table

LEADERBOARD_NOTE = (
    "Accuracies in %{spread}. Effective robustness: OOD average above the zero-shot / fine-tune line in logit "
    "space, per seed. train s: the run's own time (a post-hoc row excludes the fine-tunes it combines). "
    "peak MiB: CUDA peak allocated (- on CPU). inference ×: forward time over the zero-shot model's on one batch."
)


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 1) -> str:
    """A GitHub Markdown table; the first ``text_columns`` left-aligned, numbers right-aligned."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    align = [*["---"] * text_columns, *["---:"] * (len(header) - text_columns)]
    return "\n".join([line(header), line(align), *(line(row) for row in rows)]) + "\n"


def markdown_table(results: Mapping[str, Any]) -> str:
    """The results table as GitHub Markdown, numbers right-aligned."""
    return markdown(*results_table(results))


def render_markdown(blocks: Sequence[Block]) -> str:
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"{'#' * block.level} {block.text}\n")
        elif isinstance(block, Paragraph):
            if block.bullets:
                parts.append("".join(f"- {item}\n" for item in block.bullets))
            else:
                parts.append(f"_{block.text}_\n" if block.emphasis else f"{block.text}\n")
        elif isinstance(block, TableBlock):
            text_columns = 2 if block.table.header[1:2] == ["kind"] else 1
            parts.append(markdown(*block.table, text_columns=text_columns))
        elif isinstance(block, FigureBlock):
            parts.append(f"![{block.alt}]({block.path.name})\n")
    return "\n".join(parts)


def leaderboard_markdown(leaderboard: Mapping[str, Any]) -> str:
    """leaderboard.md: the wide leaderboard table under a one-line title, then what each column means."""
    seeds = leaderboard.get("seeds") or []
    spread = ", mean ± population std over seeds" if len(seeds) > 1 else ", one seed"
    listed = ", ".join(map(str, seeds))
    title = f"# Leaderboard: {leaderboard['benchmark']} (seeds {listed}; config {leaderboard['config']})\n"
    legend = marks_legend(leaderboard["methods"])
    note = LEADERBOARD_NOTE.format(spread=spread) + (f" {legend}" if legend else "")
    return "\n".join([title, markdown(*leaderboard_table(leaderboard), text_columns=2), note, ""])
