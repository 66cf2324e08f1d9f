"""The class-token forward: a ViT's embedding with its last block run for the class token alone."""

from __future__ import annotations

import pytest
import timm
import torch
from open_clip.transformer import VisionTransformer as OpenClipViT
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from robustft.backbones.class_token import class_token_embedding, class_token_logits, class_token_path
from robustft.backbones.classifier import ImageClassifier
from robustft.backbones.open_clip_backbone import OpenClipImageEncoder
from robustft.cam import class_token_relevance, gradient_rollout


def timm_classifier(**options) -> ImageClassifier:
    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=0, qkv_bias=True, **options
    )
    return ImageClassifier(vit, nn.Linear(32, 5))


def open_clip_classifier() -> ImageClassifier:
    torch.manual_seed(0)
    visual = OpenClipViT(image_size=16, patch_size=4, width=32, layers=2, heads=2, mlp_ratio=2.0, output_dim=12)
    return ImageClassifier(OpenClipImageEncoder(visual), nn.Linear(12, 5), normalize_features=True)


IMAGES = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize(
    "build",
    [timm_classifier, lambda: timm_classifier(qk_norm=True, reg_tokens=2), open_clip_classifier],
    ids=["timm", "timm_qk_norm_registers", "open_clip"],
)
def test_class_token_forward_equals_the_full_forward(build, training):
    model = build().train(training)
    assert class_token_path(model) is not None
    embedding = class_token_embedding(model, IMAGES)
    torch.testing.assert_close(embedding, model.image_embedding(IMAGES), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(class_token_logits(model, IMAGES), model(IMAGES), atol=1e-5, rtol=1e-5)
    # the same gradients into every weight, the last block's included
    full = torch.autograd.grad(model.image_embedding(IMAGES).square().sum(), list(model.backbone.parameters()))
    ours = torch.autograd.grad(embedding.square().sum(), list(model.backbone.parameters()))
    for a, b in zip(full, ours, strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_adapted_qkv_is_called_as_a_module():
    """A layer that replaces ``qkv`` (an adapter) is called, not bypassed by the split query/key-value product."""
    model = timm_classifier().eval()
    calls = []
    last_qkv = model.backbone.blocks[-1].attn.qkv
    handle = last_qkv.register_forward_hook(lambda module, args, output: calls.append(output.shape))
    embedding = class_token_embedding(model, IMAGES)
    handle.remove()
    assert calls == [(6, 17, 96)]
    torch.testing.assert_close(embedding, model.image_embedding(IMAGES), atol=1e-5, rtol=1e-5)


def test_unsupported_models_fall_back_to_their_own_forward():
    vit = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=1, num_classes=0)
    pooled = ImageClassifier(vit, nn.Linear(192, 5))
    pooled.backbone.global_pool = "avg"
    hooked = timm_classifier()
    hooked.backbone.blocks[-1].register_forward_hook(lambda module, args, output: output * 2)
    checkpointed = timm_classifier()
    checkpointed.backbone.set_grad_checkpointing(True)
    adapted = open_clip_classifier()  # e.g. robustft.adapters.attention: a subclass that runs self-attention only
    adapted.backbone.visual.transformer.resblocks[-1].attn.__class__ = type("Adapted", (nn.MultiheadAttention,), {})
    for model in (pooled, hooked, checkpointed, adapted, nn.Sequential(nn.Flatten(), nn.Linear(768, 5))):
        assert class_token_path(model) is None
    for model in (pooled, hooked, checkpointed, adapted):
        model.eval()
        torch.testing.assert_close(class_token_embedding(model, IMAGES), model.image_embedding(IMAGES))
        torch.testing.assert_close(class_token_logits(model, IMAGES), model(IMAGES))


@pytest.mark.parametrize("last_rows", [9, 1], ids=["full_last_maps", "class_token_row"])
def test_class_token_relevance_is_the_first_row_of_the_rollout(last_rows):
    generator = torch.Generator().manual_seed(0)
    attentions = [torch.rand(3, 2, 9, 9, generator=generator).softmax(-1) for _ in range(4)]
    gradients = [torch.randn(3, 2, 9, 9, generator=generator) for _ in range(4)]
    expected = gradient_rollout(attentions, gradients)[:, 0]
    attentions[-1], gradients[-1] = attentions[-1][:, :, :last_rows], gradients[-1][:, :, :last_rows]
    torch.testing.assert_close(class_token_relevance(attentions, gradients), expected, atol=1e-5, rtol=1e-5)
