"""Export and load: final.safetensors metadata, robustft.load, and exports read back by timm, open_clip and peft.

Every export is loaded with the real library and must give robustft's logits to 1e-5. The runs are tiny
(a 1-block timm ViT and a 1-layer OpenCLIP model with random weights, two steps on a shapes dataset).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import robustft
from bad_input_support import cli_error, tree_bytes
from posthoc_support import write_shapes_dataset
from robustft.backbones.checkpoint_files import save_state_dict_file
from robustft.cli import main
from robustft.config import parse_config
from robustft.export import export_run
from robustft.layout import FINAL_CHECKPOINT
from robustft.run_metadata import FORMAT_VERSION, read_final_metadata
from robustft.runner import fit

TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=2)
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def quiet(message: str) -> None:
    pass


def run_config(root: Path, name: str, model: dict, method: dict, data: dict) -> dict:
    return {
        "name": name,
        "output_dir": str(root / "runs"),
        "model": model,
        "data": data,
        "method": method,
        "optim": {"lr": 1e-2, "weight_decay": 0.0},
        "train": {"steps": 2, "progress": False, "checkpoint_every": 10},
    }


@pytest.fixture(scope="module")
def timm_runs(tmp_path_factory):
    """LoRA runs (adapter file kept / merged only) and a prototype-head run over a tiny random timm ViT."""
    root = tmp_path_factory.mktemp("export_timm")
    torch.manual_seed(0)
    pretrained = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_VIT)
    checkpoint = root / "vit.safetensors"
    save_state_dict_file(pretrained.state_dict(), checkpoint)
    model_kwargs = {key: value for key, value in TINY_VIT.items() if key != "num_classes"}
    model = {
        "source": "timm",
        "name": "vit_tiny_patch16_224",
        "checkpoint": str(checkpoint),
        "model_kwargs": model_kwargs,
    }
    data = write_shapes_dataset(root / "data")
    runs = {}
    for name, method, head in (
        ("lora", {"name": "lora", "rank": 2}, "auto"),
        ("lora_merged", {"name": "lora", "rank": 2, "save_adapter": False}, "auto"),
        ("prototypes", {"name": "finetune"}, "prototypes"),
    ):
        raw = run_config(root, name, {**model, "zero_shot_head": head}, method, data)
        fit(parse_config(raw), log=quiet)
        runs[name] = root / "runs" / name
    return root, runs, pretrained


def tiny_clip_checkpoint(root: Path, name: str) -> tuple[dict, nn.Module]:
    """A tiny random OpenCLIP ViT-B-32 saved under ``root``, and the ``model:`` section that loads it."""
    config_path = root / f"{name}.json"
    config_path.write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(0)
    pretrained = open_clip.create_model("ViT-B-32", pretrained=None, **TINY_CLIP)
    checkpoint = root / "clip.safetensors"
    save_state_dict_file(pretrained.state_dict(), checkpoint)
    model = {"source": "open_clip", "name": str(config_path), "checkpoint": str(checkpoint), "templates": ["a {}."]}
    return model, pretrained


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_clip")
    model, pretrained = tiny_clip_checkpoint(root, "robustft-test-export-clip")
    fit(parse_config(run_config(root, "ft", model, {"name": "finetune"}, write_shapes_dataset(root / "data"))), quiet)
    return root, root / "runs" / "ft", pretrained


@pytest.fixture(scope="module")
def clip_lora_runs(tmp_path_factory):
    """LoRA runs over the tiny random OpenCLIP model: attention in_proj + out_proj with the adapter file; only
    in_proj, merged only (factors from the weights); the MLP linears and out_proj (in_proj left alone)."""
    root = tmp_path_factory.mktemp("export_clip_lora")
    model, pretrained = tiny_clip_checkpoint(root, "robustft-test-export-clip-lora")
    data = write_shapes_dataset(root / "data")
    runs = {}
    for name, method in (
        ("attention", {"name": "lora", "rank": 2}),
        ("in_proj_merged", {"name": "lora", "rank": 2, "target_modules": [r"attn\.in_proj$"], "save_adapter": False}),
        ("mlp_out_proj", {"name": "lora", "rank": 2, "target_modules": [r"mlp\.c_fc$", r"attn\.out_proj$"]}),
    ):
        fit(parse_config(run_config(root, name, model, method, data)), log=quiet)
        runs[name] = root / "runs" / name
    return root, runs, pretrained


def peft_clip_logits(out: Path, images_batch: torch.Tensor, visual_only: bool = False) -> tuple:
    """Logits of the peft export read back by open_clip + peft (the base from ``out/base``), and the base's."""
    from peft import PeftModel

    base = open_clip.create_model(f"local-dir:{out / 'base'}").eval()
    head = load_file(out / "classifier.safetensors")
    before = F.normalize(base.encode_image(images_batch), dim=-1) @ head["weight"].T + head["bias"]
    model = PeftModel.from_pretrained(base, str(out)).eval()
    features = model.encode_image(images_batch)  # PeftModel hands attributes on to the wrapped CLIP model
    return F.normalize(features, dim=-1) @ head["weight"].T + head["bias"], before, model


