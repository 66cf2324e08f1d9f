"""The multi-seed comparison report: figures (PNG size, not blank, SVG parses), report.md and report.html."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ElementTree
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from robustft.errors import DataError
from robustft.report import write_comparison_report
from robustft.report.figures import PIXELS, mean_curve, place_labels, read_curves, read_losses, reference_line
from robustft.report.html import row_id
from robustft.robustness import inverse_logit, logit

SEEDS = (0, 1)
# (kind, ID, OOD avg, effective robustness): numbers in the shape `robustft compare` writes.
METHODS = {
    "zeroshot": ("zeroshot", 70.0, 60.0, 0.0),
    "finetune": ("trained", 90.0, 52.0, 0.0),
    "lp_ft": ("trained", 89.0, 56.0, 3.1),
    "gmixout": ("trained", 89.5, 57.0, 4.2),
    "wise_ft": ("posthoc", 88.0, 59.0, 5.5),
    "gmixout+vrf": ("posthoc", 89.6, 57.5, 4.9),
}
SPLITS = ("ood_fonts", "ood_rotation", "ood_color")


def _stat(mean: float, std: float = 0.5) -> dict[str, float]:
    return {"mean": mean, "std": std}


def _curve(seed: int) -> dict[str, Any]:
    """A WiSE-FT sweep as posthoc.record_sweep writes it: the middle alpha bulges above both ends."""
    points = [
        {"alpha": a, "id": 70 + 20 * a + seed, "ood_avg": 60 - 8 * a + 10 * a * (1 - a) + seed, "ood": {}}
        for a in (0.0, 0.5, 1.0)
    ]
    return {"method": "wise_ft", "alpha": 0.5, "alpha_chosen_on": "id_val", "curve": points}


def _fake_runs(root: Path, name: str, kind: str) -> list[str]:
    runs = []
    for seed in SEEDS:
        run_dir = root / f"seed{seed}" / name
        run_dir.mkdir(parents=True)
        if kind == "trained":
            lines = [
                {"step": step, "loss": 2.0 / step + seed * 0.1, "lr": 1e-3, "epoch": step / 5} for step in (1, 2, 3)
            ]
            (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        if name == "wise_ft":
            (run_dir / "wise_ft_curve.json").write_text(json.dumps(_curve(seed)))
        runs.append(str(run_dir))
    return runs


def _leaderboard(root: Path, names: tuple[str, ...] = tuple(METHODS)) -> dict[str, Any]:
    methods = {}
    for name in names:
        kind, id_acc, ood_avg, effective = METHODS[name]
        methods[name] = {
            "kind": kind,
            "id": _stat(id_acc),
            "ood_avg": _stat(ood_avg, 0.8),
            "effective_robustness": _stat(effective, 0.3),
            "ood": {split: _stat(ood_avg + offset) for split, offset in zip(SPLITS, (-5.0, 0.0, 5.0), strict=True)},
            "ece_id": _stat(3.0),
            "ece_ood_avg": _stat(9.0),
            "train_seconds": _stat(0.0 if kind != "trained" else 12.5, 0.2),
            "peak_memory_mb": 512.0 if kind == "trained" else None,
            "trainable_params": 1_234_567 if kind == "trained" else 0,
            "inference_cost": 2.0 if name == "gmixout+vrf" else 1.0,
            "runs": _fake_runs(root / "runs", name, kind),
        }
    reference = {"zero_shot": "zeroshot", "finetuned": "finetune"}
    return {
        "benchmark": "digits-shift",
        "seeds": list(SEEDS),
        "config": "demo",
        "reference": reference,
        "methods": methods,
    }


class _Rows(HTMLParser):
    """Collects the ids of table rows and the src of images."""

    def __init__(self) -> None:
        super().__init__()
        self.row_ids: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "tr" and attributes.get("id"):
            self.row_ids.append(attributes["id"] or "")
        if tag == "img":
            self.images.append(attributes.get("src") or "")


def _check_png(data: bytes) -> None:
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG" and image.size == PIXELS == (1050, 750)
    assert np.asarray(image.convert("L"), dtype=float).var() > 0  # not a blank canvas


def test_every_figure_is_a_png_of_the_stated_size_and_an_svg(tmp_path: Path) -> None:
    paths = write_comparison_report(_leaderboard(tmp_path), tmp_path / "out")
    figures = ("id_vs_ood", "per_split", "alpha_curves", "training_curves")
    assert set(paths) == {"report_md", "report_html", *(f"{f}_{ext}" for f in figures for ext in ("png", "svg"))}
    for figure in figures:
        _check_png(paths[f"{figure}_png"].read_bytes())
        root = ElementTree.parse(paths[f"{figure}_svg"]).getroot()
        assert root.tag.endswith("svg")


def test_report_md_links_existing_files_and_tabulates_mean_and_std(tmp_path: Path) -> None:
    out = tmp_path / "out"
    text = write_comparison_report(_leaderboard(tmp_path), out)["report_md"].read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) == 4 and all((out / link).is_file() for link in links)
    assert "| finetune | trained | 90.00 ± 0.50 | 52.00 ± 0.80 | +0.00 ± 0.30 | 57.00 ± 0.50 |" in text
    assert "| gmixout+vrf | 0.0 ± 0.2 | - | 0 | 2.00 |" in text  # cost table: no peak memory measured
    assert "## Calibration" in text and "| wise_ft | 3.00 ± 0.50 | 9.00 ± 0.50 |" in text
    assert "over 2 seed(s) (0, 1)" in text and "line through `zeroshot` and `finetune`" in text


def test_report_html_is_self_contained_with_a_row_per_method(tmp_path: Path) -> None:
    leaderboard = _leaderboard(tmp_path)
    html = write_comparison_report(leaderboard, tmp_path / "out")["report_html"].read_text()
    parser = _Rows()
    parser.feed(html)
    assert parser.row_ids == [
        row_id(name) for name in ("zeroshot", "finetune", "lp_ft", "gmixout", "gmixout+vrf", "wise_ft")
    ]
    assert "method-gmixout+vrf" in parser.row_ids
    assert "http://" not in html and "https://" not in html and "<link" not in html
    assert len(parser.images) == 4 and all(src.startswith("data:image/png;base64,") for src in parser.images)
    _check_png(base64.b64decode(parser.images[0].split(",", 1)[1]))
    assert all(f"<h2>{heading}</h2>" in html for heading in ("Leaderboard", "Cost", "Calibration", "Training loss"))


def test_missing_reference_drops_the_line_and_says_so(tmp_path: Path) -> None:
    leaderboard = _leaderboard(tmp_path, names=("finetune", "lp_ft"))
    assert reference_line(leaderboard) is None
    paths = write_comparison_report(leaderboard, tmp_path / "out")
    assert "alpha_curves_png" not in paths  # no run swept alpha: no empty figure either
    text = paths["report_md"].read_text()
    assert "No zero-shot / fine-tune trade-off line: the reference zero_shot method is missing" in text
    assert "## Mixing-coefficient sweeps\n\n_Nothing to plot" in text
    assert "No zero-shot / fine-tune trade-off line" in paths["report_html"].read_text()
    _check_png(paths["id_vs_ood_png"].read_bytes())


def test_reference_line_passes_through_both_references(tmp_path: Path) -> None:
    slope, intercept = reference_line(_leaderboard(tmp_path, names=("zeroshot", "finetune")))
    assert inverse_logit(slope * logit(70.0) + intercept) == pytest.approx(60.0)
    assert inverse_logit(slope * logit(90.0) + intercept) == pytest.approx(52.0)


def test_alpha_curve_and_loss_are_averaged_over_seeds(tmp_path: Path) -> None:
    curve = mean_curve([_curve(0), _curve(1)])
    assert curve["alpha"].tolist() == [0.0, 0.5, 1.0]
    assert curve["id"].tolist() == pytest.approx([70.5, 80.5, 90.5]) and curve["id_std"].tolist() == [0.5] * 3
    shorter = _curve(1) | {"curve": _curve(1)["curve"][:2]}  # a seed that skipped alpha 1: only shared alphas
    assert mean_curve([_curve(0), shorter])["alpha"].tolist() == [0.0, 0.5]
    runs = _fake_runs(tmp_path, "finetune", "trained") + [str(tmp_path / "no_such_run")]
    losses = read_losses(runs)
    assert len(losses) == 2 and losses[1][0].tolist() == [1, 2, 3]
    assert losses[1][1].tolist() == pytest.approx([2.1, 1.1, 2.0 / 3 + 0.1])


def test_unreadable_run_files_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "wise_ft_curve.json").write_text("{not json")
    with pytest.raises(DataError, match="wise_ft_curve.json"):
        read_curves([tmp_path])
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2,')
    with pytest.raises(DataError, match="metrics.jsonl"):
        read_losses([tmp_path])


def test_labels_of_crowded_points_overlap_no_label_and_no_marker() -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 5), dpi=150, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    xs, ys = np.array([50.0, 50.2, 50.4, 80.0]), np.array([50.0, 50.1, 49.9, 80.0])
    axes.set(xlim=(40, 90), ylim=(40, 90))
    place_labels(figure, axes, ["method_one", "method_two", "method_three", "far"], xs, ys)
    renderer = figure.canvas.get_renderer()
    boxes = [text.get_window_extent(renderer) for text in axes.texts]
    assert len(boxes) == 4
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    radius = 7 / 2 * figure.dpi / 72  # place_labels' default markersize, 7 points
    centres = axes.transData.transform(np.column_stack([xs, ys]))
    assert not any(
        box.x0 < x + radius and box.x1 > x - radius and box.y0 < y + radius and box.y1 > y - radius
        for box in boxes
        for x, y in centres
    )


def _browser() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_html_renders_every_row_in_headless_chromium(tmp_path: Path) -> None:
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium / google-chrome on PATH")
    html = write_comparison_report(_leaderboard(tmp_path), tmp_path / "out")["report_html"]
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", html.resolve().as_uri()]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    for name in METHODS:
        assert f'id="{row_id(name)}"' in dom


def _marker_boxes_of(axes) -> list:
    """The drawn markers' display boxes, read from the artists (scatter sizes are areas in points²)."""
    from matplotlib.transforms import Bbox

    boxes = []
    for collection in axes.collections:
        radius = np.sqrt(collection.get_sizes()[0]) / 2 * axes.figure.dpi / 72
        for x, y in collection.get_offset_transform().transform(collection.get_offsets()):
            boxes.append(Bbox.from_extents(x - radius, y - radius, x + radius, y + radius))
    return boxes


def test_run_report_labels_overlap_no_point_and_no_other_label() -> None:
    from robustft.report.figures import id_vs_ood_figure

    crowded = {"zeroshot": (70.0, 60.0), "finetune": (90.0, 52.0), "lp_ft": (89.6, 52.3), "l2_sp": (89.8, 52.1)}
    crowded |= {"wise_ft": (89.4, 52.5), "flyp": (89.9, 51.8), "lora": (70.3, 59.8)}
    results = {"benchmark": "b", "methods": {n: {"id": i, "ood": {"ood_a": o}} for n, (i, o) in crowded.items()}}
    figure = id_vs_ood_figure(results)
    renderer = figure.canvas.get_renderer()
    axes = figure.axes[0]
    labels = [text for text in axes.texts if text.get_text() in crowded]
    assert sorted(text.get_text() for text in labels) == sorted(crowded)
    boxes = [text.get_window_extent(renderer) for text in labels]
    markers = _marker_boxes_of(axes)
    assert len(markers) == len(crowded)
    assert not any(box.overlaps(marker) for box in boxes for marker in markers)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    frame = axes.get_window_extent(renderer)
    assert all(frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1) for box in boxes)
