"""``robustft posthoc METHOD RUN...``: any post-hoc method over finished runs, its options from ``--set``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from posthoc_support import quiet, write_shapes_dataset
from robustft.cli import app
from robustft.commands.posthoc import method_overrides, posthoc_methods
from robustft.config import parse_config
from robustft.errors import ConfigError
from robustft.runner import fit


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("posthoc_command")
    data = write_shapes_dataset(root / "data")
    runs = []
    for lr in (1e-3, 3e-4):
        raw = {
            "name": f"ft_{lr:g}",
            "output_dir": str(root / "sweep"),
            "model": {"source": "builtin", "zero_shot_head": "prototypes"},
            "data": {**data, "batch_size": 8},
            "optim": {"lr": lr},
            "train": {"steps": 2, "progress": False},
        }
        config = parse_config(raw)
        fit(config, log=quiet)
        runs.append(config.run_dir)
    return runs


def test_the_post_hoc_methods_are_those_that_declare_inputs() -> None:
    assert set(posthoc_methods()) == {"wise_ft", "output_ensemble", "uniform_soup", "greedy_soup", "vrf"}
    assert method_overrides(["alpha=0.5", "data.eval_batch_size=8"]) == ["method.alpha=0.5", "data.eval_batch_size=8"]


def test_posthoc_runs_a_method_with_its_own_options(finished_runs: list[Path]) -> None:
    run = finished_runs[0]
    invoked = CliRunner().invoke(app, ["posthoc", "wise_ft", str(run), "--set", "alpha=0.5", "--set", "alphas=[0,1]"])
    assert invoked.exit_code == 0, invoked.output
    entry = json.loads((run / "wise_ft" / "results.json").read_text())["methods"]["wise_ft"]
    assert entry["alpha"] == 0.5 and entry["alpha_chosen_on"] == "config"
    assert [point["alpha"] for point in entry["curve"]] == [0.0, 0.5, 1.0]
    saved = yaml.safe_load((run / "wise_ft" / "config.yaml").read_text())["method"]
    assert saved["finetuned_run"] == str(run) and saved["alpha"] == 0.5


def test_posthoc_soup_over_a_sweep_folder(finished_runs: list[Path], tmp_path: Path) -> None:
    sweep = finished_runs[0].parent
    invoked = CliRunner().invoke(app, ["posthoc", "uniform_soup", str(sweep), "--out", str(tmp_path)])
    assert invoked.exit_code == 0, invoked.output
    entry = json.loads((tmp_path / "uniform_soup" / "results.json").read_text())["methods"]["uniform_soup"]
    assert sorted(entry["ingredients"]) == sorted(str(run) for run in finished_runs)


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        (["posthoc", "finetune", "RUN"], "trains a model and combines no runs"),
        (["posthoc", "wise_ft", "RUN", "RUN"], "combines one finished run; got 2"),
        (["posthoc", "wise_ft", "RUN", "--set", "alpah=0.5"], "unknown key 'method.alpah'"),
        (["posthoc", "nope", "RUN"], "unknown method 'nope'"),
    ],
)
def test_posthoc_errors_name_the_problem(finished_runs: list[Path], arguments: list[str], fragment: str) -> None:
    arguments = [str(finished_runs[0]) if item == "RUN" else item for item in arguments]
    invoked = CliRunner().invoke(app, arguments)
    assert isinstance(invoked.exception, ConfigError), invoked.output
    assert fragment in str(invoked.exception)
