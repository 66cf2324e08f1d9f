"""Every figure of the reports, each written as PNG and SVG (dated nowhere, so a rerun writes the same SVG).

A run report (``robustft report``) has the ID-vs-OOD scatter and one alpha sweep per swept method, at
``RUN_FIGSIZE`` = 6 x 4.5 inches. A comparison (``robustft compare``) has four figures; every one is
``FIGSIZE`` = 7 x 5 inches at ``DPI`` = 150, so each PNG is exactly 1050 x 750 pixels (no
``bbox_inches="tight"``, which would change the size): reports lay them out predictably and tests can check
them. A method keeps one colour in every figure, so a reader can follow it from one to the next.

Inputs are the leaderboard's per-method entries (``{"id": {"mean", "std"}, "ood": {split: {...}}, ...}``,
accuracies in percent) and, for curves, the files each seed's run directory holds: ``metrics.jsonl``
(training loss) and ``<method>_curve.json`` (a post-hoc mixing sweep, :func:`robustft.posthoc.record_sweep`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from robustft.errors import DataError
from robustft.robustness import inverse_logit, logit, ood_average, tradeoff_line

FIGSIZE = (7.0, 5.0)
RUN_FIGSIZE = (6.0, 4.5)
DPI = 150
PIXELS = (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))
MARKERS = {"zeroshot": "*", "trained": "o", "posthoc": "D"}
RUN_MARKER_SIZE = 6  # points: the run report's scatter and sweep markers, which its labels keep clear of

Leaderboard = Mapping[str, Any]


def method_colors(names: Sequence[str]) -> dict[str, Any]:
    """One stable colour per method (tab10 up to ten methods, tab20 beyond)."""
    palette = colormaps["tab10" if len(names) <= 10 else "tab20"].colors
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}


def _new_figure() -> Figure:
    figure = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> Path:
    png, svg = Path(path).with_suffix(".png"), Path(path).with_suffix(".svg")
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png, dpi=DPI, format="png")
    figure.savefig(svg, format="svg", metadata={"Date": None})
    return png


def _mean(stat: Mapping[str, Any] | None) -> float:
    value = (stat or {}).get("mean")
    return math.nan if value is None else float(value)


def _std(stat: Mapping[str, Any] | None) -> float:
    value = (stat or {}).get("std")
    return 0.0 if value is None or math.isnan(float(value)) else float(value)


def _axis_range(values: np.ndarray, pad_fraction: float = 0.08) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 100.0
    pad = max(2.0, pad_fraction * float(values.max() - values.min()))
    return max(0.0, float(values.min()) - pad), min(100.0, float(values.max()) + pad)


# ------------------------------------------------------------------------------------- (a) ID vs OOD


def plot_leaderboard_id_vs_ood(leaderboard: Leaderboard, order: Sequence[str], path: Path) -> Path:
    """ID accuracy against OOD average, mean over seeds with error bars in both directions: the 95% bootstrap
    interval where the leaderboard has one (``ci``), else one standard deviation over seeds.

    The dark curve is the zero-shot / fine-tune trade-off line of Taori et al. (2020): straight in logit
    space through the two reference methods, so curved in accuracy space; a method above it has positive
    effective robustness. It is drawn only when both references are in the leaderboard. 1050 x 750 px PNG.
    """
    methods = leaderboard["methods"]
    names = [name for name in order if math.isfinite(_mean(methods[name].get("ood_avg")))]
    colors = method_colors(list(order))
    xs = np.array([_mean(methods[n]["id"]) for n in names])
    ys = np.array([_mean(methods[n]["ood_avg"]) for n in names])
    figure = _new_figure()
    axes = figure.add_subplot()
    (x_lo, x_hi), (y_lo, y_hi) = _axis_range(xs), _axis_range(ys)
    line = reference_line(leaderboard)
    if line is not None:
        grid = np.linspace(max(x_lo, 0.1), min(x_hi, 99.9), 200)
        axes.plot(
            grid,
            inverse_logit(line[0] * logit(grid) + line[1]),
            color="0.15",
            linewidth=1.2,
            zorder=1,
            label="zero-shot / fine-tune trade-off (logit-linear)",
        )
    for name, x, y in zip(names, xs, ys, strict=True):
        entry = methods[name]
        axes.errorbar(
            x,
            y,
            xerr=error_bar(x, entry, "id", _std(entry["id"])),
            yerr=error_bar(y, entry, "ood_avg", _std(entry["ood_avg"])),
            fmt=MARKERS.get(entry.get("kind"), "o"),
            color=colors[name],
            markersize=7,
            capsize=2,
            elinewidth=1,
            zorder=3,
        )
    for kind, marker in MARKERS.items():
        axes.plot(
            [],
            [],
            marker,
            color="0.4",
            label={"zeroshot": "zero-shot", "trained": "trained", "posthoc": "post-hoc"}[kind],
        )
    axes.set(xlim=(x_lo, x_hi), ylim=(y_lo, y_hi), xlabel="ID accuracy (%)", ylabel="OOD accuracy, average (%)")
    seeds = len(leaderboard.get("seeds") or [])
    bars = "95% CI" if any("ci" in methods[name] for name in names) else "± std"
    axes.set_title(f"{leaderboard.get('benchmark', '')}: ID vs OOD (mean, {bars}, {seeds} seed(s))")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower left", fontsize=7)
    place_labels(figure, axes, names, xs, ys)
    return _save(figure, path)


def error_bar(centre: float, entry: Mapping[str, Any], key: str, fallback: float) -> Any:
    """``[[below], [above]]`` of the entry's 95% interval of ``key`` around ``centre``, else ``fallback`` (a std)."""
    bounds = (entry.get("ci") or {}).get(key)
    if not isinstance(bounds, Sequence) or len(bounds) != 2:
        return fallback
    return [[max(0.0, centre - float(bounds[0]))], [max(0.0, float(bounds[1]) - centre)]]


