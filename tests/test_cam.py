"""The CAM module: attention capture, gradient-weighted rollout, patch masks and refilling."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer as OpenClipViT
from torch import nn

from robustft.backbones.class_token import class_token_logits
from robustft.cam import (
    attention_rollout_cam,
    capture_attention,
    class_activation,
    context_mask,
    gradient_rollout,
    has_train_mode_randomness,
    multi_fill_donors,
    object_mask,
    patch_layout,
    patchify,
    random_mask,
    refill,
    single_fill_donors,
    unpatchify,
)


def _digit_batch(prepared, split: str = "id_test", n: int = 64):
    dataset = prepared.ctx.splits[split]
    images, labels = dataset[list(range(n))]
    raw = dataset.images[:n].float() / 255.0
    background = raw[:, :, :1, :1]  # every digits-shift image has background in its corner
    digit = ((raw - background).abs().amax(dim=1) > 0.3).float()
    return images, labels, F.avg_pool2d(digit[:, None], 4)[:, 0]  # fraction of digit pixels per 4x4 patch


def _mass_inside(cam: torch.Tensor, digit_fraction: torch.Tensor) -> torch.Tensor:
    return (cam * digit_fraction).sum(dim=(1, 2)) / cam.sum(dim=(1, 2))


@pytest.mark.parametrize("split", ["id_test", "ood_color"])
def test_cam_puts_its_mass_on_the_digit(digits_prepared, split):
    images, labels, digit_fraction = _digit_batch(digits_prepared, split)
    cam = attention_rollout_cam(digits_prepared.model, images, labels)
    assert cam.shape == (64, 8, 8)
    assert torch.allclose(cam.amax(dim=(1, 2)), torch.ones(64), atol=1e-4) and cam.min() >= 0
    random_map = torch.rand(cam.shape, generator=torch.Generator().manual_seed(0))
    inside, chance = _mass_inside(cam, digit_fraction), _mass_inside(random_map, digit_fraction)
    assert inside.mean() > 2 * chance.mean()
    assert (inside > chance).float().mean() > 0.9


def test_cam_restores_the_attention_path_and_leaves_grads_alone(digits_prepared):
    model = copy.deepcopy(digits_prepared.model).train()
    images, labels, _ = _digit_batch(digits_prepared, n=8)
    with torch.no_grad():
        before = model(images)
    fused = [block.attn.fused_attn for block in model.backbone.blocks]
    class_activation(model, images, labels)
    with torch.no_grad():
        after = model(images)
    assert torch.equal(before, after)
    assert [block.attn.fused_attn for block in model.backbone.blocks] == fused
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("frozen", ["everything", "backbone"])
def test_cam_of_a_model_whose_attention_has_no_trained_weight(digits_prepared, frozen):
    """A graph to the attention exists (the input requires grad) when nothing upstream of it trains, also when the
    forward's graph is kept for a loss on the logits; the CAM equals the fully trainable model's."""
    model = copy.deepcopy(digits_prepared.model)
    images, labels, _ = _digit_batch(digits_prepared, n=8)
    reference = class_activation(model, images, labels, keep_graph=True).cam
    (model if frozen == "everything" else model.backbone).requires_grad_(False)
    cam, logits = class_activation(model, images, labels, keep_graph=True)
    torch.testing.assert_close(cam, reference)
    assert logits.requires_grad


def test_capture_restores_the_model_after_an_error(digits_prepared):
    model = copy.deepcopy(digits_prepared.model)
    with pytest.raises(RuntimeError, match="boom"), capture_attention(model):
        assert not any(block.attn.fused_attn for block in model.backbone.blocks)
        raise RuntimeError("boom")
    assert all(block.attn.fused_attn for block in model.backbone.blocks)
    assert all(not m._forward_hooks for m in model.modules())


def test_captured_timm_attention_is_the_softmax_the_output_uses(digits_prepared):
    model = copy.deepcopy(digits_prepared.model).eval()
    images, _, _ = _digit_batch(digits_prepared, n=4)
    with capture_attention(model) as capture:
        logits = model(images)
    attentions = capture.per_head(capture.tensors)
    assert len(attentions) == 6 and attentions[0].shape == (4, 4, 65, 65)
    assert torch.allclose(attentions[0].sum(-1), torch.ones(4, 4, 65), atol=1e-5)
    grads = torch.autograd.grad(logits[:, 0].sum(), capture.tensors)
    assert all(g.abs().sum() > 0 for g in grads)


def test_multihead_capture_gives_the_true_attention_gradient():
    """OpenCLIP's default block uses nn.MultiheadAttention: check capture against a hand-written attention."""
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    x = torch.randn(3, 5, 16)
    readout = torch.randn(3, 5, 16)
    with capture_attention(attention) as capture:
        out = attention(x, x, x, need_weights=False)[0]
    grad = capture.per_head(torch.autograd.grad((out * readout).sum(), capture.tensors))[0]

    q, k, v = F.linear(x, attention.in_proj_weight, attention.in_proj_bias).chunk(3, dim=-1)
    heads = [t.reshape(3, 5, 2, 8).transpose(1, 2) for t in (q, k, v)]
    probs = (heads[0] @ heads[1].transpose(-1, -2) / 8**0.5).softmax(-1)
    probs.retain_grad()
    manual = attention.out_proj((probs @ heads[2]).transpose(1, 2).reshape(3, 5, 16))
    (manual * readout).sum().backward()
    assert torch.allclose(out, manual, atol=1e-5)
    assert torch.allclose(capture.per_head(capture.tensors)[0], probs, atol=1e-5)
    assert torch.allclose(grad, probs.grad, atol=1e-5)
    assert not attention._forward_hooks and not attention._forward_pre_hooks


