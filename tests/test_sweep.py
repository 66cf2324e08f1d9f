"""Sweeps: grid parsing, naming and expansion; resumable runs; the post-hoc commands over a real sweep."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from posthoc_support import quiet, write_shapes_dataset
from robustft.cli import app
from robustft.errors import ConfigError
from robustft.runner import FINAL_CHECKPOINT
from robustft.sweep import expand_grid, parse_grid_option, plan_sweep, point_name, run_sweep

runner = CliRunner()


# ------------------------------------------------------------------------------------ pure functions


def test_grid_values_parse_as_numbers_lists_and_strings():
    assert parse_grid_option("optim.lr=1e-5,3e-5") == ("optim.lr", [1e-05, 3e-05])
    assert all(isinstance(v, float) for v in parse_grid_option("optim.lr=1e-5,3E-5,.5,2.")[1])
    assert parse_grid_option("seed=0,1,2") == ("seed", [0, 1, 2])
    assert parse_grid_option("optim.betas=[0.9, 0.99],[0.8,0.9]") == ("optim.betas", [[0.9, 0.99], [0.8, 0.9]])
    assert parse_grid_option("train.precision=fp32,bf16") == ("train.precision", ["fp32", "bf16"])
    assert parse_grid_option("data.augment=true,false") == ("data.augment", [True, False])
    assert parse_grid_option("model.templates='a, b',simple") == ("model.templates", ["a, b", "simple"])
    for bad, message in (("optim.lr", "KEY=V1,V2"), ("seed=0,,1", "empty value"), ("name=a,b", "sets 'name'")):
        with pytest.raises(ConfigError, match=message):
            parse_grid_option(bad)


def test_grid_expands_like_nested_loops_and_refuses_repeated_keys():
    points = expand_grid([("optim.lr", [1e-5, 3e-5]), ("seed", [0, 1, 2])])
    assert len(points) == 6
    assert points[:3] == [{"optim.lr": 1e-5, "seed": s} for s in (0, 1, 2)]
    assert points[3] == {"optim.lr": 3e-5, "seed": 0}
    with pytest.raises(ConfigError, match="key given twice: seed"):
        expand_grid([("seed", [0]), ("seed", [1])])


def test_point_names_are_short_unique_and_safe_as_directories():
    assert point_name({"optim.lr": 1e-5, "seed": 0}) == "lr=1e-05,seed=0"
    assert point_name({"optim.lr": 3e-4}) == "lr=0.0003"
    assert point_name({"optim.lr": 1e-3, "other.lr": 2}) == "optim.lr=0.001,other.lr=2"
    assert point_name({"data.augment": True, "optim.betas": [0.9, 0.99]}) == "augment=true,betas=[0.9,0.99]"
    assert point_name({"model.checkpoint": "a/b c.pt"}) == "checkpoint=a_b_c.pt"


# ------------------------------------------------------------------------------------------ real runs


@pytest.fixture(scope="module")
def shapes_config(tmp_path_factory):
    """A sweepable fine-tuning config on a tiny image-folder dataset (the built-in ViT, prototype head)."""
    root = tmp_path_factory.mktemp("shapes")
    raw = {
        "name": "ft",
        "output_dir": str(root / "runs"),
        "data": write_shapes_dataset(root / "data"),
        "method": {"name": "finetune"},
        "optim": {"lr": 1e-4},
        "train": {"steps": 2, "progress": False, "checkpoint_every": 1, "log_every": 1},
    }
    path = root / "ft.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_every_point_is_validated_before_anything_runs(shapes_config, tmp_path):
    with pytest.raises(ConfigError, match=r"\[lr=-1\].*optim.lr"):
        plan_sweep(shapes_config, [("optim.lr", [1e-4, -1])], [f"output_dir={tmp_path}"])
    assert not (tmp_path / "ft").exists()


def test_sweep_runs_each_point_once_and_resumes(shapes_config, tmp_path):
    axes = [("optim.lr", [1e-4, 1e-3]), ("seed", [0, 1])]
    base = [f"output_dir={tmp_path}"]
    logs: list[str] = []
    stopped = run_sweep(shapes_config, axes, [*base, "train.stop_after=1"], log=quiet)
    assert [p.status for p in stopped.points] == ["stopped"] * 4
    first = run_sweep(shapes_config, axes, base, log=logs.append)
    assert first.directory == tmp_path / "ft" and [p.status for p in first.points] == ["trained"] * 4
    assert sum("resumed from" in line for line in logs) == 4  # from the stopped points' checkpoints
    names = [p.name for p in first.points]
    assert names == ["lr=0.0001,seed=0", "lr=0.0001,seed=1", "lr=0.001,seed=0", "lr=0.001,seed=1"]
    for point in first.points:
        config = yaml.safe_load((point.run_dir / "config.yaml").read_text())
        assert (config["optim"]["lr"], config["seed"]) == (point.overrides["optim.lr"], point.overrides["seed"])
        assert point.results["methods"]["finetune"]["steps"] == 2
    manifest = json.loads((tmp_path / "ft" / "sweep.json").read_text())
    assert [p["status"] for p in manifest["points"]] == ["trained"] * 4

    files = [p.run_dir / name for p in first.points for name in ("results.json", FINAL_CHECKPOINT)]
    before = {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in files}
    again = run_sweep(shapes_config, axes, base, log=quiet)
    assert [p.status for p in again.points] == ["skipped"] * 4
    assert {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in files} == before
    assert again.points[2].results == first.points[2].results  # read back from results.json

    (first.points[1].run_dir / "results.json").unlink()
    partial = run_sweep(shapes_config, axes, base, log=quiet)
    assert [p.status for p in partial.points] == ["skipped", "trained", "skipped", "skipped"]


def test_sweep_soup_wise_ose_evaluate_from_the_command_line(shapes_config, tmp_path):
    swept = runner.invoke(
        app, ["sweep", str(shapes_config), "--grid", "optim.lr=1e-4,1e-3", "--set", f"output_dir={tmp_path}"]
    )
    assert swept.exit_code == 0, swept.output
    sweep_dir = tmp_path / "ft"
    assert "lr=0.001" in swept.output and (sweep_dir / "lr=0.0001" / "results.json").is_file()

    souped = runner.invoke(app, ["soup", str(sweep_dir)])
    assert souped.exit_code == 0, souped.output
    for soup in ("uniform_soup", "greedy_soup"):
        entry = json.loads((sweep_dir / soup / "results.json").read_text())["methods"][soup]
        assert entry["ingredients"] == [str(sweep_dir / "lr=0.0001"), str(sweep_dir / "lr=0.001")]

    run = sweep_dir / "lr=0.001"
    wise = runner.invoke(app, ["wise", str(run), "--alphas", "0,1"])
    assert wise.exit_code == 0, wise.output
    entry = json.loads((run / "wise_ft" / "results.json").read_text())["methods"]["wise_ft"]
    finetuned = json.loads((run / "results.json").read_text())["methods"]["finetune"]
    assert [p["alpha"] for p in entry["curve"]] == [0.0, 1.0]
    assert (entry["curve"][1]["id"], entry["curve"][1]["ood"]) == (finetuned["id"], finetuned["ood"])

    ose = runner.invoke(app, ["ose", str(run), "--alphas", "0,0.5,1", "--alpha", "0.5"])
    assert ose.exit_code == 0, ose.output
    first = json.loads((run / "output_ensemble" / "results.json").read_text())["methods"]["output_ensemble"]
    assert first["alpha"] == 0.5 and first["alpha_chosen_on"] == "config"
    evaluated = runner.invoke(app, ["evaluate", str(run / "output_ensemble")])
    assert evaluated.exit_code == 0, evaluated.output
    again = json.loads((run / "output_ensemble" / "results.json").read_text())["methods"]["output_ensemble"]
    assert (again["id"], again["ood"]) == (first["id"], first["ood"]) and again["curve"] == first["curve"]

    assert runner.invoke(app, ["soup", str(sweep_dir)]).exit_code == 0  # soups are not their own ingredients
    missing = runner.invoke(app, ["wise", str(tmp_path / "nowhere")])
    assert isinstance(missing.exception, ConfigError) and "nowhere" in str(missing.exception)


def test_a_diverging_point_fails_alone_and_the_command_says_so(shapes_config, tmp_path):
    result = runner.invoke(
        app,
        [
            "sweep",
            str(shapes_config),
            "--grid",
            "optim.lr=1e-4,1e12",
            "--set",
            f"output_dir={tmp_path}",
            "--set",
            "train.grad_clip=null",
        ],
    )
    assert result.exit_code == 1, result.output
    manifest = json.loads((tmp_path / "ft" / "sweep.json").read_text())
    assert [p["status"] for p in manifest["points"]] == ["trained", "failed"]
    assert "loss is" in manifest["points"][1]["error"] and "lr=1000000000000.0" in result.output
