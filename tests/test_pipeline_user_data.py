"""A user's own data and models through the whole pipeline: folders + CSV, timm + OpenCLIP heads."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import timm
import torch

from posthoc_support import draw_shape
from robustft.backbones.checkpoint_files import save_state_dict_file
from robustft.config import parse_config
from robustft.runner import fit

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
CLASSES = ["circle", "square"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """train / id_test as class folders, id_val and an OOD split (other brightness) as CSV manifests."""
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("id_test", 6)):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                draw_shape(name, 20, rng).save(root / split / name / f"{i}.png")
    for split, brightness in (("val", 20), ("dark", 120)):
        (root / split).mkdir()
        rows = ["path,label,domain"]
        for i in range(8):
            name = CLASSES[i % 2]
            draw_shape(name, brightness, rng).save(root / split / f"{i}.png")
            rows.append(f"{split}/{i}.png,{name},{split}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def user_config(dataset, out, model: dict, method: str = "finetune") -> dict:
    return {
        "name": f"{model['source']}-{method}",
        "output_dir": str(out),
        "model": model,
        "data": {
            "benchmark": None,
            "root": str(dataset),
            "splits": {"train": "train", "id_val": "val.csv", "id_test": "id_test", "ood_dark": "dark.csv"},
            "batch_size": 8,
        },
        "method": {"name": method},
        "optim": {"lr": 1e-3},
        "train": {"steps": 3, "progress": False, "checkpoint_every": 2},
    }


def check_results(results: dict, method: str) -> dict:
    entry = results["methods"][method]
    assert set(entry["ood"]) == {"ood_dark"}
    assert 0 <= entry["id"] <= 100 and entry["steps"] == 3
    return entry


def test_open_clip_text_head_on_folders_and_csv(dataset, tmp_path):
    config_path = tmp_path / "robustft-pipeline-clip.json"
    config_path.write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None, **TINY_CLIP)  # same shapes, registered below
    checkpoint = tmp_path / "clip.safetensors"
    save_state_dict_file(model.state_dict(), checkpoint)
    spec = {"source": "open_clip", "name": str(config_path), "checkpoint": str(checkpoint), "templates": "simple"}
    results = fit(parse_config(user_config(dataset, tmp_path, spec)), log=lambda m: None)
    entry = check_results(results, "finetune")
    assert entry["trainable_params"] == sum(p.numel() for p in model.visual.parameters()) + 32 * 2 + 2


def test_timm_prototype_head_and_linear_probe(dataset, tmp_path):
    torch.manual_seed(0)
    kwargs = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2, "num_classes": 5}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)
    checkpoint = tmp_path / "vit.safetensors"
    save_state_dict_file(model.state_dict(), checkpoint)
    spec = {
        "source": "timm",
        "name": "vit_tiny_patch16_224",
        "checkpoint": str(checkpoint),
        "model_kwargs": {k: v for k, v in kwargs.items() if k != "num_classes"},
    }
    # 5-class pretrained head vs 2 classes: auto falls back to class prototypes
    results = fit(parse_config(user_config(dataset, tmp_path, spec, "linear_probe")), log=lambda m: None)
    entry = results["methods"]["linear_probe"]
    assert entry["trainable_params"] == 32 * 2 + 2
    assert entry["id"] >= 50.0
