"""The contract every registered method keeps, checked over ``list_methods()`` so a new method is tested too.

With its default options, on a tiny model and a tiny on-disk dataset, each method trains (or combines
finished runs), finalizes, saves, reloads through ``robustft evaluate`` to the same scores on every split,
and a trained one stopped mid-way and resumed ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import open_clip
import pytest
import torch
from typer.testing import CliRunner

from posthoc_support import bits_equal, quiet, write_shapes_dataset
from robustft.backbones.checkpoint_files import load_state_dict_file, save_state_dict_file
from robustft.cli import app
from robustft.config import parse_config
from robustft.layout import FINAL_CHECKPOINT
from robustft.methods import get_method, list_methods
from robustft.methods.base import PosthocMethod
from robustft.runner import Prepared, fit, prepare_run

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
STEPS = 4


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Any]:
    """The shapes dataset, the model sections (built-in ViT; a tiny OpenCLIP for text-tower methods), and the
    finished fine-tune runs post-hoc methods combine."""
    root = tmp_path_factory.mktemp("contract")
    data = write_shapes_dataset(root / "data")
    clip_config = root / "robustft-test-contract-clip.json"
    clip_config.write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-32", pretrained=None, **TINY_CLIP)
    save_state_dict_file(clip.state_dict(), root / "clip.safetensors")
    models = {
        "builtin": {"source": "builtin", "name": "digits_vit", "zero_shot_head": "prototypes"},
        "open_clip": {
            "source": "open_clip",
            "name": str(clip_config),
            "checkpoint": str(root / "clip.safetensors"),
            "templates": ["a photo of a {}.", "a {} shape."],
        },
    }
    space = {"root": root, "data": data, "models": models}
    space["prepared"] = {
        kind: prepare_run(parse_config(raw_config(space, method, "prepared")), log=quiet)
        for kind, method in (("builtin", "finetune"), ("open_clip", "flyp"))
    }
    space["finetuned"] = [train(space, "finetune", f"ingredient_{lr:g}", {"lr": lr}) for lr in (1e-3, 3e-4)]
    return space


def raw_config(space: dict[str, Any], method: str, name: str, options: dict | None = None, **train: Any) -> dict:
    cls = get_method(method)
    return {
        "name": name,
        "output_dir": str(space["root"] / "runs"),
        "model": space["models"]["open_clip" if cls.requires_text_tower else "builtin"],
        "data": {**space["data"], "batch_size": 8, "eval_batch_size": 16},
        "method": {"name": method, **(options or {})},
        "optim": {"lr": 1e-3, "weight_decay": 0.01},
        "train": {"steps": STEPS, "checkpoint_every": 2, "progress": False, **train},
    }


def prepared_for(space: dict[str, Any], method: str) -> Prepared:
    """The model and data prepared once per model kind (``runner.fit`` copies the model, never changes it)."""
    return space["prepared"]["open_clip" if get_method(method).requires_text_tower else "builtin"]


def train(space: dict[str, Any], method: str, name: str, optim: dict | None = None) -> Path:
    raw = raw_config(space, method, name)
    raw["optim"].update(optim or {})
    config = parse_config(raw)
    fit(config, log=quiet, prepared=prepared_for(space, method))
    return config.run_dir


def split_scores(results: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """(accuracy, NLL) per evaluated split: equal NLLs on every split mean the same logits up to rounding."""
    entry = next(iter(results["methods"].values()))
    accuracy = {"id_test": entry["id"], **entry["ood"], **({"id_val": entry["id_val"]} if "id_val" in entry else {})}
    return {split: (value, entry["nll"][split]) for split, value in accuracy.items()}


@pytest.mark.parametrize("method", list_methods())
def test_every_method_fits_saves_reloads_and_resumes(workspace: dict[str, Any], method: str) -> None:
    cls = get_method(method)
    options: dict[str, Any] = {}
    if issubclass(cls, PosthocMethod):
        finetuned = workspace["finetuned"]
        options = cls.input_options(finetuned if cls.several_runs else finetuned[:1])
    config = parse_config(raw_config(workspace, method, f"contract_{method}", options))
    prepared = prepared_for(workspace, method)
    results = fit(config, log=quiet, prepared=prepared)
    run_dir = config.run_dir
    assert (run_dir / FINAL_CHECKPOINT).is_file() and (run_dir / "config.yaml").is_file()
    fitted = split_scores(results)
    assert fitted and all(0 <= accuracy <= 100 for accuracy, _ in fitted.values())

    invoked = CliRunner().invoke(app, ["evaluate", str(run_dir)])
    assert invoked.exit_code == 0, invoked.output
    reloaded = split_scores(json.loads((run_dir / "results.json").read_text()))
    assert reloaded.keys() == fitted.keys()
    for split, (accuracy, nll) in fitted.items():
        assert reloaded[split][0] == accuracy, split
        assert reloaded[split][1] == pytest.approx(nll, rel=1e-5, abs=1e-6), split

    if cls.trains and not issubclass(cls, PosthocMethod):
        name = f"contract_{method}_resumed"
        interrupted = parse_config(raw_config(workspace, method, name, stop_after=2))
        assert fit(interrupted, log=quiet, prepared=prepared) == {}  # stopped after its step-2 checkpoint
        fit(parse_config(raw_config(workspace, method, name)), resume=True, log=quiet, prepared=prepared)
        whole = load_state_dict_file(run_dir / FINAL_CHECKPOINT)
        resumed = load_state_dict_file(interrupted.run_dir / FINAL_CHECKPOINT)
        assert whole.keys() == resumed.keys()
        different = [key for key in whole if not bits_equal(whole[key], resumed[key])]
        assert not different, f"{method}: resumed run differs in {different[:5]}"


def test_the_contract_covers_every_builtin_method() -> None:
    from robustft.methods.registry import BUILTIN_METHODS

    assert set(BUILTIN_METHODS) <= set(list_methods())
    for name, module in BUILTIN_METHODS.items():
        assert get_method(name).__module__ == module, name
