"""Preflight and lean run directories, on a tiny on-disk image folder and a tiny timm ViT from a local file.

Every run of a command is checked before the first starts (problems reported at once, an incompatible method
skipped with its reason); runs that train nothing reference the weights they were built from, guarded by a
content hash; a finished run drops its optimiser state.
"""

from __future__ import annotations

import json
import sys

import pytest
import timm
import torch
import yaml

from posthoc_support import quiet, write_shapes_dataset
from robustft.backbones.checkpoint_files import load_state_dict_file, save_state_dict_file
from robustft.cli import main
from robustft.compare import CompareSection, execute_comparison
from robustft.config import parse_config
from robustft.domainbed import plan_domainbed, skip_incompatible_methods
from robustft.errors import CheckpointError
from robustft.layout import FINAL_CHECKPOINT
from robustft.preflight import PreflightError
from robustft.runner import evaluate_run, fit
from robustft.sweep import run_sweep
from robustft.weight_references import references_path

VIT = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """A two-class image folder and a tiny timm ViT saved as a local safetensors file."""
    root = tmp_path_factory.mktemp("user")
    data = write_shapes_dataset(root / "shapes")
    torch.manual_seed(0)
    checkpoint = root / "vit.safetensors"
    save_state_dict_file(timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT).state_dict(), checkpoint)
    return data, checkpoint


def raw_config(user_files, out, method="finetune", name=None, **method_options):
    data, checkpoint = user_files
    return {
        "name": name or method,
        "output_dir": str(out),
        "model": {"source": "timm", "name": "vit_tiny_patch16_224", "checkpoint": str(checkpoint), "model_kwargs": VIT},
        "data": dict(data),
        "method": {"name": method, **method_options},
        "optim": {"lr": 1e-3},
        "train": {"steps": 2, "progress": False, "checkpoint_every": 1, "device": "cpu"},
    }


def cli_lines(monkeypatch, capsys, *arguments: str) -> list[str]:
    monkeypatch.setattr(sys, "argv", ["robustft", *arguments])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main()
    stderr = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in stderr, stderr
    return stderr.strip().splitlines()


def test_compare_skips_an_incompatible_method_up_front_and_runs_the_rest(user_files, tmp_path):
    """LoRA aimed at layers the model lacks is skipped, with the target finder's reason, before any run."""
    base = parse_config(raw_config(user_files, tmp_path))
    settings = CompareSection(options={"lora": {"target_modules": [r"no_such_layer$"]}})
    lines: list[str] = []
    comparison = execute_comparison(
        base, ["lora", "linear_probe"], [0], tmp_path / "cmp", log=lines.append, settings=settings
    )
    skipped = next(i for i, line in enumerate(lines) if line.startswith("lora: skipped ("))
    first_run = next(i for i, line in enumerate(lines) if ": running into " in line)
    assert skipped < first_run, lines
    assert "no nn.Linear layer or attention projection of the model matches ['no_such_layer$']" in lines[skipped]
    assert set(comparison.leaderboard["methods"]) == {"zeroshot", "finetune", "linear_probe"}
    assert not (tmp_path / "cmp" / "seed0" / "lora").exists()
    progress = [line for line in lines if line.startswith("[")]  # the comparison's runs done / total
    assert progress[0].startswith("[1/3] zeroshot (zeroshot, seed 0): starting (elapsed ")
    assert progress[-1].startswith("[3/3] linear_probe (trained, seed 0): fitted: ID ")
    assert any(
        line.startswith("[2/3] finetune (trained, seed 0): starting (elapsed ") and "ETA" in line for line in progress
    )


def test_compare_reports_every_bad_method_option_at_once_and_writes_nothing(user_files, tmp_path, monkeypatch, capsys):
    raw = raw_config(user_files, tmp_path)
    raw["compare"] = {
        "methods": ["lora", "vrf", "linear_probe"],
        "options": {"lora": {"rank": 0}, "vrf": {"k": "many"}},
    }
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(raw))
    lines = cli_lines(monkeypatch, capsys, "compare", str(path), "--out", str(tmp_path / "cmp"))
    assert len(lines) == 2 and all(line.startswith("robustft: error: compare: ") for line in lines), lines
    assert "compare: lora: " in lines[0] and "rank" in lines[0]
    assert "compare: vrf: " in lines[1] and "k" in lines[1]
    assert not (tmp_path / "cmp").exists()