def test_open_clip_vit_cam():
    torch.manual_seed(0)
    model = OpenClipViT(image_size=32, patch_size=8, width=64, layers=2, heads=2, mlp_ratio=4.0, output_dim=10)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    assert patch_layout(model).patch_size == (8, 8) and patch_layout(model).num_prefix_tokens == 1
    with torch.no_grad():
        before = model(images)
    cam = attention_rollout_cam(model, images, labels)
    with torch.no_grad():
        assert torch.equal(model(images), before)
    assert cam.shape == (4, 4, 4) and torch.allclose(cam.amax(dim=(1, 2)), torch.ones(4), atol=1e-4)


def test_layout_needs_a_class_token_classifier():
    pooled = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, global_pool="avg")
    with pytest.raises(ValueError, match="class token"):
        patch_layout(pooled)
    with pytest.raises(ValueError, match="no timm or OpenCLIP"):
        patch_layout(nn.Linear(2, 2))


def test_rollout_of_uniform_attention_is_uniform_over_patches():
    attention = torch.full((1, 2, 5, 5), 0.2)
    relevance = gradient_rollout([attention, attention], [torch.ones_like(attention)] * 2)
    assert torch.allclose(relevance[0, 0, 1:], relevance[0, 0, 1:].mean().expand(4))
    negative = gradient_rollout([attention], [-torch.ones_like(attention)])
    assert torch.equal(negative[0], torch.eye(5))  # clamp(min=0) drops negative evidence


def test_object_and_context_masks_are_complements():
    cam = torch.rand(8, 6, 6, generator=torch.Generator().manual_seed(0))
    cam[0, 0, 0] = 0.3
    obj, ctx = object_mask(cam, 0.3), context_mask(cam, 0.3)
    assert torch.equal(obj ^ ctx, torch.ones_like(obj)) and not (obj & ctx).any()
    assert not obj[0, 0, 0]  # strict: cam == threshold is context
    assert torch.equal(obj, cam > 0.3)


def test_random_mask_rate():
    mask = random_mask((64, 8, 8), 0.25, generator=torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and abs(mask.float().mean().item() - 0.25) < 0.03


def test_patchify_roundtrip_and_patch_order():
    images = torch.arange(2 * 3 * 8 * 12, dtype=torch.float32).reshape(2, 3, 8, 12)
    patches = patchify(images, (4, 4))
    assert patches.shape == (2, 2, 3, 3, 4, 4)
    assert torch.equal(patches[1, 1, 2], images[1, :, 4:8, 8:12])
    assert torch.equal(unpatchify(patches), images)


def _batch(n: int = 6):
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, 16, 16, generator=generator)
    mask = torch.rand(n, 4, 4, generator=generator) < 0.5
    return images, mask, generator


