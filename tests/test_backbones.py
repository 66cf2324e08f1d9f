"""Backbone loading (timm, open_clip), checkpoint files, zero-shot heads and prompt templates.

Everything runs on tiny random models built in-process: nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from open_clip import OPENAI_DATASET_MEAN
from torch import nn

from robustft.backbones.checkpoint_files import load_state_dict_file, save_state_dict_file
from robustft.backbones.classifier import ImageClassifier
from robustft.backbones.open_clip_backbone import (
    OpenClipParts,
    load_open_clip,
    open_clip_classifier,
    register_open_clip_config,
    text_zero_shot_head,
)
from robustft.backbones.templates import IMAGENET_TEMPLATES, SIMPLE_TEMPLATES, load_templates
from robustft.backbones.timm_backbone import load_timm_backbone
from robustft.backbones.zero_shot import classifier_head, prototype_head
from robustft.errors import CheckpointError, ConfigError

VIT = "vit_tiny_patch16_224"
VIT_KWARGS = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
CLIP_NAME = "robustft-test-tiny-clip"


def _images(n: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def _reference_vit(num_classes: int = 10, **overrides: object) -> nn.Module:
    torch.manual_seed(1)
    return timm.create_model(VIT, pretrained=False, num_classes=num_classes, **{**VIT_KWARGS, **overrides}).eval()


def _save_pt_like_ddp(state: dict[str, torch.Tensor], path: Path) -> None:
    # What a DDP training script writes: a container dict, "module." on every key.
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)


# --- timm ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_timm_checkpoint_roundtrip_gives_the_same_logits(tmp_path: Path, suffix: str) -> None:
    reference = _reference_vit()
    path = tmp_path / f"vit{suffix}"
    if suffix == ".safetensors":
        save_state_dict_file(reference.state_dict(), path)
    else:
        _save_pt_like_ddp(reference.state_dict(), path)

    # num_classes is not passed: it must be read from the checkpoint's head.
    backbone, head, data_config = load_timm_backbone(VIT, path, dict(VIT_KWARGS))
    backbone.eval()
    x = _images()
    with torch.no_grad():
        expected_embedding = reference.forward_head(reference.forward_features(x), pre_logits=True)
        expected_logits = reference(x)
        embedding = backbone(x)
        logits = ImageClassifier(backbone, head, data_config=data_config)(x)
    assert head is not None and head.out_features == 10
    assert embedding.shape == (3, 32)
    torch.testing.assert_close(embedding, expected_embedding, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-6)
    assert data_config["input_size"] == (3, 32, 32)
    assert data_config["mean"] == (0.5, 0.5, 0.5)


def test_timm_without_checkpoint_or_head(tmp_path: Path) -> None:
    backbone, head, data_config = load_timm_backbone(VIT, None, {**VIT_KWARGS, "num_classes": 0})
    assert head is None
    assert backbone(_images()).shape == (3, 32)
    # A headless checkpoint (saved after reset_classifier(0)) infers num_classes=0 and loads.
    path = tmp_path / "headless.safetensors"
    save_state_dict_file(backbone.state_dict(), path)
    loaded, head, _ = load_timm_backbone(VIT, path, dict(VIT_KWARGS))
    assert head is None
    torch.testing.assert_close(loaded.eval()(_images()), backbone.eval()(_images()))


def test_timm_checkpoint_of_another_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "wider_deeper.safetensors"
    save_state_dict_file(_reference_vit(depth=3, embed_dim=48).state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        load_timm_backbone(VIT, path, dict(VIT_KWARGS))
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert "unexpected keys" in message and "blocks.2." in message
    assert "shape mismatches" in message and "(48,) vs (32,)" in message


def test_timm_errors_name_the_config_key() -> None:
    with pytest.raises(ConfigError, match="model.name: unknown timm model 'no_such_vit'"):
        load_timm_backbone("no_such_vit", None)
    with pytest.raises(ConfigError, match="model.model_kwargs: timm cannot build"):
        load_timm_backbone(VIT, None, {**VIT_KWARGS, "no_such_argument": 1})
    with pytest.raises(ConfigError, match="model.name: timm cannot build"):
        load_timm_backbone(f"{VIT}.no_such_tag", None, dict(VIT_KWARGS))


# --- checkpoint files ---------------------------------------------------------------------------


class _Payload:
    """A pickle payload: unpickling it would create ``marker`` (i.e. run code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_code_executing_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.ones(2), "payload": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="refusing to load") as info:
        load_state_dict_file(path)
    assert str(path) in str(info.value) and "safetensors" in str(info.value)
    assert not marker.exists()