def reference_line(leaderboard: Leaderboard) -> tuple[float, float] | None:
    """(slope, intercept) in logit space through the reference methods' mean points; None if one is missing."""
    methods, reference = leaderboard["methods"], leaderboard.get("reference") or {}
    zero_shot, fine_tuned = methods.get(reference.get("zero_shot", "")), methods.get(reference.get("finetuned", ""))
    if zero_shot is None or fine_tuned is None:
        return None
    points = [(_mean(entry["id"]), _mean(entry["ood_avg"])) for entry in (zero_shot, fine_tuned)]
    if not all(math.isfinite(value) for point in points for value in point):
        return None
    return tradeoff_line(points[0], points[1])


LABEL_OFFSETS = [(5, 4), (5, -11), (-5, 4), (-5, -11), (0, 8), (0, -15), (8, -3), (-8, -3)]
"""Where a label may sit around its point, in points; tried in order, then the same spots twice as far."""


def marker_boxes(axes: Any, xs: np.ndarray, ys: np.ndarray, markersize: float) -> list[Any]:
    """The display-space box of each point's marker (``markersize`` in points, as ``plot`` takes it)."""
    from matplotlib.transforms import Bbox

    radius = markersize / 2 * axes.figure.dpi / 72
    centres = axes.transData.transform(np.column_stack([xs, ys]))
    return [Bbox.from_extents(x - radius, y - radius, x + radius, y + radius) for x, y in centres]


def place_labels(
    figure: Figure,
    axes: Any,
    names: Sequence[str],
    xs: np.ndarray,
    ys: np.ndarray,
    fontsize: float = 7,
    markersize: float = 7,
    **text: Any,
) -> None:
    """Name every point, moving a label to the first spot around its point that stays inside the axes and
    overlaps no marker (its own included) and no label already placed (greedy, measured on the rendered text
    against the drawn markers), so crowded clusters stay readable. A label with no free spot goes to the first
    spot clear of every marker, else to the first spot."""
    figure.draw_without_rendering()  # lay out once, then freeze it so label boxes stay where they are measured
    figure.set_layout_engine("none")
    renderer = figure.canvas.get_renderer()
    frame = axes.get_window_extent(renderer)
    markers = marker_boxes(axes, xs, ys, markersize)
    offsets = [*LABEL_OFFSETS, *((2 * dx, 2 * dy) for dx, dy in LABEL_OFFSETS)]
    placed: list[Any] = []
    for name, x, y in zip(names, xs, ys, strict=True):
        candidates = []
        for dx, dy in offsets:
            label = axes.annotate(
                name,
                (x, y),
                xytext=(dx, dy),
                textcoords="offset points",
                fontsize=fontsize,
                ha="left" if dx > 0 else "right" if dx < 0 else "center",
                **text,
            )
            box = label.get_window_extent(renderer)
            inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
            clear = inside and not any(box.overlaps(marker) for marker in markers)
            free = clear and not any(box.expanded(1.05, 1.1).overlaps(other) for other in placed)
            candidates.append((not free, not clear, len(candidates)))
            label.remove()
            if free:
                break
        chosen = offsets[min(candidates)[2]]
        label = axes.annotate(
            name,
            (x, y),
            xytext=chosen,
            textcoords="offset points",
            fontsize=fontsize,
            ha="left" if chosen[0] > 0 else "right" if chosen[0] < 0 else "center",
            **text,
        )
        placed.append(label.get_window_extent(renderer))