def test_fit_reports_a_broken_model_file_and_broken_data_together(user_files, tmp_path, monkeypatch, capsys):
    raw = raw_config(user_files, tmp_path)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a checkpoint")
    raw["model"]["checkpoint"] = str(broken)
    raw["data"]["splits"] = {**raw["data"]["splits"], "ood_dark": "missing.csv"}
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(raw))
    lines = cli_lines(monkeypatch, capsys, "fit", str(path))
    assert len(lines) == 2, lines
    assert str(broken) in lines[0] and "missing.csv" in lines[1]
    assert not (tmp_path / "finetune").exists()


def test_sweep_refuses_an_incompatible_method_before_the_first_point(user_files, tmp_path):
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump(raw_config(user_files, tmp_path, "lora", target_modules=[r"nothing$"])))
    with pytest.raises(PreflightError, match=r"\[lr=0.001\]: method.target_modules: no nn.Linear") as error:
        run_sweep(path, [("optim.lr", [1e-3, 3e-3])], log=quiet)
    assert len(error.value.problems) == 2  # both points, one line each
    assert not (tmp_path / "lora").exists()


def test_runs_that_train_nothing_reference_their_sources_and_reload_hash_checked(user_files, tmp_path):
    """Zero-shot and output-ensemble runs write no copy of a model; evaluate rebuilds them; a changed
    or missing source is one CheckpointError naming it. A finished fine-tune has no last.pt."""
    finetune = fit(parse_config(raw_config(user_files, tmp_path)), log=quiet)
    finetune_dir = tmp_path / "finetune"
    assert not (finetune_dir / "checkpoints" / "last.pt").exists()
    model_bytes = (finetune_dir / FINAL_CHECKPOINT).stat().st_size
    zero_shot = fit(parse_config(raw_config(user_files, tmp_path, "zeroshot")), log=quiet)
    ensemble = fit(
        parse_config(raw_config(user_files, tmp_path, "output_ensemble", finetuned_run=str(finetune_dir))), log=quiet
    )
    for name, results in (("zeroshot", zero_shot), ("output_ensemble", ensemble)):
        run_dir = tmp_path / name
        assert (run_dir / FINAL_CHECKPOINT).stat().st_size < model_bytes / 20, name
        references = json.loads(references_path(run_dir / FINAL_CHECKPOINT).read_text())["references"]
        own = load_state_dict_file(run_dir / FINAL_CHECKPOINT) if name != "zeroshot" else {}
        assert not any(".backbone." in key or key.startswith("backbone.") for key in own), name
        assert {reference["source"] for reference in references} == (
            {"initial"} if name == "zeroshot" else {"initial", "run"}
        )
        again = evaluate_run(run_dir, log=quiet)
        assert again["methods"][name]["id"] == results["methods"][name]["id"]
        assert again["methods"][name]["ood"] == results["methods"][name]["ood"]
    assert finetune["methods"]["finetune"]["id"] >= 0

    state = load_state_dict_file(finetune_dir / FINAL_CHECKPOINT)
    state["head.bias"] = state["head.bias"] + 1
    save_state_dict_file(state, finetune_dir / FINAL_CHECKPOINT)
    with pytest.raises(CheckpointError, match=r"changed since this run was written"):
        evaluate_run(tmp_path / "output_ensemble", log=quiet)
    (finetune_dir / FINAL_CHECKPOINT).unlink()
    with pytest.raises(CheckpointError, match=r"final.safetensors is missing"):
        evaluate_run(tmp_path / "output_ensemble", log=quiet)


def test_keep_last_checkpoint_keeps_the_optimiser_state(user_files, tmp_path):
    raw = raw_config(user_files, tmp_path)
    raw["train"]["keep_last_checkpoint"] = True
    fit(parse_config(raw), log=quiet)
    assert (tmp_path / "finetune" / "checkpoints" / "last.pt").is_file()


def test_domainbed_drops_an_incompatible_method_from_the_plan_before_any_run(tmp_path):
    raw = {
        "name": "db",
        "output_dir": str(tmp_path),
        "train": {"steps": 2, "progress": False},
        "domainbed": {"methods": ["finetune", "lora(target_modules=[no_such_layer$])"], "test_domains": ["coloured"]},
    }
    plan = plan_domainbed(raw)
    lines: list[str] = []
    skip_incompatible_methods(plan, lines.append)
    assert [method.label for method in plan.methods] == ["finetune"]
    assert {cell.method for cell in plan.cells} == {"finetune"}
    skipped = [line for line in lines if line.startswith("lora-target_modules=")]
    assert len(skipped) == 1 and ": skipped (method.target_modules: no nn.Linear" in skipped[0], lines
    assert not (tmp_path / "db").exists()
