"""Turn results.json files into tables, an ID-vs-OOD figure and a Markdown report.

The point of robust fine-tuning is a trade-off between in-distribution (ID) and out-of-distribution (OOD)
accuracy, so every view here shows both side by side, plus effective robustness: OOD accuracy above the
zero-shot / fine-tune trade-off line (see :mod:`robustft.robustness`).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from robustft.errors import DataError
from robustft.robustness import add_effective_robustness, inverse_logit, logit, ood_average, tradeoff_line

RESULTS_NAME = "results.json"
FIGURE_NAME = "id_vs_ood.png"
FIGSIZE = (6.0, 4.5)
DPI = 150
# Baselines first, in the order a reader compares them; everything else follows alphabetically.
METHOD_ORDER = ("zeroshot", "linear_probe", "finetune", "lp_ft")
MISSING = "-"


# --------------------------------------------------------------------------------------------- loading


def load_results(paths: list[Path]) -> dict[str, Any]:
    """Merge the results.json files at ``paths`` (files, or directories searched recursively).

    Methods are run separately (one job per method, often per machine), so a report starts by gathering
    their files. Results from different benchmarks are not comparable and are refused. When two files hold
    the same method with different numbers, neither is silently dropped: the later keeps the plain name
    and the earlier one is kept as ``<method>@<its parent directory>``.
    """
    files = _find_results_files(paths)
    if not files:
        raise DataError(f"no {RESULTS_NAME} found in: {', '.join(str(p) for p in paths) or '(no paths)'}")
    merged: dict[str, Any] | None = None
    first_file = files[0]
    origin: dict[str, Path] = {}
    for file in files:
        data = _read_results_file(file)
        if merged is None:
            merged = {"benchmark": data["benchmark"], "seed": data.get("seed"), "methods": {}}
        elif data["benchmark"] != merged["benchmark"]:
            raise DataError(
                f"cannot mix benchmarks: {merged['benchmark']!r} in {first_file} but {data['benchmark']!r} in {file}"
            )
        _merge_methods(merged["methods"], origin, data["methods"], file)
    assert merged is not None
    return merged


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


def _read_results_file(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"cannot read results file {file}: {error}") from None
    if not isinstance(data, dict) or not isinstance(data.get("methods"), dict) or "benchmark" not in data:
        raise DataError(f"not a robustft results file (needs 'benchmark' and 'methods'): {file}")
    for name, entry in data["methods"].items():
        if not isinstance(entry, dict) or "id" not in entry or not isinstance(entry.get("ood", {}), dict):
            raise DataError(f"method {name!r} in {file} needs an 'id' accuracy and an 'ood' mapping")
    return data


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


# ---------------------------------------------------------------------------------------------- tables


def results_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of formatted cells, shared by the Markdown and terminal tables.

    Effective robustness is (re)computed here so every view uses the same definition; it is "-" when
    the zero-shot or fine-tune baseline is missing.
    """
    results = add_effective_robustness(results)
    methods = results["methods"]
    splits = _ood_splits(methods)
    header = ["method", "ID", *splits, "OOD avg", "eff. robustness", "train s", "trainable params"]
    rows = [_table_row(name, methods[name], splits) for name in ordered_methods(methods)]
    if any("active_params" in entry for entry in methods.values()):  # sparse methods: coordinates updated per step
        header.append("active params")
        for row, name in zip(rows, ordered_methods(methods), strict=True):
            row.append(human_count(methods[name].get("active_params")))
    if any("ece" in entry for entry in methods.values()):  # calibration: lower is better
        header += ["ECE ID", "ECE OOD avg"]
        for row, name in zip(rows, ordered_methods(methods), strict=True):
            row += [_fmt(_split_value(methods[name], "ece")), _fmt(_ood_mean(methods[name], "ece"))]
    return header, rows


def _split_value(entry: dict[str, Any], key: str, split: str = "id_test") -> float | None:
    return (entry.get(key) or {}).get(split)


def _ood_mean(entry: dict[str, Any], key: str) -> float | None:
    """Unweighted mean of a per-split metric (``ece``, ``nll``...) over the OOD splits."""
    values = [value for split, value in (entry.get(key) or {}).items() if split.startswith("ood_")]
    return sum(values) / len(values) if values else None