# ------------------------------------------------------------------------------------ (b) alpha curves


def read_curves(run_dirs: Sequence[str | Path]) -> dict[str, list[dict[str, Any]]]:
    """``{method: [curve of seed 0, curve of seed 1, ...]}`` from every ``*_curve.json`` in the run dirs."""
    curves: dict[str, list[dict[str, Any]]] = {}
    for run_dir in run_dirs:
        for file in sorted(Path(run_dir).glob("*_curve.json")):
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
                raise DataError(f"cannot read sweep file {file}: {error}") from None
            if isinstance(data.get("curve"), list) and data["curve"]:
                curves.setdefault(str(data.get("method") or file.stem.removesuffix("_curve")), []).append(data)
    return curves


def mean_curve(seed_curves: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Mean and std over seeds at every alpha that all seeds evaluated: ``alpha, id, id_std, ood, ood_std``."""
    shared = set.intersection(*({float(p["alpha"]) for p in curve["curve"]} for curve in seed_curves))
    alphas = np.array(sorted(shared))
    table = {
        key: np.array(
            [
                [next(float(p[key]) for p in curve["curve"] if float(p["alpha"]) == a) for a in alphas]
                for curve in seed_curves
            ]
        )
        for key in ("id", "ood_avg")
    }
    return {
        "alpha": alphas,
        "id": table["id"].mean(0),
        "id_std": table["id"].std(0),
        "ood": table["ood_avg"].mean(0),
        "ood_std": table["ood_avg"].std(0),
    }


def plot_alpha_curves(
    curves: Mapping[str, Sequence[Mapping[str, Any]]], colors: Mapping[str, Any], path: Path
) -> Path | None:
    """WiSE-FT / output-ensemble sweeps: left, ID (solid) and OOD average (dashed) against the mixing
    coefficient alpha (0 = zero-shot end, 1 = fine-tuned end), mean ± std over seeds; right, the same sweep
    as a path in the ID-OOD plane with the alpha each seed's run chose ringed. None when no run swept.
    1050 x 750 px PNG."""
    if not curves:
        return None
    figure = _new_figure()
    by_alpha, plane = figure.subplots(1, 2)
    for name, seed_curves in curves.items():
        color, curve = colors.get(name, "C0"), mean_curve(seed_curves)
        if curve["alpha"].size == 0:  # the seeds share no alpha: nothing to average
            continue
        by_alpha.plot(curve["alpha"], curve["id"], color=color, marker="o", markersize=3, label=f"{name} ID")
        by_alpha.fill_between(
            curve["alpha"], curve["id"] - curve["id_std"], curve["id"] + curve["id_std"], color=color, alpha=0.15
        )
        by_alpha.plot(
            curve["alpha"], curve["ood"], color=color, marker="s", markersize=3, linestyle="--", label=f"{name} OOD avg"
        )
        by_alpha.fill_between(
            curve["alpha"], curve["ood"] - curve["ood_std"], curve["ood"] + curve["ood_std"], color=color, alpha=0.15
        )
        plane.plot(curve["id"], curve["ood"], color=color, marker="o", markersize=3, label=name)
        chosen = [float(c["alpha"]) for c in seed_curves if c.get("alpha") is not None]
        for alpha in set(chosen) & set(curve["alpha"].tolist()):
            i = curve["alpha"].tolist().index(alpha)
            plane.scatter(curve["id"][i], curve["ood"][i], s=90, facecolors="none", edgecolors=color, zorder=4)
        for i in (0, len(curve["alpha"]) - 1):
            plane.annotate(
                f"α={curve['alpha'][i]:g}",
                (curve["id"][i], curve["ood"][i]),
                xytext=(3, 3),
                textcoords="offset points",
                fontsize=6,
                color=color,
            )
    by_alpha.set(xlabel="alpha (0 = zero-shot, 1 = fine-tuned)", ylabel="accuracy (%)", title="accuracy over alpha")
    plane.set(xlabel="ID accuracy (%)", ylabel="OOD accuracy, average (%)", title="ID vs OOD (chosen alpha ringed)")
    for axes in (by_alpha, plane):
        axes.grid(True, alpha=0.3)
    by_alpha.legend(fontsize=6, loc="best")
    plane.legend(fontsize=6, loc="best")
    return _save(figure, path)


# -------------------------------------------------------------------------------- (c) per-split bars


def plot_split_bars(leaderboard: Leaderboard, order: Sequence[str], path: Path) -> Path:
    """Accuracy per split, one group of bars per method (ID first, then each OOD split), std error bars.

    Methods are the groups (not the splits) because a comparison has many more methods than splits: the
    legend stays short and every method's profile across shifts reads as one cluster. 1050 x 750 px PNG.
    """
    methods = leaderboard["methods"]
    splits = sorted({split for name in order for split in (methods[name].get("ood") or {})})
    columns = [
        ("ID", lambda entry: entry.get("id")),
        *((s, lambda entry, s=s: (entry.get("ood") or {}).get(s)) for s in splits),
    ]
    figure = _new_figure()
    axes = figure.add_subplot()
    width = 0.8 / len(columns)
    positions = np.arange(len(order))
    palette = colormaps["tab10"].colors
    for j, (label, get) in enumerate(columns):
        means = np.array([_mean(get(methods[name])) for name in order])
        stds = np.array([_std(get(methods[name])) for name in order])
        axes.bar(
            positions + (j - (len(columns) - 1) / 2) * width,
            np.nan_to_num(means),
            width,
            yerr=stds,
            color="0.25" if j == 0 else palette[(j - 1) % len(palette)],
            label=label,
            error_kw={"elinewidth": 0.6, "capsize": 1},
        )
    axes.set_xticks(positions, list(order), rotation=45, ha="right", fontsize=7)
    axes.set(ylabel="accuracy (%)", ylim=(0, 100), title=f"{leaderboard.get('benchmark', '')}: accuracy per split")
    axes.grid(True, axis="y", alpha=0.3)
    axes.legend(fontsize=6, ncols=min(4, len(columns)), loc="upper right")
    return _save(figure, path)


# ---------------------------------------------------------------------------- (d) training curves


def read_losses(run_dirs: Sequence[str | Path]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(steps, losses) from each run dir's metrics.jsonl that has one (post-hoc runs do not)."""
    out = []
    for run_dir in run_dirs:
        file = Path(run_dir) / "metrics.jsonl"
        if not file.is_file():
            continue
        try:
            records = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DataError(f"cannot read training log {file}: {error}") from None
        records = [r for r in records if isinstance(r.get("loss"), int | float) and "step" in r]
        if records:
            out.append((np.array([r["step"] for r in records]), np.array([r["loss"] for r in records], dtype=float)))
    return out


def plot_training_curves(
    losses: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray]]], colors: Mapping[str, Any], path: Path
) -> Path | None:
    """Training loss against optimiser step, one line per trained method: the mean over seeds at the steps
    every seed logged, with the min-max band across seeds shaded. None when no run logged a loss.
    1050 x 750 px PNG."""
    losses = {name: runs for name, runs in losses.items() if runs}
    if not losses:
        return None
    figure = _new_figure()
    axes = figure.add_subplot()
    for name, runs in losses.items():
        steps = np.array(sorted(set.intersection(*(set(s.tolist()) for s, _ in runs))))
        table = np.array([[loss[np.nonzero(s == step)[0][-1]] for step in steps] for s, loss in runs])
        axes.plot(steps, table.mean(0), color=colors.get(name, "C0"), linewidth=1.2, label=name)
        if len(runs) > 1:
            axes.fill_between(steps, table.min(0), table.max(0), color=colors.get(name, "C0"), alpha=0.15)
    axes.set(xlabel="optimiser step", ylabel="training loss", title="training loss (mean over seeds)")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=6, ncols=2 if len(losses) > 8 else 1, loc="upper right")
    return _save(figure, path)


