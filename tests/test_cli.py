"""The command line: the demo end to end on a reduced budget, errors as one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from robustft.cli import app

runner = CliRunner()


def test_demo_of_the_text_tower_methods_end_to_end(tmp_path):
    """The demo's default path on the tiny CLIP: zero-shot from text prompts and FLYP's tuned towers (one epoch)."""
    out = tmp_path / "demo"
    arguments = ["demo", "--out", str(out), "--epochs", "1", "--seed", "1", "--methods", "zeroshot,flyp"]
    result = runner.invoke(app, arguments)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["benchmark"] == "glyphs_shift" and results["seed"] == 1  # the demo's default: the tiny CLIP
    assert {"zeroshot", "flyp"} <= set(results["methods"])
    for entry in results["methods"].values():
        assert entry["ood_avg"] > 10 and "ci" in entry  # better than chance (5%) on 20 classes
    assert "total time" in result.output


@pytest.mark.slow  # every method on the tiny CLIP: about 9 minutes on 2 cores
def test_demo_reduced_budget_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out", str(out), "--epochs", "1", "--seed", "1"])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["benchmark"] == "glyphs_shift" and results["seed"] == 1  # the demo's default: the tiny CLIP
    assert {"zeroshot", "linear_probe", "finetune", "lp_ft", "flyp"} <= set(results["methods"])
    for method, entry in results["methods"].items():
        assert (out / method / "results.json").is_file()
        assert (out / method / "config.yaml").is_file()
        assert entry["ood_avg"] > 10, method  # better than chance (5%) on 20 classes
    report = (out / "report.md").read_text()
    assert "finetune" in report and "id_vs_ood.png" in report
    assert (out / "id_vs_ood.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "total time" in result.output


def test_fit_evaluate_report_and_methods(tmp_path):
    config = tmp_path / "lp.yaml"
    config.write_text(yaml.safe_dump({"name": "lp", "output_dir": str(tmp_path), "method": {"name": "linear_probe"}}))
    fitted = runner.invoke(app, ["fit", str(config), "--set", "train.progress=false"])
    assert fitted.exit_code == 0, fitted.output
    first = json.loads((tmp_path / "lp" / "results.json").read_text())["methods"]["linear_probe"]
    evaluated = runner.invoke(app, ["evaluate", str(tmp_path / "lp")])
    assert evaluated.exit_code == 0, evaluated.output
    again = json.loads((tmp_path / "lp" / "results.json").read_text())["methods"]["linear_probe"]
    assert again["id"] == first["id"] and again["ood"] == first["ood"]
    assert again["ci"] == first["ci"] and (tmp_path / "lp" / "predictions.safetensors").is_file()  # reproducible
    reported = runner.invoke(app, ["report", str(tmp_path / "lp"), "--out", str(tmp_path / "rep")])
    assert reported.exit_code == 0, reported.output
    assert (tmp_path / "rep" / "report.md").is_file()
    listed = runner.invoke(app, ["methods"])
    assert "lp_ft" in listed.output and "c_grid" in listed.output


def test_bad_config_is_one_line_error(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("optim: {lr: fast}\n")
    process = subprocess.run(
        [sys.executable, "-m", "robustft", "fit", str(config)], capture_output=True, text=True, check=False
    )
    assert process.returncode == 2
    assert process.stderr.strip().count("\n") == 0
    assert "optim.lr" in process.stderr and str(config) in process.stderr
    assert "Traceback" not in process.stderr