def ordered_methods(methods: dict[str, Any]) -> list[str]:
    """Baselines first (zeroshot, linear_probe, finetune, lp_ft), then the rest alphabetically.

    Renamed duplicates (``finetune@run2``) sort right after their base method.
    """

    def key(name: str) -> tuple[int, str, str]:
        base = name.split("@", 1)[0]
        rank = METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER)
        return rank, base, name

    return sorted(methods, key=key)


def _ood_splits(methods: dict[str, Any]) -> list[str]:
    return sorted({split for entry in methods.values() for split in (entry.get("ood") or {})})


def _table_row(name: str, entry: dict[str, Any], splits: list[str]) -> list[str]:
    ood = entry.get("ood") or {}
    return [
        name,
        _fmt(entry.get("id")),
        *(_fmt(ood.get(split)) for split in splits),
        _fmt(ood_average(entry)),
        _fmt(entry.get("effective_robustness"), signed=True),
        _fmt(entry.get("train_seconds"), decimals=1),
        human_count(entry.get("trainable_params")),
    ]


def _fmt(value: float | None, decimals: int = 2, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    rounded = round(float(value), decimals) + 0.0  # + 0.0 turns -0.0 into 0.0, so no "-0.00"
    return f"{rounded:{'+' if signed else ''}.{decimals}f}"


def human_count(n: int | None) -> str:
    """Parameter counts as a reader says them: 950, 12.3K, 1.2M, 86.6M, 1.1B."""
    if n is None:
        return MISSING
    for threshold, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= threshold:
            return f"{n / threshold:.1f}{suffix}"
    return str(int(n))


def markdown_table(results: dict[str, Any]) -> str:
    """The results table as GitHub Markdown, numbers right-aligned."""
    header, rows = results_table(results)
    return _markdown(header, rows)


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    align = ["---", *["---:"] * (len(header) - 1)]
    return "\n".join([line(header), line(align), *(line(row) for row in rows)]) + "\n"


def print_table(results: dict[str, Any], console: Console | None = None) -> None:
    """Print the results table to the terminal (rich)."""
    header, rows = results_table(results)
    table = Table(title=f"{results.get('benchmark', '')} (seed {results.get('seed')})")
    for i, column in enumerate(header):
        table.add_column(column, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in rows:
        table.add_row(*row)
    (console or Console()).print(table)


def macro_f1_table(results: dict[str, Any]) -> str | None:
    """Per-split macro-F1 as Markdown, or None when no method recorded it.

    Accuracy hides classes a method gives up on under shift; macro-F1 exposes them.
    """
    methods = results["methods"]
    with_f1 = [name for name in ordered_methods(methods) if methods[name].get("macro_f1")]
    if not with_f1:
        return None
    splits = sorted({split for name in with_f1 for split in methods[name]["macro_f1"]})
    rows = [[name, *(_fmt(methods[name]["macro_f1"].get(s)) for s in splits)] for name in with_f1]
    return _markdown(["method", *splits], rows)


# ---------------------------------------------------------------------------------------------- figure


def plot_id_vs_ood(results: dict[str, Any], path: Path) -> Path:
    """Scatter ID accuracy against OOD average, one labelled point per method; returns the PNG path.

    The curve is the zero-shot / fine-tune trade-off line (straight in logit space, so curved here);
    points above it have positive effective robustness. The dashed diagonal is OOD = ID: the distance
    below it is how much the distribution shift costs. Also writes an SVG with the same stem.
    """
    png, svg = Path(path).with_suffix(".png"), Path(path).with_suffix(".svg")
    png.parent.mkdir(parents=True, exist_ok=True)
    methods = results["methods"]
    names = [n for n in ordered_methods(methods) if not math.isnan(ood_average(methods[n]))]
    xs = np.array([float(methods[n]["id"]) for n in names])
    ys = np.array([ood_average(methods[n]) for n in names])

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    lo, hi = _axis_range(np.concatenate([xs, ys]))
    ax.plot([lo, hi], [lo, hi], linestyle="--", color="0.6", linewidth=1, label="OOD = ID")
    if "zeroshot" in methods and "finetune" in methods:
        _plot_tradeoff(ax, methods, xs, lo, hi)
    ax.scatter(xs, ys, zorder=3, color="C0")
    for name, x, y in zip(names, xs, ys, strict=True):
        ax.annotate(name, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=8)
    ax.set(xlim=(lo, hi), ylim=(lo, hi), xlabel="ID accuracy (%)", ylabel="OOD accuracy, average (%)")
    ax.set_title(f"{results.get('benchmark', '')}: ID vs OOD accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.savefig(png, dpi=DPI, format="png")
    fig.savefig(svg, format="svg", metadata={"Date": None})
    return png


def _axis_range(values: np.ndarray) -> tuple[float, float]:
    if values.size == 0:
        return 0.0, 100.0
    pad = max(2.0, 0.08 * float(values.max() - values.min()))
    return max(0.0, float(values.min()) - pad), min(100.0, float(values.max()) + pad)


def _plot_tradeoff(ax: Any, methods: dict[str, Any], xs: np.ndarray, lo: float, hi: float) -> None:
    zs, ft = methods["zeroshot"], methods["finetune"]
    slope, intercept = tradeoff_line((float(zs["id"]), ood_average(zs)), (float(ft["id"]), ood_average(ft)))
    grid = np.linspace(max(lo, 0.1), min(hi, 99.9), 200)
    ax.plot(
        grid,
        inverse_logit(slope * logit(grid) + intercept),
        color="C1",
        linewidth=1.5,
        label="zero-shot / fine-tune trade-off (logit fit)",
    )


def plot_alpha_curve(curve: list[dict[str, Any]], path: Path, title: str = "", chosen: float | None = None) -> Path:
    """ID accuracy against OOD average along a mixing-coefficient sweep, points labelled by alpha.

    ``curve`` holds ``{"alpha", "id", "ood_avg", ...}`` points (WiSE-FT, output ensembles). The
    orange line is the trade-off line through the alpha-0 and alpha-1 ends (zero-shot and fine-tuned,
    straight in logit space as in :func:`plot_id_vs_ood`): where the sweep bulges above it, mixing
    beats both ends' trade-off. The ``chosen`` alpha is ringed. Returns the PNG; also writes an SVG.
    """
    png, svg = Path(path).with_suffix(".png"), Path(path).with_suffix(".svg")
    png.parent.mkdir(parents=True, exist_ok=True)
    points = sorted(curve, key=lambda point: point["alpha"])
    alphas = [float(point["alpha"]) for point in points]
    xs = np.array([float(point["id"]) for point in points])
    ys = np.array([float(point["ood_avg"]) for point in points])

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    (x_lo, x_hi), (y_lo, y_hi) = _axis_range(xs), _axis_range(ys)
    if len(points) >= 2:
        slope, intercept = tradeoff_line((xs[0], ys[0]), (xs[-1], ys[-1]))
        grid = np.linspace(max(x_lo, 0.1), min(x_hi, 99.9), 200)
        ax.plot(
            grid,
            inverse_logit(slope * logit(grid) + intercept),
            color="C1",
            linewidth=1.5,
            label=f"trade-off line through alpha {alphas[0]:g} and {alphas[-1]:g} (logit fit)",
        )
    ax.plot(xs, ys, marker="o", color="C0", zorder=3, label="alpha sweep")
    for alpha, x, y in zip(alphas, xs, ys, strict=True):
        ax.annotate(f"{alpha:g}", (x, y), xytext=(4, 4), textcoords="offset points", fontsize=8)
    if chosen is not None and chosen in alphas:
        i = alphas.index(chosen)
        ax.scatter(
            [xs[i]],
            [ys[i]],
            s=160,
            facecolors="none",
            edgecolors="C3",
            linewidths=1.5,
            zorder=4,
            label=f"chosen: alpha {chosen:g}",
        )
    ax.set(xlim=(x_lo, x_hi), ylim=(y_lo, y_hi), xlabel="ID accuracy (%)", ylabel="OOD accuracy, average (%)")
    ax.set_title(title or "ID vs OOD accuracy over alpha")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.savefig(png, dpi=DPI, format="png")
    fig.savefig(svg, format="svg", metadata={"Date": None})
    return png


# ---------------------------------------------------------------------------------------------- report

_HOW_TO_READ = """\
## How to read this

- **ID** is accuracy on the `id_test` split (the distribution the model was fine-tuned on).
- **OOD avg** is the unweighted mean accuracy over the OOD splits, so every kind of shift counts equally.
- **Eff. robustness** is OOD accuracy above the zero-shot / fine-tune trade-off line, fitted in logit
  space (Taori et al., 2020), in percentage points. Zero-shot and fine-tune sit on the line (0) by
  construction; a positive value means a method keeps more robustness than its ID accuracy predicts.
- All numbers are percentages; "-" means the method was not evaluated on that split.
"""


def write_report(results: dict[str, Any], out_dir: Path, title: str | None = None) -> Path:
    """Write results.json (with effective robustness), id_vs_ood.png/.svg and report.md; return report.md.

    The merged results.json sits next to the report so the numbers behind every table stay inspectable.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = add_effective_robustness(results)
    (out_dir / RESULTS_NAME).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    figure = plot_id_vs_ood(results, out_dir / FIGURE_NAME)
    report = out_dir / "report.md"
    curves = {
        name: plot_alpha_curve(
            entry["curve"],
            out_dir / f"{_file_stem(name)}_curve.png",
            title=f"{name}: ID vs OOD over alpha",
            chosen=entry.get("alpha"),
        ).name
        for name, entry in results["methods"].items()
        if isinstance(entry.get("curve"), list)
    }
    report.write_text(_report_markdown(results, figure.name, title, curves), encoding="utf-8")
    return report


def _report_markdown(
    results: dict[str, Any], figure_name: str, title: str | None, curves: dict[str, str] | None = None
) -> str:
    benchmark = results.get("benchmark", "")
    parts = [
        f"# {title or f'robustft results: {benchmark}'}\n",
        f"- Benchmark: `{benchmark}`\n- Seed: {results.get('seed')}\n",
        "## Accuracy (%)\n",
        markdown_table(results),
    ]
    f1 = macro_f1_table(results)
    if f1 is not None:
        parts += ["## Macro-F1 per split\n", f1]
    parts += ["## ID vs OOD\n", f"![ID vs OOD accuracy]({figure_name})\n"]
    parts += [*_alpha_sweep_section(results, curves or {}), *_soup_section(results), *_calibration_section(results)]
    parts.append(_HOW_TO_READ)
    return "\n".join(parts)


def _alpha_sweep_section(results: dict[str, Any], curves: dict[str, str]) -> list[str]:
    """The picks of every method that swept a mixing coefficient (``curves``: method -> its figure)."""
    methods = results["methods"]
    swept = [name for name in ordered_methods(methods) if name in curves]
    if not swept:
        return []
    header = ["method", "alpha", "chosen on", "ID", "OOD avg", "oracle alpha: best ID", "oracle alpha: best OOD"]
    rows, figures = [], []
    for name in swept:
        entry = methods[name]
        rows.append(
            [
                name,
                _alpha(entry.get("alpha")),
                str(entry.get("alpha_chosen_on", MISSING)),
                _fmt(entry.get("id")),
                _fmt(ood_average(entry)),
                _alpha(entry.get("oracle_alpha_id")),
                _alpha(entry.get("oracle_alpha_ood")),
            ]
        )
        figures.append(f"![{name}: ID vs OOD over alpha]({curves[name]})\n")
    note = (
        "The oracle alphas are the best on the test splits: they show what a pick could reach and are not "
        "results. The reported alpha is chosen on `id_val` (or fixed in the run's config).\n"
    )
    return ["## Mixing-coefficient sweeps\n", _markdown(header, rows), note, *figures]


def _soup_section(results: dict[str, Any]) -> list[str]:
    methods = results["methods"]
    soups = [name for name in ordered_methods(methods) if isinstance(methods[name].get("ingredients"), list)]
    if not soups:
        return []
    rows = []
    for name in soups:
        entry = methods[name]
        kept = entry.get("kept", entry["ingredients"])
        rows.append(
            [name, str(len(entry["ingredients"])), str(len(kept)), _fmt(entry.get("id")), _fmt(ood_average(entry))]
        )
    return ["## Model soups\n", _markdown(["method", "ingredients", "kept", "ID", "OOD avg"], rows)]


def _calibration_section(results: dict[str, Any]) -> list[str]:
    """ECE (percent) and NLL (nats) on ID and OOD, raw and after temperature scaling fitted on id_val."""
    methods = results["methods"]
    calibrated = [name for name in ordered_methods(methods) if "ece" in methods[name]]
    if not calibrated:
        return []
    header = [
        "method",
        "ECE ID",
        "ECE OOD avg",
        "NLL ID",
        "NLL OOD avg",
        "T (id_val)",
        "ECE ID, TS",
        "ECE OOD avg, TS",
        "NLL OOD avg, TS",
    ]
    rows = []
    for name in calibrated:
        entry = methods[name]
        temperature = entry.get("temperature")
        rows.append(
            [
                name,
                _fmt(_split_value(entry, "ece")),
                _fmt(_ood_mean(entry, "ece")),
                _fmt(_split_value(entry, "nll"), 3),
                _fmt(_ood_mean(entry, "nll"), 3),
                MISSING if temperature is None else f"{temperature:.3g}",
                _fmt(_split_value(entry, "ece_ts")),
                _fmt(_ood_mean(entry, "ece_ts")),
                _fmt(_ood_mean(entry, "nll_ts"), 3),
            ]
        )
    note = (
        "ECE: expected calibration error over 15 equal-width confidence bins, in percentage points; NLL: mean "
        "negative log-likelihood in nats; lower is better for both. TS: after dividing the logits by one "
        "temperature T fitted on `id_val` only (Guo et al., 2017); it never changes accuracy.\n"
    )
    return ["## Calibration\n", _markdown(header, rows), note]


def _alpha(value: float | None) -> str:
    return MISSING if value is None else f"{float(value):g}"


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


# ------------------------------------------------------------------------------- multi-seed comparison

COMPARISON_FIGURES = {
    "id_vs_ood": ("ID vs OOD accuracy", "comparison_id_vs_ood"),
    "per_split": ("Accuracy per split", "comparison_per_split"),
    "alpha_curves": ("Mixing-coefficient sweeps", "comparison_alpha_curves"),
    "training_curves": ("Training loss", "comparison_training_curves"),
}


def write_comparison_report(leaderboard: dict[str, Any], out: Path) -> dict[str, Path]:
    """Figures (PNG + SVG), ``report.md`` and one self-contained ``report.html`` for a multi-seed leaderboard.

    ``leaderboard`` is what ``robustft compare`` builds: per method the mean and std over seeds of every
    accuracy (percent), its costs and the run directory of each seed (read for training curves and alpha
    sweeps). Returns ``{"report_md", "report_html", <figure>_png, <figure>_svg, ...}`` for what was written;
    a figure with nothing to show (no sweep, no training log) is left out, and the report says so.
    """
    from robustft import figures
    from robustft.report_html import comparison_html

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    methods = leaderboard["methods"]
    order = ordered_methods(methods)
    colors = figures.method_colors(order)
    runs = {name: methods[name].get("runs") or [] for name in order}
    path = {key: out / f"{stem}.png" for key, (_, stem) in COMPARISON_FIGURES.items()}
    written: dict[str, Path | None] = {
        "id_vs_ood": figures.plot_leaderboard_id_vs_ood(leaderboard, order, path["id_vs_ood"]),
        "per_split": figures.plot_split_bars(leaderboard, order, path["per_split"]),
        "alpha_curves": figures.plot_alpha_curves(_sweeps(order, runs), colors, path["alpha_curves"]),
        "training_curves": figures.plot_training_curves(
            {name: figures.read_losses(runs[name]) for name in order if methods[name].get("kind") == "trained"},
            colors,
            path["training_curves"],
        ),
    }
    pngs = {key: path for key, path in written.items() if path is not None}
    tables = comparison_tables(leaderboard)
    markdown = out / "report.md"
    markdown.write_text(_comparison_markdown(leaderboard, tables, {k: p.name for k, p in pngs.items()}), "utf-8")
    html = out / "report.html"
    html.write_text(comparison_html(leaderboard, tables, pngs, _comparison_notes(leaderboard)), encoding="utf-8")
    paths = {"report_md": markdown, "report_html": html}
    for key, png in pngs.items():
        paths[f"{key}_png"], paths[f"{key}_svg"] = png, png.with_suffix(".svg")
    return paths


def _sweeps(order: list[str], runs: dict[str, list[str]]) -> dict[str, list[dict[str, Any]]]:
    """Each leaderboard method's per-seed alpha sweeps, found in its own run directories.

    Keyed by the leaderboard name, not the name inside the curve file, so that two pairs over different
    bases (``finetune+wise_ft``, ``lp_ft+wise_ft``) stay two curves.
    """
    from robustft.figures import read_curves

    sweeps = {}
    for name in order:
        found = read_curves(runs[name])
        matching = [found[key] for key in (name, name.rsplit("+", 1)[-1]) if key in found]
        if matching or len(found) == 1:
            sweeps[name] = matching[0] if matching else next(iter(found.values()))
    return sweeps


def comparison_tables(leaderboard: dict[str, Any]) -> dict[str, tuple[list[str], list[list[str]]]]:
    """``{"leaderboard" | "cost" | "calibration": (header, rows)}``, cells formatted as ``mean ± std``.

    Shared by report.md and report.html so both show the same numbers; the first cell of a row is the
    method name. The calibration table is absent when no method recorded ECE.
    """
    methods = leaderboard["methods"]
    order = ordered_methods(methods)
    splits = sorted({split for entry in methods.values() for split in (entry.get("ood") or {})})
    header = ["method", "kind", "ID", "OOD avg", "eff. robustness", *splits]
    rows = [
        [
            name,
            str(methods[name].get("kind", MISSING)),
            _pm(methods[name].get("id")),
            _pm(methods[name].get("ood_avg")),
            _pm(methods[name].get("effective_robustness"), signed=True),
            *(_pm((methods[name].get("ood") or {}).get(split)) for split in splits),
        ]
        for name in order
    ]
    tables = {"leaderboard": (header, rows)}
    cost_header = ["method", "train s", "peak memory (MB)", "trainable params", "inference (× one forward)"]
    tables["cost"] = (
        cost_header,
        [
            [
                name,
                _pm(methods[name].get("train_seconds"), decimals=1),
                _fmt(methods[name].get("peak_memory_mb"), decimals=0),
                human_count(methods[name].get("trainable_params")),
                _fmt(methods[name].get("inference_cost")),
            ]
            for name in order
        ],
    )
    calibrated = [name for name in order if "ece_id" in methods[name] or "ece_ood_avg" in methods[name]]
    if calibrated:
        tables["calibration"] = (
            ["method", "ECE ID", "ECE OOD avg"],
            [[name, _pm(methods[name].get("ece_id")), _pm(methods[name].get("ece_ood_avg"))] for name in calibrated],
        )
    return tables


def _pm(stat: dict[str, Any] | float | None, decimals: int = 2, signed: bool = False) -> str:
    """``mean ± std`` of a ``{"mean", "std"}`` entry; the mean alone when the std is missing."""
    if not isinstance(stat, dict):
        return _fmt(stat, decimals, signed)
    mean, std = _fmt(stat.get("mean"), decimals, signed), stat.get("std")
    if mean == MISSING or std is None or (isinstance(std, float) and math.isnan(std)):
        return mean
    return f"{mean} ± {_fmt(std, decimals)}"


def _comparison_notes(leaderboard: dict[str, Any]) -> list[str]:
    """Plain sentences a reader needs before the numbers: seeds, and whether the trade-off line exists."""
    reference = leaderboard.get("reference") or {}
    methods = leaderboard["methods"]
    missing = [role for role in ("zero_shot", "finetuned") if reference.get(role) not in methods]
    seeds = leaderboard.get("seeds") or []
    notes = [f"Mean ± standard deviation over {len(seeds)} seed(s) ({', '.join(map(str, seeds))}); accuracies in %."]
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


def _comparison_markdown(leaderboard: dict[str, Any], tables: dict[str, Any], figures: dict[str, str]) -> str:
    benchmark = leaderboard.get("benchmark", "")
    parts = [
        f"# robustft comparison: {benchmark}\n",
        f"- Benchmark: `{benchmark}`\n- Seeds: {leaderboard.get('seeds')}\n- Config: `{leaderboard.get('config')}`\n",
        "\n\n".join(_comparison_notes(leaderboard)) + "\n",
        "## Leaderboard\n",
        _markdown(*tables["leaderboard"]),
    ]
    for key, (heading, _) in COMPARISON_FIGURES.items():
        parts.append(f"## {heading}\n")
        parts.append(f"![{heading}]({figures[key]})\n" if key in figures else "_Nothing to plot: no run logged it._\n")
    parts += ["## Cost\n", _markdown(*tables["cost"])]
    if "calibration" in tables:
        parts += [
            "## Calibration\n",
            _markdown(*tables["calibration"]),
            "ECE: expected calibration error in percentage points; lower is better.\n",
        ]
    parts.append(_HOW_TO_READ)
    return "\n".join(parts)