# ------------------------------------------------------------------------------------------ run report


def _run_figure() -> Figure:
    figure = Figure(figsize=RUN_FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)  # a renderer to measure labels on
    return figure


def plot_id_vs_ood(results: Mapping[str, Any], path: Path) -> Path:
    """Scatter ID accuracy against OOD average, one labelled point per method; returns the PNG path.

    The curve is the zero-shot / fine-tune trade-off line (straight in logit space, so curved here);
    points above it have positive effective robustness. The dashed diagonal is OOD = ID: the distance
    below it is how much the distribution shift costs. Bars are the 95% intervals (``ci``) where the
    entries have them. Also writes an SVG with the same stem.
    """
    return _save(id_vs_ood_figure(results), path)


def id_vs_ood_figure(results: Mapping[str, Any]) -> Figure:
    """The figure :func:`plot_id_vs_ood` saves (labels placed clear of every point)."""
    from robustft.report.tables import ordered_methods

    methods = results["methods"]
    names = [n for n in ordered_methods(methods) if not math.isnan(ood_average(methods[n]))]
    xs = np.array([float(methods[n]["id"]) for n in names])
    ys = np.array([ood_average(methods[n]) for n in names])
    figure = _run_figure()
    axes = figure.add_subplot()
    lo, hi = _axis_range(np.concatenate([xs, ys]))
    axes.plot([lo, hi], [lo, hi], linestyle="--", color="0.6", linewidth=1, label="OOD = ID")
    if "zeroshot" in methods and "finetune" in methods:
        zero_shot, fine_tuned = methods["zeroshot"], methods["finetune"]
        slope, intercept = tradeoff_line(
            (float(zero_shot["id"]), ood_average(zero_shot)), (float(fine_tuned["id"]), ood_average(fine_tuned))
        )
        grid = np.linspace(max(lo, 0.1), min(hi, 99.9), 200)
        axes.plot(
            grid,
            inverse_logit(slope * logit(grid) + intercept),
            color="C1",
            linewidth=1.5,
            label="zero-shot / fine-tune trade-off (logit fit)",
        )
    axes.scatter(xs, ys, zorder=3, color="C0", s=RUN_MARKER_SIZE**2)
    for name, x, y in zip(names, xs, ys, strict=True):
        entry = methods[name]
        if "ci" in entry:
            bars = {"xerr": error_bar(x, entry, "id", 0.0), "yerr": error_bar(y, entry, "ood_avg", 0.0)}
            axes.errorbar([x], [y], **bars, fmt="none", ecolor="C0", elinewidth=0.8, capsize=2, alpha=0.6, zorder=2)
    axes.set(xlim=(lo, hi), ylim=(lo, hi), xlabel="ID accuracy (%)", ylabel="OOD accuracy, average (%)")
    axes.set_title(f"{results.get('benchmark', '')}: ID vs OOD accuracy")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="upper left", fontsize=8)
    place_labels(figure, axes, names, xs, ys, fontsize=8, markersize=RUN_MARKER_SIZE)
    return figure