def images(count: int = 4) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_final_checkpoint_carries_format_model_class_names_and_method(timm_runs) -> None:
    _, runs, _ = timm_runs
    metadata = read_final_metadata(runs["lora"] / FINAL_CHECKPOINT)
    assert metadata.format_version == FORMAT_VERSION
    assert metadata.class_names == ["circle", "square"]
    assert metadata.method == "lora"
    assert metadata.model_spec["name"] == "vit_tiny_patch16_224" and metadata.model_spec["source"] == "timm"
    assert metadata.predictor == "image_classifier" and metadata.normalize_features is False
    assert tuple(metadata.data_config["input_size"]) == (3, 32, 32)
    assert read_final_metadata(runs["prototypes"] / FINAL_CHECKPOINT).normalize_features is True


def test_load_returns_predictor_class_names_and_eval_transform(timm_runs) -> None:
    from PIL import Image

    _, runs, _ = timm_runs
    loaded = robustft.load(runs["lora"])
    assert loaded.class_names == ["circle", "square"]
    assert not loaded.predictor.training
    image = loaded.transform(Image.new("RGB", (50, 40), color=(200, 10, 10)))
    assert image.shape == (3, 32, 32)
    assert loaded.predictor(image[None]).shape == (1, 2)
    assert "robustft.api" in sys.modules  # through the lazy attribute


def test_old_final_checkpoint_without_metadata_still_loads(timm_runs, tmp_path) -> None:
    import shutil

    _, runs, _ = timm_runs
    old = tmp_path / "old_run"
    shutil.copytree(runs["lora"], old)
    final = old / FINAL_CHECKPOINT
    save_file(load_file(final), final, metadata={"format": "pt"})  # what robustft wrote before the metadata
    assert read_final_metadata(final) is None
    reference = robustft.load(runs["lora"]).predictor(images())
    loaded = robustft.load(old)  # rebuilt from config.yaml and the data, as `robustft evaluate` does
    assert loaded.metadata is None and loaded.class_names == ["circle", "square"]
    torch.testing.assert_close(loaded.predictor(images()), reference, atol=1e-5, rtol=0)


