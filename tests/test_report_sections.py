"""Sections and columns a method declares: rendered by name from the file, in Markdown and HTML alike."""

from __future__ import annotations

import html as html_module
from pathlib import Path

import pytest

from robustft.compare import build_leaderboard
from robustft.methods import get_method, list_methods
from robustft.report import leaderboard_markdown, leaderboard_table, leaderboard_tables, results_table, write_report
from robustft.report.document import Paragraph
from robustft.report.sections import COLUMNS, SECTIONS, Section, register_section
from robustft.report.writers import write_comparison_report
from robustft.results_schema import results_document


def _entry(**extra):
    return {"id": 90.0, "ood": {"ood_a": 80.0}, "ood_avg": 80.0, "trainable_params": 1000, **extra}


def _curve():
    return [{"alpha": a, "id": 80 + 10 * a, "ood_avg": 75 + 5 * a * (1 - a), "ood": {}} for a in (0.0, 0.5, 1.0)]


def test_every_registered_method_declares_only_names_the_report_knows() -> None:
    for name in list_methods():
        method = get_method(name)
        assert set(method.report_sections) <= set(SECTIONS), name
        assert set(method.report_columns) <= set(COLUMNS), name
    assert get_method("wise_ft").report_sections == get_method("output_ensemble").report_sections == ("alpha_curve",)
    assert get_method("greedy_soup").report_sections == get_method("uniform_soup").report_sections == ("ingredients",)
    assert all(get_method(name).report_columns == ("active_params",) for name in ("saft", "mixout", "gmixout"))


def test_a_section_follows_the_declaration_not_the_method_name(tmp_path: Path) -> None:
    methods = {
        "my_sweeper": _entry(alpha=0.5, alpha_chosen_on="id_val", curve=_curve(), report_sections=["alpha_curve"]),
        "my_soup": _entry(ingredients=["a", "b", "c"], kept=["a", "c"], report_sections=["ingredients"]),
        "sparse_thing": _entry(active_params=12_345, report_columns=["active_params"]),
        "future": _entry(report_sections=["not_a_section_yet"], report_columns=["not_a_column_yet"]),
    }
    report = write_report(results_document("b", 0, methods), tmp_path)
    text = report.read_text()
    assert "| my_sweeper | 0.5 | id_val | 90.00 | 80.00 | - | - |" in text
    assert (
        "![my_sweeper: ID vs OOD over alpha](my_sweeper_curve.png)" in text
        and (tmp_path / "my_sweeper_curve.png").is_file()
    )
    assert "| my_soup | 3 | 2 | 90.00 | 80.00 |" in text
    header, rows = results_table(results_document("b", 0, methods))
    assert header[-1] == "active params"
    assert {row[0]: row[-1] for row in rows} == {
        "future": "-",
        "my_soup": "-",
        "my_sweeper": "-",
        "sparse_thing": "12.3K",
    }
    page = (tmp_path / "report.html").read_text()
    assert "<h2>Mixing-coefficient sweeps</h2>" in page and "<h2>Model soups</h2>" in page
    assert "<h2>How to read this</h2>" in page and "data:image/png;base64," in page


def test_a_registered_section_is_rendered_in_markdown_and_html(tmp_path: Path) -> None:
    def render(results, names, out_dir):
        return [Paragraph(f"custom rows: {', '.join(names)} of `{results['benchmark']}`")]

    register_section(Section("custom", "Custom", render))
    try:
        methods = {"a": _entry(report_sections=["custom"]), "b": _entry()}
        write_report(results_document("bench", 0, methods), tmp_path)
    finally:
        del SECTIONS["custom"]
    assert "custom rows: a of `bench`" in (tmp_path / "report.md").read_text()
    assert "custom rows: a of <code>bench</code>" in (tmp_path / "report.html").read_text()


def _leaderboard_from_runs(seeds: list[int]) -> dict:
    def entry(seed: int, name: str) -> dict:
        extra = {"active_params": 100 + seed, "report_columns": ["active_params"]} if name == "saft" else {}
        return _entry(id=90.0 + seed, train_seconds=1.0, report_sections=[], **extra)

    names = ["zeroshot", "finetune", "saft"]
    per_seed = {seed: {"benchmark": "b", "seed": seed, "methods": {n: entry(seed, n) for n in names}} for seed in seeds}
    kinds = {"zeroshot": "zeroshot", "finetune": "trained", "saft": "trained"}
    costs = {seed: {n: {"peak_memory_mb": None, "inference_cost": 1.0} for n in names} for seed in seeds}
    runs = {seed: {n: f"/nowhere/seed{seed}/{n}" for n in names} for seed in seeds}
    return build_leaderboard(per_seed, kinds, costs, runs, "config.yaml")


def test_the_leaderboard_carries_declared_columns_over_seeds() -> None:
    leaderboard = _leaderboard_from_runs([0, 1])
    saft = leaderboard["methods"]["saft"]
    assert saft["report_columns"] == ["active_params"] and saft["active_params"] == {"mean": 100.5, "std": 0.5}
    assert "active_params" not in leaderboard["methods"]["finetune"]
    header, rows = leaderboard_tables(leaderboard)["leaderboard"]
    assert header[-1] == "active params" and {row[0]: row[-1] for row in rows}["saft"] == "100"


def test_one_seed_shows_values_alone_and_every_view_shows_the_same_cells(tmp_path: Path) -> None:
    leaderboard = _leaderboard_from_runs([0])
    paths = write_comparison_report(leaderboard, tmp_path)
    markdown, page = paths["report_md"].read_text(), html_module.unescape(paths["report_html"].read_text())
    wide = leaderboard_markdown(leaderboard)
    assert "±" not in wide and "± 0.00" not in markdown and "± 0.00" not in page
    assert "| finetune | trained | 90.00 | 80.00 |" in markdown
    for table in leaderboard_tables(leaderboard).values():
        for row in table.rows:
            assert "| " + " | ".join(row) + " |" in markdown
            assert "".join(f"<td>{cell}</td>" for cell in row) in page
    wide_header, wide_rows = leaderboard_table(leaderboard)
    for table in leaderboard_tables(leaderboard).values():
        for row in table.rows:
            wide_row = next(r for r in wide_rows if r[0] == row[0])
            assert all(
                wide_row[wide_header.index(h)] == cell for h, cell in zip(table.header[1:], row[1:], strict=True)
            )


@pytest.mark.parametrize("several", [False, True])
def test_mean_and_std_only_with_several_seeds(several: bool) -> None:
    leaderboard = _leaderboard_from_runs([0, 1] if several else [3])
    header, rows = leaderboard_table(leaderboard)
    finetune = next(row for row in rows if row[0] == "finetune")
    assert finetune[header.index("ID")] == ("90.50 ± 0.50" if several else "93.00")