def test_single_fill_takes_every_patch_from_exactly_one_other_image():
    images, mask, generator = _batch()
    out, source = refill(images, mask, "single", (4, 4), generator=generator)
    patches, new = patchify(images, (4, 4)), patchify(out, (4, 4))
    donors = []
    for b in range(len(images)):
        taken = source[b][mask[b]].unique()
        assert taken.numel() == 1 and taken.item() != b
        donors.append(taken.item())
        assert torch.equal(new[b][mask[b]], patches[taken.item()][mask[b]])
        assert torch.equal(new[b][~mask[b]], patches[b][~mask[b]])
        assert torch.equal(source[b][~mask[b]], torch.full_like(source[b][~mask[b]], b))
    assert sorted(donors) == list(range(len(images)))  # a permutation: every image donates once


def test_single_fill_donors():
    for seed in range(20):
        donors = single_fill_donors(5, generator=torch.Generator().manual_seed(seed))
        assert sorted(donors.tolist()) == list(range(5)) and (donors != torch.arange(5)).all()
    official = [single_fill_donors(3, True, generator=torch.Generator().manual_seed(s)) for s in range(30)]
    assert any((d == torch.arange(3)).any() for d in official)  # the official permutation can map to itself
    assert single_fill_donors(1).tolist() == [0]


def test_multi_fill_takes_each_patch_from_a_random_other_image():
    images, mask, generator = _batch(5)
    out, source = refill(images, mask, "multi", (4, 4), generator=generator)
    patches, new = patchify(images, (4, 4)), patchify(out, (4, 4))
    own = torch.arange(5).view(-1, 1, 1).expand_as(mask)
    assert (source[mask] != own[mask]).all() and torch.equal(source[~mask], own[~mask])
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    assert torch.equal(new, patches[source, rows, cols])
    assert any(source[b][mask[b]].unique().numel() > 1 for b in range(5))
    assert (multi_fill_donors((50, 4, 4), generator=generator) != torch.arange(50).view(-1, 1, 1)).all()


def test_no_fill_blanks_the_masked_patches():
    images, mask, _ = _batch()
    out, source = refill(images, mask, "none", (4, 4))
    new = patchify(out, (4, 4))
    assert (new[mask] == 0).all() and torch.equal(new[~mask], patchify(images, (4, 4))[~mask])
    assert (source[mask] == -1).all()


def test_train_mode_randomness_detection():
    quiet = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1)
    assert not has_train_mode_randomness(quiet)
    assert has_train_mode_randomness(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, drop_rate=0.1))
    assert has_train_mode_randomness(
        timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, drop_path_rate=0.1)
    )


def _full_forward_cam(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CAM through the model's own forward and the full ``L x L`` rollout (the path before the class-token one)."""
    rows, cols = patch_layout(model).grid(images)
    with torch.enable_grad(), capture_attention(model) as capture:
        logits = model(images)
        gradients = torch.autograd.grad(logits.gather(1, labels.view(-1, 1)).sum(), capture.tensors)
    relevance = gradient_rollout(capture.per_head([t.detach() for t in capture.tensors]), capture.per_head(gradients))
    cam = relevance[:, 0, 1:].reshape(-1, rows, cols)
    return cam / (cam.amax(dim=(1, 2), keepdim=True) + 1e-8), logits


def _open_clip_classifier() -> nn.Module:
    from robustft.backbones.classifier import ImageClassifier
    from robustft.backbones.open_clip_backbone import OpenClipImageEncoder

    torch.manual_seed(0)
    visual = OpenClipViT(image_size=32, patch_size=8, width=64, layers=2, heads=2, mlp_ratio=4.0, output_dim=10)
    return ImageClassifier(OpenClipImageEncoder(visual), nn.Linear(10, 4), normalize_features=True)


@pytest.mark.parametrize("kind", ["timm", "open_clip"])
def test_class_token_cam_equals_the_full_forward_cam(digits_prepared, kind):
    """The last block on the class token alone and the one-row rollout give the same CAM and logits (to ~1e-5)."""
    if kind == "timm":
        model = copy.deepcopy(digits_prepared.model).eval()
        images, labels, _ = _digit_batch(digits_prepared, n=16)
    else:
        model = _open_clip_classifier().eval()
        images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    expected_cam, expected_logits = _full_forward_cam(model, images, labels)
    cam, logits = class_activation(model, images, labels)
    torch.testing.assert_close(cam, expected_cam, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, expected_logits.detach(), atol=1e-5, rtol=1e-5)
    with capture_attention(model) as capture:
        class_token_logits(model, images)
    assert capture.shapes[-1][-2] == 1 and capture.shapes[0][-2] == capture.shapes[0][-1]  # last block: CLS row