def test_missing_truncated_and_non_tensor_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint not found: .*absent.safetensors"):
        load_state_dict_file(tmp_path / "absent.safetensors")

    state = {"w": torch.arange(4096.0)}
    for name in ("good.safetensors", "good.pt"):
        full = tmp_path / name
        save_state_dict_file(state, full) if name.endswith(".safetensors") else torch.save(state, full)
        cut = tmp_path / f"cut_{name}"
        cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
        with pytest.raises(CheckpointError) as info:
            load_state_dict_file(cut)
        assert str(cut) in str(info.value) and "\n" not in str(info.value)

    not_tensors = tmp_path / "metadata.pt"
    torch.save({"epoch": 3, "lr": 0.1}, not_tensors)
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_state_dict_file(not_tensors)


def test_save_handles_shared_and_strided_tensors(tmp_path: Path) -> None:
    base = torch.arange(12.0).reshape(3, 4)
    state = {"tied_a": base, "tied_b": base, "transposed": base.t(), "row": base[1]}
    path = tmp_path / "sub" / "shared.safetensors"
    save_state_dict_file(state, path)
    loaded = load_state_dict_file(path)
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    assert not (tmp_path / "sub" / "shared.safetensors.tmp").exists()
    with pytest.raises(CheckpointError, match="use a .safetensors file name"):
        save_state_dict_file(state, tmp_path / "weights.pt")


# --- open_clip ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("clip_config") / f"{CLIP_NAME}.json"
    path.write_text(json.dumps(TINY_CLIP))
    return path


@pytest.fixture(scope="module")
def clip(clip_config: Path) -> OpenClipParts:
    torch.manual_seed(2)
    return load_open_clip(str(clip_config), None)  # registers the config, random weights


def test_open_clip_checkpoint_roundtrip(clip: OpenClipParts, tmp_path: Path) -> None:
    state = clip.model.state_dict()
    safetensors_path = tmp_path / "clip.safetensors"
    save_state_dict_file(state, safetensors_path)
    pt_path = tmp_path / "clip_epoch_3.pt"
    _save_pt_like_ddp(state, pt_path)
    x = _images()
    with torch.no_grad():
        expected = clip.image_encoder.eval()(x)
        assert torch.equal(expected, clip.model.encode_image(x, normalize=False))
        for path in (safetensors_path, pt_path):
            loaded = load_open_clip(CLIP_NAME, path)  # by the registered name this time
            torch.testing.assert_close(loaded.image_encoder.eval()(x), expected, rtol=0, atol=1e-6)
            assert loaded.logit_scale == pytest.approx(clip.logit_scale)
    assert expected.shape == (3, 32)
    assert clip.logit_scale == pytest.approx(1 / 0.07)  # open_clip's initial scale
    assert clip.data_config["input_size"] == (3, 32, 32)
    assert clip.data_config["crop_pct"] == 1.0 and clip.data_config["interpolation"] == "bicubic"
    assert clip.data_config["mean"] == pytest.approx(OPENAI_DATASET_MEAN)
    # The classifier's parameters are the image tower's only (the text tower stays out of training).
    classifier = open_clip_classifier(clip, nn.Linear(32, 5))
    assert (
        sum(p.numel() for p in classifier.parameters())
        == sum(p.numel() for p in clip.model.visual.parameters()) + 5 * 32 + 5
    )


def test_open_clip_mismatched_checkpoint_and_bad_config(clip: OpenClipParts, tmp_path: Path) -> None:
    path = tmp_path / "clip.safetensors"
    save_state_dict_file(clip.model.state_dict(), path)
    with pytest.raises(CheckpointError, match="shape mismatches") as info:
        load_open_clip(CLIP_NAME, path, {"embed_dim": 16})
    assert str(path) in str(info.value)
    with pytest.raises(ConfigError, match="unknown open_clip model 'no-such-clip'"):
        load_open_clip("no-such-clip", None)
    with pytest.raises(ConfigError, match="'pretrained' is not allowed"):
        load_open_clip(CLIP_NAME, None, {"pretrained": "openai"})
    shadow = tmp_path / "ViT-B-32.json"  # would silently change what "ViT-B-32" builds
    shadow.write_text(json.dumps(TINY_CLIP))
    with pytest.raises(ConfigError, match="would replace"):
        register_open_clip_config(shadow)