def test_timm_export_loads_in_timm_with_the_runs_logits_and_class_names(timm_runs) -> None:
    root, runs, _ = timm_runs
    out = export_run(runs["lora"], "timm", root / "exports" / "timm")
    reference = robustft.load(runs["lora"]).predictor(images())
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    torch.testing.assert_close(model(images()), reference, atol=1e-5, rtol=0)
    config = json.loads((out / "config.json").read_text())
    assert config["label_names"] == ["circle", "square"]
    overlay = {"file": str(out / "model.safetensors"), "num_classes": 2}
    again = timm.create_model("vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=overlay, **TINY_VIT)
    torch.testing.assert_close(again.eval()(images()), reference, atol=1e-5, rtol=0)
    assert tuple(model.pretrained_cfg["input_size"]) == (3, 32, 32)


@pytest.mark.parametrize("run", ["lora", "lora_merged"])
def test_peft_export_loads_in_peft_with_the_runs_logits(timm_runs, run) -> None:
    PeftModel = pytest.importorskip("peft").PeftModel  # noqa: N806  (the class, from the optional package)

    root, runs, pretrained = timm_runs
    out = export_run(runs[run], "peft", root / "exports" / f"peft_{run}")
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    base = timm.create_model(f"local-dir:{out / 'base'}", pretrained=True).eval()
    before = base(images())
    model = PeftModel.from_pretrained(base, str(out)).eval()
    reference = robustft.load(runs[run]).predictor(images())
    torch.testing.assert_close(model(images()), reference, atol=1e-5, rtol=0)
    with model.disable_adapter():  # the adapter is what changes the logits: without it, the base
        torch.testing.assert_close(model(images()), before, atol=1e-6, rtol=0)
    blocks = {key: value for key, value in base.state_dict().items() if key.startswith("blocks.0.mlp")}
    assert all(torch.equal(value, pretrained.state_dict()[key]) for key, value in blocks.items())  # the base
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2


@pytest.mark.parametrize("run", ["attention", "in_proj_merged", "mlp_out_proj"])
def test_peft_export_of_open_clip_lora_loads_in_peft_with_the_runs_logits(clip_lora_runs, run) -> None:
    """robustft's LoRA on nn.MultiheadAttention's fused in_proj / out_proj is peft's lora.MultiheadAttention."""
    from peft.tuners.lora.layer import MultiheadAttention as PeftMultiheadAttention

    root, runs, pretrained = clip_lora_runs
    out = export_run(runs[run], "peft", root / "exports" / run)
    reference = robustft.load(runs[run]).predictor(images())
    logits, before, model = peft_clip_logits(out, images())
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)
    assert (logits - before).abs().max() > 1e-3  # the adapter is what moves the logits
    with model.disable_adapter():
        torch.testing.assert_close(
            model.encode_image(images()), pretrained.eval().encode_image(images()), atol=1e-6, rtol=0
        )
    attention = model.base_model.model.visual.transformer.resblocks[0].attn
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["lora_alpha"] == 16
    state = load_file(out / "adapter_model.safetensors")
    in_proj_b = next(value for key, value in state.items() if key.endswith("attn.lora_B.weight"))
    out_proj_b = next(value for key, value in state.items() if key.endswith("attn.base_layer.out_proj.lora_B.weight"))
    assert isinstance(attention, PeftMultiheadAttention)
    assert in_proj_b.shape == (3 * 32, 2) and out_proj_b.shape == (32, 2)
    assert (in_proj_b.abs().max() == 0) == (run == "mlp_out_proj")  # a projection the run left alone: B = 0
    assert (out_proj_b.abs().max() == 0) == (run == "in_proj_merged")
    assert not any(key.startswith("base_model.model.transformer.") for key in state)  # the text tower untouched


@pytest.mark.slow  # a LoRA fit over the committed glyph-clip (6 blocks) and its export: ~36 s on 2 shared cores
def test_peft_export_of_glyph_clip_lora_loads_in_peft_with_the_runs_logits(tmp_path) -> None:
    from robustft.backbones.builtin import glyph_clip_checkpoint, register_glyph_clip

    model = {"source": "open_clip", "name": register_glyph_clip(), "checkpoint": str(glyph_clip_checkpoint())}
    method = {"name": "lora", "rank": 4}
    fit(parse_config(run_config(tmp_path, "glyph_lora", model, method, write_shapes_dataset(tmp_path / "data"))), quiet)
    run_dir = tmp_path / "runs" / "glyph_lora"
    out = export_run(run_dir, "peft", tmp_path / "peft")
    logits, before, _ = peft_clip_logits(out, images())
    torch.testing.assert_close(logits, robustft.load(run_dir).predictor(images()), atol=1e-5, rtol=0)
    assert (logits - before).abs().max() > 1e-4


