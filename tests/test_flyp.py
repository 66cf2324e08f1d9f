"""FLYP (Goyal et al., CVPR 2023): the CLIP loss by hand, captions, both towers trained, head rebuilt from text.

The method runs on a tiny random OpenCLIP model built in-process (the built-in digits ViT has no text tower).
"""

from __future__ import annotations

import copy
import json
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from posthoc_support import write_shapes_dataset
from robustft.backbones.checkpoint_files import load_state_dict_file, save_state_dict_file
from robustft.backbones.open_clip_backbone import load_open_clip, text_zero_shot_head
from robustft.checkpoint import load_training_state
from robustft.config import parse_config
from robustft.demo import run_demo
from robustft.errors import UnsupportedModelError
from robustft.methods.flyp import Flyp, FlypConfig, clip_contrastive_loss
from robustft.runner import FINAL_CHECKPOINT, evaluate_run, fit, prepare_run

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TEMPLATES = ["a photo of a {}.", "a drawing of a {}.", "a {} shape."]


def quiet(message: str) -> None:
    pass


def test_clip_loss_matches_a_hand_computed_3x3_case() -> None:
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    texts = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    scale = 2.0
    # similarities images @ texts^T, row by row: [1, .6, 0], [0, .8, 1], [.6, 1, .8]
    similarity = [[1.0, 0.6, 0.0], [0.0, 0.8, 1.0], [0.6, 1.0, 0.8]]

    def cross_entropy(rows: list[list[float]]) -> float:
        return sum(-scale * row[i] + math.log(sum(math.exp(scale * v) for v in row)) for i, row in enumerate(rows)) / 3

    columns = [[similarity[j][i] for j in range(3)] for i in range(3)]
    expected = (cross_entropy(similarity) + cross_entropy(columns)) / 2
    assert float(clip_contrastive_loss(images, texts, scale)) == pytest.approx(expected, rel=1e-6)
    assert float(clip_contrastive_loss(images, texts, torch.tensor(scale))) == pytest.approx(expected, rel=1e-6)


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    """A run config over a tiny OpenCLIP model (random weights saved as its checkpoint) and a shapes dataset."""
    root = tmp_path_factory.mktemp("flyp")
    config_path = root / "robustft-test-flyp-clip.json"
    config_path.write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None, **TINY_CLIP)
    checkpoint = root / "clip.safetensors"
    save_state_dict_file(model.state_dict(), checkpoint)
    raw = {
        "name": "flyp",
        "output_dir": str(root / "runs"),
        "model": {
            "source": "open_clip",
            "name": str(config_path),
            "checkpoint": str(checkpoint),
            "templates": TEMPLATES,
        },
        "data": write_shapes_dataset(root / "data"),
        "method": {"name": "flyp"},
        "optim": {"lr": 1e-3, "weight_decay": 0.0},
        "train": {"steps": 4, "progress": False, "checkpoint_every": 4, "keep_last_checkpoint": True},
    }
    config = parse_config(raw)
    return config, prepare_run(config, log=quiet), model


def test_captions_are_seeded_templates_of_each_class_and_the_loss_is_clip_loss(clip_run) -> None:
    config, prepared, _ = clip_run
    method = Flyp(FlypConfig())
    model = method.prepare(copy.deepcopy(prepared.model), prepared.ctx)
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=16)
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    tokens = method.caption_tokens(labels)
    allowed = {
        label: {tuple(tokenizer([t.format(prepared.ctx.class_names[label])])[0].tolist()) for t in TEMPLATES}
        for label in (0, 1)
    }
    assert all(tuple(row.tolist()) in allowed[int(label)] for row, label in zip(tokens, labels, strict=True))
    assert len({tuple(row.tolist()) for row in tokens}) > 2  # several templates drawn, not one
    again = Flyp(FlypConfig())
    again.prepare(copy.deepcopy(prepared.model), prepared.ctx)
    assert torch.equal(again.caption_tokens(labels), tokens)  # seeded by the run's seed

    images = torch.stack([prepared.ctx.splits["train"][i][0] for i in range(8)])
    state = again.generator.get_state()
    loss, logs = again.loss(model, (images, labels), step=0)
    again.generator.set_state(state)
    with torch.no_grad():
        image = F.normalize(model.classifier.backbone(images), dim=-1)
        text = F.normalize(model.text_model.encode_text(again.caption_tokens(labels)), dim=-1)
    torch.testing.assert_close(loss.detach(), clip_contrastive_loss(image, text, model.logit_scale.exp().detach()))
    assert float(logs["logit_scale"]) == pytest.approx(1 / 0.07, rel=1e-4)


def test_flyp_trains_both_towers_and_rebuilds_the_head_from_the_tuned_text_tower(clip_run) -> None:
    config, prepared, clip_model = clip_run
    results = fit(config, log=quiet, prepared=prepared)
    entry = results["methods"]["flyp"]
    assert entry["steps"] == 4
    assert entry["trainable_params"] == sum(p.numel() for p in clip_model.parameters())  # both towers + scale

    trained = load_training_state(config.run_dir / "checkpoints" / "last.pt")["model"]
    initial = clip_model.state_dict()
    for key in ("text_model.token_embedding.weight", "text_model.text_projection", "text_model.logit_scale"):
        assert not torch.equal(trained[key], initial[key.removeprefix("text_model.")]), key
    image_key = "classifier.backbone.visual.conv1.weight"
    assert not torch.equal(trained[image_key], initial["visual.conv1.weight"])

    # The saved predictor's head is the zero-shot head of the *tuned* text tower, at the tuned scale.
    tuned = load_open_clip(str(config.model.name), config.model.checkpoint)
    text_state = {k.removeprefix("text_model."): v for k, v in trained.items() if k.startswith("text_model.")}
    assert tuned.model.load_state_dict(text_state, strict=False).unexpected_keys == []
    tuned.logit_scale = float(trained["text_model.logit_scale"].exp())
    expected = text_zero_shot_head(tuned, prepared.ctx.class_names, TEMPLATES).weight
    final = load_state_dict_file(config.run_dir / FINAL_CHECKPOINT)
    torch.testing.assert_close(final["head.weight"], expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(final["head.weight"], prepared.model.head.weight.detach())  # not the ZS head
    assert set(final) == set(prepared.model.state_dict())  # a plain classifier: WiSE-FT / evaluate work

    evaluated = evaluate_run(config.run_dir, log=quiet)["methods"]["flyp"]
    assert evaluated["id"] == entry["id"] and evaluated["ood"] == entry["ood"]


def test_models_without_a_text_tower_are_refused_and_skipped_by_the_demo(digits_prepared, tmp_path) -> None:
    with pytest.raises(
        UnsupportedModelError, match=r"model\.source: open_clip.*'digits_vit' \(source builtin\)"
    ) as info:
        Flyp().prepare(copy.deepcopy(digits_prepared.model), digits_prepared.ctx)
    assert "\n" not in str(info.value)
    logs: list[str] = []
    results = run_demo(
        tmp_path, methods=["flyp", "zeroshot"], epochs=1, progress=False, log=logs.append, model="digits_vit"
    )
    assert list(results["methods"]) == ["zeroshot"]
    assert any(line.startswith("flyp: skipped (needs a CLIP-style model with a text tower") for line in logs)