def test_text_zero_shot_head_matches_an_independent_computation(clip: OpenClipParts) -> None:
    class_names = ["cat", "dog", "traffic light"]
    templates = ["a photo of a {}.", "a sketch of the {}.", "{}"]
    clip.model.train()
    head = text_zero_shot_head(clip, class_names, templates, batch_size=4)  # one class per text batch
    assert clip.model.training and clip.model.visual.training  # modes restored

    clip.model.eval()
    rows = []
    with torch.no_grad():
        for name in class_names:
            per_template = [
                F.normalize(clip.model.encode_text(clip.tokenizer([t.format(name)]))[0], dim=0) for t in templates
            ]
            rows.append(clip.logit_scale * F.normalize(torch.stack(per_template).mean(0), dim=0))
    expected = torch.stack(rows)
    torch.testing.assert_close(head.weight.detach(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(head.bias.detach(), torch.zeros(3))
    # All classes in one text batch give the same head.
    torch.testing.assert_close(text_zero_shot_head(clip, class_names, templates).weight, head.weight)

    # On normalised image features the head gives CLIP's own logits.
    x = _images()
    with torch.no_grad():
        logits = open_clip_classifier(clip, head)(x)
        image = F.normalize(clip.model.encode_image(x), dim=-1)
    torch.testing.assert_close(logits, image @ expected.T, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="no '\\{\\}'"):
        text_zero_shot_head(clip, class_names, ["a photo"])


# --- zero-shot heads without a text tower -------------------------------------------------------


def test_prototype_head_is_the_normalised_class_mean() -> None:
    embeddings = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 5.0], [-2.0, 0.0], [0.0, -1.0]])
    labels = torch.tensor([0, 0, 1, 2, 2])
    head = prototype_head(embeddings, labels, num_classes=3, scale=10.0)
    # class 0: mean of (1,0),(0,1) -> (1,1)/sqrt2; class 1: (0,1); class 2: mean of (-1,0),(0,-1)
    r = 2**-0.5
    expected = 10.0 * torch.tensor([[r, r], [0.0, 1.0], [-r, -r]])
    torch.testing.assert_close(head.weight.detach(), expected)
    assert torch.equal(head.bias.detach(), torch.zeros(3))
    with pytest.raises(ValueError, match="class 1 has no example"):
        prototype_head(embeddings, torch.tensor([0, 0, 2, 2, 3]), num_classes=4, scale=1.0)
    with pytest.raises(ValueError, match="labels must lie in"):
        prototype_head(embeddings, labels, num_classes=2, scale=1.0)


def test_classifier_head_copies_and_subsets() -> None:
    pretrained = nn.Linear(4, 6)
    full = classifier_head(pretrained)
    assert full is not pretrained and torch.equal(full.weight, pretrained.weight)
    with torch.no_grad():
        full.weight.add_(1.0)  # a copy: training it never changes the pretrained head
    assert not torch.equal(full.weight, pretrained.weight)
    subset = classifier_head(pretrained, [5, 0, 2])
    assert torch.equal(subset.weight, pretrained.weight[[5, 0, 2]])
    assert torch.equal(subset.bias, pretrained.bias[[5, 0, 2]])
    with pytest.raises(ValueError, match="class index 6"):
        classifier_head(pretrained, [0, 6])


# --- templates ----------------------------------------------------------------------------------


def test_load_templates(tmp_path: Path) -> None:
    imagenet = load_templates("imagenet")
    assert len(imagenet) == 80 == len(set(imagenet))
    assert imagenet[0] == "a bad photo of a {}." and imagenet[-1] == "a tattoo of the {}."
    assert load_templates("simple") == list(SIMPLE_TEMPLATES) == ["a photo of a {}."]
    assert load_templates(["a {} in the wild"]) == ["a {} in the wild"]
    imagenet.append("mutated")  # the module constant is not shared with callers
    assert len(IMAGENET_TEMPLATES) == 80

    path = tmp_path / "templates.txt"
    path.write_text("a photo of a {}.\n\n  itap of a {}.  \n")
    assert load_templates(str(path)) == ["a photo of a {}.", "itap of a {}."]

    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a {}.\na photo\n")
    with pytest.raises(ConfigError, match="'a photo' has no"):
        load_templates(bad)
    with pytest.raises(ConfigError, match="exactly one"):
        load_templates(["a {} next to a {}"])
    with pytest.raises(ConfigError, match="neither 'imagenet', 'simple'"):
        load_templates("imagenet80")
    with pytest.raises(ConfigError, match="no templates"):
        load_templates([])
