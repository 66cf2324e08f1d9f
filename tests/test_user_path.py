"""A user's whole path on their own files, through the command line: a tiny on-disk image folder with CSV
manifests and a tiny timm ViT, timm ResNet or OpenCLIP model saved as local safetensors files.

Per model: ``data check``, ``compare`` (with LoRA, VRF and WiSE-FT; LoRA is skipped up front where the model
has no attention), ``report``, ``export`` (each export reloaded by its own library with robustft's logits)
and ``cam``. Two optimiser steps per run keep the three paths to about a minute on two cores.
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
import yaml
from safetensors.torch import load_file

import robustft
from posthoc_support import write_shapes_dataset
from robustft.backbones.checkpoint_files import save_state_dict_file
from robustft.cli import main

VIT = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}
RESNET = {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64], "stem_width": 8}
CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def model_section(kind: str, root: Path) -> dict:
    """A model of ``kind`` with random weights, saved where a user keeps theirs, as its ``model:`` section."""
    torch.manual_seed(0)
    checkpoint = root / f"{kind}.safetensors"
    if kind == "clip":
        config = root / "robustft-user-path-clip.json"
        config.write_text(json.dumps(CLIP))
        save_state_dict_file(open_clip.create_model("ViT-B-32", pretrained=None, **CLIP).state_dict(), checkpoint)
        return {"source": "open_clip", "name": str(config), "checkpoint": str(checkpoint), "templates": ["a {}."]}
    name, kwargs = ("vit_tiny_patch16_224", VIT) if kind == "vit" else ("resnet18", RESNET)
    model = timm.create_model(name, pretrained=False, num_classes=2, **kwargs)  # its head: the user's two classes
    save_state_dict_file(model.state_dict(), checkpoint)
    return {"source": "timm", "name": name, "checkpoint": str(checkpoint), "model_kwargs": kwargs}


def cli(monkeypatch, capsys, *arguments: str) -> str:
    monkeypatch.setattr(sys, "argv", ["robustft", *arguments])
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as exited:
        code = exited.code or 0
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    return captured.out + captured.err


def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", ["vit", "resnet", "clip"])
def test_a_users_folder_and_model_through_every_command(kind, tmp_path, monkeypatch, capsys):
    data = write_shapes_dataset(tmp_path / "data")
    config = tmp_path / "config.yaml"
    raw = {
        "name": "mine",
        "output_dir": str(tmp_path / "runs"),
        "model": model_section(kind, tmp_path),
        "data": data,
        "optim": {"lr": 1e-3},
        "train": {"steps": 2, "progress": False, "checkpoint_every": 10},
    }
    config.write_text(yaml.safe_dump(raw))

    checked = cli(monkeypatch, capsys, "data", "check", str(config))
    assert "ood_dark" in checked and "train" in checked

    out = tmp_path / "comparison"
    logged = cli(monkeypatch, capsys, "compare", str(config), "--methods", "lora,vrf,wise_ft", "--out", str(out))
    leaderboard = json.loads((out / "leaderboard.json").read_text())
    rows = set(leaderboard["methods"])
    assert {"zeroshot", "finetune", "vrf", "wise_ft"} <= rows
    if kind == "resnet":  # no attention, no linear layer in the backbone: refused before any run, with why
        assert "lora" not in rows and "lora: skipped" in logged
    else:
        assert "lora" in rows
    for row in rows:
        assert 0 <= leaderboard["methods"][row]["id"]["mean"] <= 100, row

    reported = tmp_path / "report"
    runs = out / "seed0"  # compare writes each seed's runs under seed<k>/
    cli(monkeypatch, capsys, "report", *(str(runs / row) for row in sorted(rows)), "--out", str(reported))
    html = (reported / "report.html").read_text()
    assert "How to read" in html and "± 0.00" not in html

    finetuned = runs / "finetune"
    loaded = robustft.load(finetuned)
    assert loaded.class_names == ["circle", "square"]
    reference = loaded.predictor(images())
    exported = tmp_path / "export"
    if kind == "clip":
        cli(monkeypatch, capsys, "export", str(finetuned), str(exported), "--to", "open_clip")
        model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{exported}")
        head = load_file(exported / "classifier.safetensors")
        logits = F.normalize(model.eval().encode_image(images()), dim=-1) @ head["weight"].T + head["bias"]
    else:
        cli(monkeypatch, capsys, "export", str(finetuned), str(exported), "--to", "timm")
        logits = timm.create_model(f"local-dir:{exported}", pretrained=True).eval()(images())
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)
    if kind == "vit":
        peft = pytest.importorskip("peft")
        adapter = tmp_path / "adapter"
        cli(monkeypatch, capsys, "export", str(runs / "lora"), str(adapter), "--to", "peft")
        base = timm.create_model(f"local-dir:{adapter / 'base'}", pretrained=True).eval()
        tuned = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
        torch.testing.assert_close(tuned(images()), robustft.load(runs / "lora").predictor(images()), atol=1e-5, rtol=0)

    if kind != "resnet":  # the CAM reads the image tower's attention
        cams = tmp_path / "cam"
        cli(monkeypatch, capsys, "cam", "ood_dark", "--run", str(finetuned), "--out", str(cams), "--count", "2")
        assert len(list(cams.glob("*.png"))) >= 2
