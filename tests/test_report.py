"""Effective robustness math, results merging, tables, the ID-vs-OOD figure and report.md."""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path
from typing import Any

import pytest

from robustft.errors import DataError, RobustftError
from robustft.report import (
    DPI,
    FIGSIZE,
    human_count,
    load_results,
    markdown_table,
    plot_id_vs_ood,
    print_table,
    results_table,
    write_report,
)
from robustft.robustness import (
    add_effective_robustness,
    effective_robustness,
    inverse_logit,
    logit,
    tradeoff_line,
)

ZS = (70.0, 60.0)
FT = (90.0, 55.0)


def _method(id_acc: float, ood: dict[str, float], **extra: Any) -> dict[str, Any]:
    return {
        "id": id_acc,
        "ood": ood,
        "ood_avg": sum(ood.values()) / len(ood),
        "train_seconds": 12.34,
        "trainable_params": 1_234_567,
        **extra,
    }


def _results(benchmark: str = "digits", **methods: dict[str, Any]) -> dict[str, Any]:
    return {"benchmark": benchmark, "seed": 0, "methods": methods}


def _full_results() -> dict[str, Any]:
    return _results(
        zeroshot=_method(70.0, {"ood_fonts": 62.0, "ood_noise": 58.0}, trainable_params=0),
        finetune=_method(91.234, {"ood_fonts": 57.0, "ood_noise": 53.0}),
        wise_ft=_method(
            89.0, {"ood_fonts": 66.0, "ood_noise": 64.0}, macro_f1={"ood_fonts": 65.432, "ood_noise": 61.0}
        ),
        linear_probe=_method(80.0, {"ood_fonts": 59.5}),  # no ood_noise: shows as "-"
        lp_ft=_method(90.5, {"ood_fonts": 61.0, "ood_noise": 57.0}),
        aaa_method=_method(85.0, {"ood_fonts": 60.0, "ood_noise": 60.0}),
    )


