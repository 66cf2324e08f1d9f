"""``report.html``: one self-contained file a user can open, mail or attach to a paper review.

Self-contained means no external resource at all: the figures are inlined as base64 PNG ``data:`` URIs, the
CSS and the few lines of sorting script are inline, and nothing is fetched, so the file reads the same
offline and years later. It renders the same blocks as report.md (:mod:`robustft.report.document`). Every
method row has ``id="method-<name>"`` so tests (and links) can find it.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from pathlib import Path

from robustft.report.document import Block, FigureBlock, Heading, Paragraph, TableBlock

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


def render_html(blocks: Sequence[Block], title: str) -> str:
    """The whole report as one HTML string: the same blocks as report.md, figures inlined."""
    body = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{_inline(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            if block.bullets:
                body.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in block.bullets) + "</ul>")
            else:
                text = _inline(block.text)
                body.append(f'<p class="note">{f"<em>{text}</em>" if block.emphasis else text}</p>')
        elif isinstance(block, TableBlock):
            body.append(html_table(*block.table, row_ids=block.row_ids))
        elif isinstance(block, FigureBlock):
            body.append(inline_png(block.path, block.alt))
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + f"\n<script>{_SORT_SCRIPT}</script></body></html>\n"
    )


def _inline(text: str) -> str:
    """Escape, then turn the Markdown the blocks use (backticks, ``**bold**``) into HTML."""
    escaped = re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)