def plot_alpha_curve(
    curve: Sequence[Mapping[str, Any]], path: Path, title: str = "", chosen: float | None = None
) -> Path:
    """ID accuracy against OOD average along a mixing-coefficient sweep, points labelled by alpha.

    ``curve`` holds ``{"alpha", "id", "ood_avg", ...}`` points (WiSE-FT, output ensembles). The
    orange line is the trade-off line through the alpha-0 and alpha-1 ends (zero-shot and fine-tuned,
    straight in logit space as in :func:`plot_id_vs_ood`): where the sweep bulges above it, mixing
    beats both ends' trade-off. The ``chosen`` alpha is ringed. Returns the PNG; also writes an SVG.
    """
    points = sorted(curve, key=lambda point: point["alpha"])
    alphas = [float(point["alpha"]) for point in points]
    xs = np.array([float(point["id"]) for point in points])
    ys = np.array([float(point["ood_avg"]) for point in points])
    figure = _run_figure()
    axes = figure.add_subplot()
    (x_lo, x_hi), (y_lo, y_hi) = _axis_range(xs), _axis_range(ys)
    if len(points) >= 2:
        slope, intercept = tradeoff_line((xs[0], ys[0]), (xs[-1], ys[-1]))
        grid = np.linspace(max(x_lo, 0.1), min(x_hi, 99.9), 200)
        axes.plot(
            grid,
            inverse_logit(slope * logit(grid) + intercept),
            color="C1",
            linewidth=1.5,
            label=f"trade-off line through alpha {alphas[0]:g} and {alphas[-1]:g} (logit fit)",
        )
    axes.plot(xs, ys, marker="o", markersize=RUN_MARKER_SIZE, color="C0", zorder=3, label="alpha sweep")
    if chosen is not None and chosen in alphas:
        i = alphas.index(chosen)
        axes.scatter(
            [xs[i]],
            [ys[i]],
            s=160,
            facecolors="none",
            edgecolors="C3",
            linewidths=1.5,
            zorder=4,
            label=f"chosen: alpha {chosen:g}",
        )
    axes.set(xlim=(x_lo, x_hi), ylim=(y_lo, y_hi), xlabel="ID accuracy (%)", ylabel="OOD accuracy, average (%)")
    axes.set_title(title or "ID vs OOD accuracy over alpha")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="best", fontsize=8)
    place_labels(figure, axes, [f"{alpha:g}" for alpha in alphas], xs, ys, fontsize=8, markersize=RUN_MARKER_SIZE)
    return _save(figure, path)
