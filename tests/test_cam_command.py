"""``robustft cam`` on a user's data (image folders, a CSV manifest) and on one image file, for timm and OpenCLIP.

The run's predictor is rebuilt through its own method: the OpenCLIP case is a mixture-of-adapters run, whose
predictor keeps routed adapters inside ``nn.MultiheadAttention``, so the CAM's attention capture runs through
the adapted attention.
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import timm
import torch
from typer.testing import CliRunner

from posthoc_support import quiet, write_shapes_dataset
from robustft.backbones.checkpoint_files import save_state_dict_file
from robustft.cli import app
from robustft.commands.cam import evaluation_split, load_image
from robustft.config import parse_config
from robustft.runner import fit, prepare_run

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TIMM_KWARGS = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
PNG = b"\x89PNG\r\n\x1a\n"


def model_section(kind: str, root: Path) -> dict:
    torch.manual_seed(0)
    if kind == "timm":
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TIMM_KWARGS)
        save_state_dict_file(model.state_dict(), root / "vit.safetensors")
        return {
            "source": "timm",
            "name": "vit_tiny_patch16_224",
            "checkpoint": str(root / "vit.safetensors"),
            "model_kwargs": TIMM_KWARGS,
        }
    config_path = root / "robustft-test-cam-clip.json"
    config_path.write_text(json.dumps(TINY_CLIP))
    model = open_clip.create_model("ViT-B-32", pretrained=None, **TINY_CLIP)
    save_state_dict_file(model.state_dict(), root / "clip.safetensors")
    return {"source": "open_clip", "name": str(config_path), "checkpoint": str(root / "clip.safetensors")}


@pytest.fixture(scope="module", params=[("timm", "finetune"), ("open_clip", "mixture_of_adapters")])
def finished(request, tmp_path_factory) -> tuple[Path, dict]:
    kind, method = request.param
    root = tmp_path_factory.mktemp(f"cam_{kind}")
    data = write_shapes_dataset(root / "data")
    options = {"experts": "lora", "router_dim": 8, "blocks": "all"} if method == "mixture_of_adapters" else {}
    raw = {
        "name": method,
        "output_dir": str(root / "runs"),
        "model": model_section(kind, root),
        "data": data,
        "method": {"name": method, **options},
        "optim": {"lr": 1e-3},
        "train": {"steps": 2, "progress": False},
    }
    config = parse_config(raw)
    fit(config, log=quiet)
    return config.run_dir, raw


@pytest.mark.parametrize("split", ["id_test", "ood_dark"])  # an image folder and a CSV manifest
def test_cam_of_a_split(finished, split, tmp_path):
    run_dir, _ = finished
    result = CliRunner().invoke(app, ["cam", split, "--run", str(run_dir), "--out", str(tmp_path), "--count", "3"])
    assert result.exit_code == 0, result.output
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == 3 and all(path.read_bytes()[:8] == PNG for path in pngs)


def test_cam_of_one_image_file_preprocesses_it_as_the_run_does(finished, tmp_path):
    run_dir, raw = finished
    picture = Path(raw["data"]["root"]) / "dark" / "3.png"
    result = CliRunner().invoke(app, ["cam", str(picture), "--run", str(run_dir), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert [path.name for path in tmp_path.glob("*.png")] == ["cam_000.png"]
    assert (tmp_path / "cam_000.png").read_bytes()[:8] == PNG
    prepared = prepare_run(parse_config(raw), log=quiet)
    from_split = prepared.ctx.splits["ood_dark"][3][0]  # dark.csv row 3 is dark/3.png
    loaded = load_image(picture, evaluation_split(prepared.ctx.splits), prepared.model.data_config)
    assert torch.equal(loaded[0], from_split)


def test_cam_of_a_file_that_is_not_an_image(finished, tmp_path):
    run_dir, _ = finished
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    result = CliRunner().invoke(app, ["cam", str(text), "--run", str(run_dir), "--out", str(tmp_path / "out")])
    assert result.exit_code != 0 and "cannot read image" in str(result.exception)
    assert not (tmp_path / "out").exists()


def test_an_image_file_on_the_builtin_benchmark_is_preprocessed_as_its_split(digits_prepared, tmp_path):
    from PIL import Image

    split = digits_prepared.ctx.splits["id_test"]
    picture = tmp_path / "digit.png"
    Image.fromarray(split.images[5].permute(1, 2, 0).numpy()).save(picture)
    loaded = load_image(picture, evaluation_split(digits_prepared.ctx.splits), digits_prepared.model.data_config)
    assert torch.equal(loaded[0], split[5][0])
