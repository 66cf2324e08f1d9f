"""``report.html``: one self-contained file a user can open, mail or attach to a paper review.

Self-contained means no external resource at all: the figures are inlined as base64 PNG ``data:`` URIs, the
CSS and the few lines of sorting script are inline, and nothing is fetched, so the file reads the same
offline and years later. Every method row has ``id="method-<name>"`` so tests (and links) can find it.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; margin: 1em 0; }
th, td { padding: 0.3em 0.6em; border-bottom: 1px solid #eee; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
th { background: #f4f4f4; cursor: pointer; user-select: none; }
th::after { content: " \\2195"; color: #aaa; font-size: 0.8em; }
tbody tr:hover { background: #f8f8ff; }
img { max-width: 100%; height: auto; } .note { color: #555; }
"""

# Click a header to sort by that column (numbers by their mean, "-" last); click again to reverse.
_SORT_SCRIPT = """
document.querySelectorAll("table.sortable th").forEach(function (th, column) {
  th.addEventListener("click", function () {
    var body = th.closest("table").tBodies[0];
    var descending = th.dataset.order !== "desc";
    th.dataset.order = descending ? "desc" : "asc";
    var key = function (row) {
      var text = row.cells[column].textContent.trim();
      var number = parseFloat(text.replace(/[^0-9eE.+-].*$/, ""));
      return isNaN(number) ? text : number;
    };
    Array.from(body.rows).sort(function (a, b) {
      var x = key(a), y = key(b);
      if (typeof x !== typeof y) { return typeof x === "number" ? -1 : 1; }
      var order = x < y ? -1 : x > y ? 1 : 0;
      return descending ? -order : order;
    }).forEach(function (row) { body.appendChild(row); });
  });
});
"""


def row_id(method: str) -> str:
    """The ``id`` of a method's table row: ``method-`` + the name with unsafe characters as ``_``."""
    return "method-" + re.sub(r"[^A-Za-z0-9_.+-]", "_", method)


def html_table(header: Sequence[str], rows: Sequence[Sequence[str]], row_ids: bool = False) -> str:
    """A sortable table; with ``row_ids`` each row gets :func:`row_id` of its first cell."""
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = []
    for row in rows:
        attribute = f' id="{html.escape(row_id(row[0]))}"' if row_ids else ""
        body.append(f"<tr{attribute}>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>")
    return f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def inline_png(path: Path, alt: str) -> str:
    """An ``<img>`` carrying the PNG itself as a base64 data URI (no file next to the HTML needed)."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def comparison_html(
    leaderboard: Mapping[str, Any],
    tables: Mapping[str, tuple[list[str], list[list[str]]]],
    figures: Mapping[str, Path],
    notes: Sequence[str],
) -> str:
    """The whole report as one HTML string: tables (from ``report.comparison_tables``) and inlined figures.

    ``figures`` maps the keys of ``report.COMPARISON_FIGURES`` to PNGs; a missing key gets a sentence
    instead of a figure.
    """
    from robustft.report import COMPARISON_FIGURES

    benchmark = html.escape(str(leaderboard.get("benchmark", "")))
    sections = [
        f"<h1>robustft comparison: {benchmark}</h1>",
        f"<p>Benchmark <code>{benchmark}</code>, seeds {html.escape(str(leaderboard.get('seeds')))}, "
        f"config <code>{html.escape(str(leaderboard.get('config')))}</code>.</p>",
        *(f'<p class="note">{_code(note)}</p>' for note in notes),
        "<h2>Leaderboard</h2>",
        html_table(*tables["leaderboard"], row_ids=True),
    ]
    for key, (heading, _) in COMPARISON_FIGURES.items():
        sections.append(f"<h2>{html.escape(heading)}</h2>")
        sections.append(
            inline_png(figures[key], heading)
            if key in figures
            else '<p class="note">Nothing to plot: no run logged it.</p>'
        )
    sections += ["<h2>Cost</h2>", html_table(*tables["cost"])]
    if "calibration" in tables:
        sections += [
            "<h2>Calibration</h2>",
            html_table(*tables["calibration"]),
            '<p class="note">ECE: expected calibration error in percentage points; lower is better.</p>',
        ]
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>robustft: {benchmark}</title>'
        f"<style>{_CSS}</style></head><body>\n"
        + "\n".join(sections)
        + f"\n<script>{_SORT_SCRIPT}</script></body></html>\n"
    )


def _code(text: str) -> str:
    """Escape, then turn Markdown backticks into <code> (the notes are shared with report.md)."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))
