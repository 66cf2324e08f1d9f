"""The text zero-shot head is open_clip's ``build_zero_shot_classifier`` over open_clip's own templates, and
gives the head robustft built by hand before (same templates, same weights to float noise)."""

from __future__ import annotations

import hashlib
import json

import open_clip
import torch
import torch.nn.functional as F

from robustft.backbones.checkpoint_files import save_state_dict_file
from robustft.backbones.open_clip_backbone import load_open_clip, text_zero_shot_head
from robustft.backbones.templates import IMAGENET_SIMPLE_TEMPLATES, IMAGENET_TEMPLATES, load_templates

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
# sha256 of the 80 templates robustft kept as its own copy, one per line: open_clip's list must be that list.
PREVIOUS_IMAGENET_TEMPLATES_SHA256 = "4f976686fb651bb5803d4689dcd849f75efe0ef19a3c801355bc9a6f03c8a5af"


def test_templates_are_open_clips_and_the_same_as_before() -> None:
    assert len(IMAGENET_TEMPLATES) == 80
    digest = hashlib.sha256("\n".join(IMAGENET_TEMPLATES).encode()).hexdigest()
    assert digest == PREVIOUS_IMAGENET_TEMPLATES_SHA256
    assert load_templates("imagenet_simple") == list(IMAGENET_SIMPLE_TEMPLATES) and len(IMAGENET_SIMPLE_TEMPLATES) == 7
    assert IMAGENET_TEMPLATES[0] == "a bad photo of a {}." and IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."


def hand_built_head(parts, class_names: list[str], templates: list[str]) -> torch.Tensor:
    """robustft's previous construction: mean of normalised prompt embeddings, normalised, times the scale."""
    tokens = parts.tokenizer([template.format(name) for name in class_names for template in templates])
    with torch.no_grad():
        embeddings = F.normalize(parts.model.eval().encode_text(tokens).float(), dim=-1)
    embeddings = embeddings.reshape(len(class_names), len(templates), -1).mean(dim=1)
    return F.normalize(embeddings, dim=-1) * parts.logit_scale


def test_text_head_equals_the_hand_built_head_to_float_noise(tmp_path) -> None:
    config = tmp_path / "robustft-test-zero-shot-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(0)
    checkpoint = tmp_path / "clip.safetensors"
    save_state_dict_file(open_clip.create_model("ViT-B-32", pretrained=None, **TINY_CLIP).state_dict(), checkpoint)
    parts = load_open_clip(str(config), checkpoint)
    class_names = ["circle", "square", "triangle", "star", "hexagon"]
    templates = list(IMAGENET_TEMPLATES[:6])
    parts.model.train()
    head = text_zero_shot_head(parts, class_names, templates, batch_size=12)  # 2 classes a pass: 3 passes
    assert all(module.training for module in parts.model.modules())  # its mode is given back
    reference = hand_built_head(parts, class_names, templates)
    torch.testing.assert_close(head.weight.detach(), reference, atol=1e-6, rtol=1e-6)
    assert torch.equal(head.bias.detach(), torch.zeros(len(class_names)))
    assert not torch.allclose(reference[0], reference[1])  # the classes differ: the comparison means something
