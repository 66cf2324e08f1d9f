"""The results schema: every file carries schema_version; older files are read, newer ones refused by name."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from posthoc_support import quiet, small_prepared
from robustft.cli import app, main
from robustft.demo import demo_config
from robustft.errors import DataError
from robustft.report import load_results, write_leaderboard, write_report
from robustft.results_schema import (
    SCHEMA_VERSION,
    read_leaderboard,
    read_results,
    results_document,
    upgrade_leaderboard,
    upgrade_results,
)
from robustft.runner import fit


def _entry(**extra):
    return {"id": 90.0, "ood": {"ood_a": 80.0}, "ood_avg": 80.0, "trainable_params": 10, **extra}


def _write(path: Path, document) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))
    return path


def test_a_file_without_version_is_version_one_and_gets_its_declarations_from_its_keys(tmp_path: Path) -> None:
    legacy = {
        "benchmark": "b",
        "seed": 0,
        "methods": {
            "wise_ft": _entry(alpha=0.5, curve=[{"alpha": 0.5, "id": 90.0, "ood_avg": 80.0}]),
            "greedy_soup": _entry(ingredients=["a", "b"], kept=["a"]),
            "saft": _entry(active_params=8),
            "finetune": _entry(),
        },
    }
    before = copy.deepcopy(legacy)
    read = read_results(_write(tmp_path / "results.json", legacy))
    assert legacy == before  # read, not rewritten
    assert read["schema_version"] == SCHEMA_VERSION
    methods = read["methods"]
    assert methods["wise_ft"]["report_sections"] == ["alpha_curve"]
    assert methods["greedy_soup"]["report_sections"] == ["ingredients"]
    assert methods["saft"]["report_columns"] == ["active_params"]
    assert methods["finetune"]["report_sections"] == [] and methods["finetune"]["report_columns"] == []


def test_a_current_file_renders_only_what_it_declares(tmp_path: Path) -> None:
    """Version 2: a ``curve`` key alone is not a section; the declaration is."""
    curve = [{"alpha": a, "id": 80 + 10 * a, "ood_avg": 70.0, "ood": {}} for a in (0.0, 1.0)]
    document = results_document("b", 0, {"wise_ft": _entry(alpha=1.0, curve=curve, report_sections=[])})
    assert upgrade_results(document)["methods"]["wise_ft"]["report_sections"] == []
    assert "Mixing-coefficient" not in write_report(document, tmp_path / "undeclared").read_text()
    document["methods"]["wise_ft"]["report_sections"] = ["alpha_curve"]
    assert "## Mixing-coefficient sweeps" in write_report(document, tmp_path / "declared").read_text()


@pytest.mark.parametrize("version", [SCHEMA_VERSION + 1, 99])
def test_a_newer_version_is_refused_in_one_line_naming_the_file(tmp_path: Path, version: int) -> None:
    path = _write(
        tmp_path / "run" / "results.json", {**results_document("b", 0, {"m": _entry()}), "schema_version": version}
    )
    with pytest.raises(DataError) as info:
        read_results(path)
    message = str(info.value)
    assert str(path) in message and f"schema_version {version}" in message and "\n" not in message
    with pytest.raises(DataError, match="results.json"):
        load_results([tmp_path / "run"])


def test_robustft_report_on_a_newer_file_exits_2_and_writes_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    path = _write(tmp_path / "run" / "results.json", {**results_document("b", 0, {"m": _entry()}), "schema_version": 7})
    out = tmp_path / "report"
    monkeypatch.setattr(sys, "argv", ["robustft", "report", str(path), "--out", str(out)])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("robustft: error: ") and str(path) in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("version", ["2", 0, True, 1.5])
def test_a_malformed_version_names_the_file(tmp_path: Path, version) -> None:
    path = _write(tmp_path / "results.json", {"schema_version": version, "benchmark": "b", "methods": {}})
    with pytest.raises(DataError, match=r"results\.json: schema_version must be a positive integer"):
        read_results(path)


def test_leaderboard_json_carries_the_version_and_reads_back(tmp_path: Path) -> None:
    stat = {"mean": 90.0, "std": 0.0}
    legacy = {
        "benchmark": "b",
        "seeds": [0],
        "config": "c",
        "reference": {"zero_shot": "zeroshot", "finetuned": "finetune"},
        "methods": {
            "wise_ft": {"kind": "posthoc", "id": stat, "ood_avg": stat, "ood": {}, "runs": [str(tmp_path / "w")]},
            "finetune": {"kind": "trained", "id": stat, "ood_avg": stat, "ood": {}, "runs": [str(tmp_path / "f")]},
        },
    }
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "wise_ft_curve.json").write_text("{}")
    upgraded = upgrade_leaderboard(legacy)
    assert upgraded["methods"]["wise_ft"]["report_sections"] == ["alpha_curve"]  # found by its sweep file
    assert upgraded["methods"]["finetune"]["report_sections"] == []
    path = write_leaderboard(legacy, tmp_path)
    on_disk = json.loads(path.read_text())
    assert on_disk["schema_version"] == SCHEMA_VERSION and read_leaderboard(path) == on_disk
    _write(path, {**on_disk, "schema_version": SCHEMA_VERSION + 1})
    with pytest.raises(DataError, match="leaderboard.json: schema_version"):
        read_leaderboard(path)


def test_a_run_writes_the_version_and_its_methods_declarations(digits_prepared, tmp_path: Path) -> None:
    """A real (two-step) Mixout run: results.json says which column its report shows, and the report shows it."""
    config = demo_config("mixout", 0, tmp_path, steps=2, progress=False)
    results = fit(config, log=quiet, prepared=small_prepared(digits_prepared))
    on_disk = json.loads((config.run_dir / "results.json").read_text())
    assert on_disk == results and on_disk["schema_version"] == SCHEMA_VERSION
    entry = on_disk["methods"]["mixout"]
    assert entry["report_columns"] == ["active_params"] and entry["report_sections"] == []
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["report", str(config.run_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "active params" in (out / "report.md").read_text()
    assert "<th>active params</th>" in (out / "report.html").read_text()