def test_open_clip_export_loads_in_open_clip_with_the_runs_logits(clip_run) -> None:
    root, run_dir, pretrained = clip_run
    out = export_run(run_dir, "open_clip", root / "export")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    model.eval()
    head = load_file(out / "classifier.safetensors")
    with safe_open(str(out / "classifier.safetensors"), framework="pt") as handle:
        assert json.loads(handle.metadata()["class_names"]) == ["circle", "square"]
    logits = F.normalize(model.encode_image(images()), dim=-1) @ head["weight"].T + head["bias"]
    torch.testing.assert_close(logits, robustft.load(run_dir).predictor(images()), atol=1e-5, rtol=0)
    tuned, original = model.state_dict(), pretrained.state_dict()
    assert all(torch.equal(tuned[key], original[key]) for key in original if not key.startswith("visual."))
    assert not torch.equal(tuned["visual.proj"], original["visual.proj"])  # the tuned image tower
    assert preprocess is not None


def test_export_refusals_are_one_line_and_touch_nothing(timm_runs, clip_run, monkeypatch, capsys) -> None:
    root, runs, _ = timm_runs
    taken = root / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    before = tree_bytes(taken)
    message = cli_error(monkeypatch, capsys, "export", str(runs["lora"]), str(taken), "--to", "timm")
    assert str(taken) in message and "not an empty folder" in message
    assert tree_bytes(taken) == before
    assert "--to 'onnx'" in cli_error(monkeypatch, capsys, "export", str(runs["lora"]), str(root / "x"), "--to", "onnx")
    assert "normalised" in cli_error(
        monkeypatch, capsys, "export", str(runs["prototypes"]), str(root / "p"), "--to", "timm"
    )
    message = cli_error(monkeypatch, capsys, "export", str(runs["prototypes"]), str(root / "q"), "--to", "peft")
    assert "finetune" in message and "lora" in message
    assert "open_clip" in cli_error(
        monkeypatch, capsys, "export", str(runs["lora"]), str(root / "r"), "--to", "open_clip"
    )
    assert "not a finished run" in cli_error(monkeypatch, capsys, "export", str(root), str(root / "s"), "--to", "timm")
    leftovers = [path.name for path in root.iterdir() if path.name.lstrip(".").split(".tmp-")[0] in "xpqrs"]
    assert leftovers == []  # neither the export folder nor its temporary was left behind


def test_export_command_lists_the_files(timm_runs, monkeypatch, capsys) -> None:
    root, runs, _ = timm_runs
    monkeypatch.setattr(sys, "argv", ["robustft", "export", str(runs["lora"]), str(root / "cli_timm"), "--to", "timm"])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 0
    printed = capsys.readouterr().out
    assert "config.json" in printed and "model.safetensors" in printed
    assert (root / "cli_timm" / "model.safetensors").is_file()


@pytest.mark.slow  # a digits-shift fit and its evaluation: ~35 s on 2 shared cores
def test_builtin_digits_run_exports_to_timm(digits_prepared, tmp_path) -> None:
    """The built-in ViT is timm's vit_tiny_patch16_224 architecture with its own args; its classifier head exports."""
    from robustft.demo import demo_config

    config = demo_config("finetune", 0, tmp_path, steps=1, progress=False)
    fit(config, log=quiet, prepared=digits_prepared)
    out = export_run(config.run_dir, "timm", tmp_path / "timm")
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    reference = robustft.load(config.run_dir).predictor(images())
    torch.testing.assert_close(model(images()), reference, atol=1e-5, rtol=0)
    assert json.loads((out / "config.json").read_text())["label_names"] == digits_prepared.ctx.class_names