def _write(directory: Path, results: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "results.json"
    path.write_text(json.dumps(results))
    return path


# ------------------------------------------------------------------------------------------ robustness


def test_logit_round_trips_and_clips() -> None:
    assert logit(50.0) == pytest.approx(0.0)
    assert inverse_logit(logit(73.5)) == pytest.approx(73.5, abs=1e-12)
    assert logit(100.0) == pytest.approx(logit(99.9)) and logit(0.0) == pytest.approx(logit(0.1))
    assert abs(logit(100.0)) < 10


def test_tradeoff_line_passes_through_both_baselines() -> None:
    line = tradeoff_line(ZS, FT)
    assert line[0] < 0  # FT gains ID and loses OOD
    assert abs(effective_robustness(*ZS, line)) < 1e-9
    assert abs(effective_robustness(*FT, line)) < 1e-9


def test_effective_robustness_sign_above_and_below_line() -> None:
    line = tradeoff_line(ZS, FT)
    on_line = inverse_logit(line[0] * logit(80.0) + line[1])
    assert effective_robustness(80.0, on_line + 3.0, line) == pytest.approx(3.0)
    assert effective_robustness(80.0, on_line - 2.0, line) == pytest.approx(-2.0)


def test_tradeoff_line_equal_id_is_horizontal_through_mean() -> None:
    slope, intercept = tradeoff_line((80.0, 60.0), (80.0, 40.0))
    assert slope == 0.0
    assert inverse_logit(intercept) == pytest.approx(50.0)


def test_add_effective_robustness_does_not_mutate_input() -> None:
    results = _full_results()
    before = copy.deepcopy(results)
    out = add_effective_robustness(results)
    assert results == before
    assert all("effective_robustness" in m for m in out["methods"].values())
    assert abs(out["methods"]["zeroshot"]["effective_robustness"]) < 1e-9
    assert out["methods"]["wise_ft"]["effective_robustness"] > 0


def test_add_effective_robustness_needs_both_baselines() -> None:
    results = _results(finetune=_method(90.0, {"ood_fonts": 50.0}))
    assert add_effective_robustness(results) == results
    assert "effective_robustness" not in results["methods"]["finetune"]


# --------------------------------------------------------------------------------------------- loading


def test_load_results_merges_dirs_and_keeps_conflicts(tmp_path: Path) -> None:
    _write(tmp_path / "run_a" / "zeroshot", _results(zeroshot=_method(70.0, {"ood_fonts": 60.0})))
    _write(tmp_path / "run_a" / "ft", _results(finetune=_method(90.0, {"ood_fonts": 55.0})))
    _write(
        tmp_path / "run_b",
        _results(finetune=_method(91.0, {"ood_fonts": 56.0}), lp_ft=_method(90.0, {"ood_fonts": 58.0})),
    )
    merged = load_results([tmp_path / "run_a", tmp_path / "run_b"])
    assert merged["benchmark"] == "digits"
    assert set(merged["methods"]) == {"zeroshot", "finetune", "finetune@ft", "lp_ft"}
    assert merged["methods"]["finetune"]["id"] == 91.0  # later wins the plain name
    assert merged["methods"]["finetune@ft"]["id"] == 90.0


def test_load_results_identical_duplicate_is_not_renamed(tmp_path: Path) -> None:
    results = _results(finetune=_method(90.0, {"ood_fonts": 55.0}))
    a, b = _write(tmp_path / "a", results), _write(tmp_path / "b", results)
    assert set(load_results([a, b])["methods"]) == {"finetune"}


def test_load_results_refuses_mixed_benchmarks(tmp_path: Path) -> None:
    a = _write(tmp_path / "a", _results("digits", zeroshot=_method(70.0, {"ood_fonts": 60.0})))
    b = _write(tmp_path / "b", _results("cifar", zeroshot=_method(70.0, {"ood_fonts": 60.0})))
    with pytest.raises(DataError) as info:
        load_results([a, b])
    message = str(info.value)
    assert isinstance(info.value, RobustftError)
    assert str(a) in message and str(b) in message and "\n" not in message


def test_load_results_nothing_found_names_paths(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        load_results([tmp_path / "empty"])


# ---------------------------------------------------------------------------------------------- tables


def test_results_table_order_columns_and_missing() -> None:
    header, rows = results_table(_full_results())
    assert header == [
        "method",
        "ID",
        "ood_fonts",
        "ood_noise",
        "OOD avg",
        "eff. robustness",
        "train s",
        "trainable params",
    ]
    order = ["zeroshot", "linear_probe", "finetune", "lp_ft", "aaa_method", "wise_ft"]
    assert [row[0] for row in rows] == order
    linear_probe = rows[1]
    assert linear_probe[3] == "-"
    assert rows[2][1] == "91.23"
    assert rows[0][5] == "+0.00" and rows[2][5] == "+0.00"  # baselines sit on the line, no "-0.00"
    assert rows[2][-1] == "1.2M" and rows[0][-1] == "0"


def test_results_table_without_baselines_has_no_effective_robustness() -> None:
    _, rows = results_table(_results(wise_ft=_method(89.0, {"ood_fonts": 66.0})))
    assert rows[0][4] == "-"


def test_human_count() -> None:
    counts = (950, 12_345, 86_600_000, 1_100_000_000)
    assert [human_count(n) for n in counts] == ["950", "12.3K", "86.6M", "1.1B"]


def test_markdown_and_rich_tables() -> None:
    results = _full_results()
    md = markdown_table(results)
    lines = md.strip().splitlines()
    assert len(lines) == 2 + len(results["methods"])
    assert lines[1].startswith("| --- | ---: |")
    from rich.console import Console

    console = Console(record=True, width=200)
    print_table(results, console=console)
    text = console.export_text()
    assert "wise_ft" in text and "91.23" in text


# ---------------------------------------------------------------------------------------- figure, report


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_is_valid_png_of_expected_size(tmp_path: Path) -> None:
    png = plot_id_vs_ood(_full_results(), tmp_path / "fig" / "id_vs_ood.png")
    assert png == tmp_path / "fig" / "id_vs_ood.png"
    assert png.stat().st_size > 5_000
    assert _png_size(png) == (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))
    svg = png.with_suffix(".svg")
    assert svg.exists() and "<svg" in svg.read_text()


def test_write_report(tmp_path: Path) -> None:
    results = _full_results()
    report = write_report(results, tmp_path / "out", title="Digits robustness")
    text = report.read_text()
    assert report.name == "report.md"
    assert text.startswith("# Digits robustness")
    assert "| finetune | 91.23 |" in text
    assert "| linear_probe | 80.00 | 59.50 | - |" in text
    assert "## Macro-F1 per split" in text and "| wise_ft | 65.43 | 61.00 |" in text
    assert "![ID vs OOD accuracy](id_vs_ood.png)" in text
    assert "How to read this" in text
    assert (tmp_path / "out" / "id_vs_ood.png").exists()
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert abs(saved["methods"]["finetune"]["effective_robustness"]) < 1e-9
    assert "effective_robustness" not in results["methods"]["finetune"]
