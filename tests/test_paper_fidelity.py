"""The computations that follow the official code: VRF in a split's class space, GMixout evaluating W,
Mixout's official gradient, token-dropping no-fill and single-fill's self-donors (docs/methods.md)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer as OpenClipViT
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.data import TensorDataset

from robustft.backbones.classifier import ImageClassifier
from robustft.backbones.open_clip_backbone import OpenClipImageEncoder
from robustft.cam import embedding_without_patches, kept_token_mask, random_mask_exact, single_fill_donors
from robustft.class_spaces import declare, max_over_groups, subset
from robustft.evaluate import predict_in_class_space
from robustft.methods.base import RunContext
from robustft.methods.gmixout import GMixout, GMixoutConfig
from robustft.methods.mixout import MixoutConfig, apply_mixout, sample_mask
from robustft.methods.vrf import VrfPredictor, sample_weight, vrf_log_probs

CPU = torch.device("cpu")


def quiet(message: str) -> None:
    pass


# ------------------------------------------------------------------------------------------------ VRF


def linear_classifier(seed: int, classes: int = 1000, dim: int = 8) -> ImageClassifier:
    torch.manual_seed(seed)
    head = nn.Linear(dim, classes)
    with torch.no_grad():
        head.weight.mul_(8.0)
    return ImageClassifier(nn.Linear(16, dim), head, normalize_features=True)


def vrf_case(samples: int = 400):
    """A VRF predictor over 1000 classes whose weights w(x) spread over (0, 1), and its inputs."""
    zero_shot, finetuned = linear_classifier(0), linear_classifier(1)
    inputs = torch.randn(samples, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        members = F.normalize(finetuned.backbone(inputs[:60] + 0.3 * torch.randn(60, 16)), dim=-1)
    predictor = VrfPredictor(zero_shot, finetuned, members, k=3, a=0.8, b=0.4, temperature_finetuned=0.7,
                             temperature_zero_shot=1.4)  # fmt: skip
    return predictor, inputs


def restrict_first(predictor: VrfPredictor, inputs: torch.Tensor, space) -> torch.Tensor:
    """The official computation: each model's logits in the split's classes, then softmax, then the mixture."""
    with torch.no_grad():
        embedding = F.normalize(predictor.finetuned.backbone(inputs), dim=-1)
        weight = sample_weight(predictor.distance(embedding), predictor.a, predictor.b)[:, None]
        finetuned = F.softmax(space.apply(predictor.finetuned(inputs)) / predictor.temperature_finetuned, -1)
        zero_shot = F.softmax(space.apply(predictor.zero_shot(inputs)) / predictor.temperature_zero_shot, -1)
    return weight * finetuned + (1 - weight) * zero_shot


SPACES = {
    "subset_200": subset(sorted(torch.randperm(1000, generator=torch.Generator().manual_seed(3))[:200].tolist())),
    "groups_113": max_over_groups([list(range(i * 8, i * 8 + 1 + i % 5)) for i in range(113)]),
}


@pytest.mark.parametrize("space_name", list(SPACES))
def test_vrf_mixes_in_the_splits_class_space_as_the_official_code(space_name):
    space = SPACES[space_name]
    predictor, inputs = vrf_case()
    labels = torch.randint(0, space.num_classes, (len(inputs),))
    split = declare(TensorDataset(inputs, labels), class_space=space)
    log_probs, _ = predict_in_class_space(predictor, split, CPU, batch_size=128)
    expected = restrict_first(predictor, inputs, space)
    assert log_probs.shape == (len(inputs), space.num_classes)
    assert torch.equal(log_probs.argmax(1), expected.argmax(1))
    torch.testing.assert_close(log_probs.exp(), expected, atol=1e-6, rtol=0)
    assert predictor.class_space.kind == "identity"  # restored after the split

    # The former computation (mix over all 1000 classes, restrict afterwards) predicts otherwise here.
    with torch.no_grad():
        embedding = F.normalize(predictor.finetuned.backbone(inputs), dim=-1)
        mixed_then_restricted = space.apply(
            vrf_log_probs(predictor.finetuned(inputs), predictor.zero_shot(inputs), predictor.distance(embedding),
                          predictor.a, predictor.b, predictor.temperature_finetuned, predictor.temperature_zero_shot)
        )  # fmt: skip
    disagreement = (mixed_then_restricted.argmax(1) != expected.argmax(1)).float().mean().item()
    print(f"vrf {space_name}: former computation disagrees on {disagreement:.1%} of samples, now 0")
    assert disagreement > 0


def test_vrf_on_an_identity_split_is_unchanged():
    predictor, inputs = vrf_case(64)
    split = TensorDataset(inputs, torch.zeros(64, dtype=torch.long))
    log_probs, _ = predict_in_class_space(predictor, split, CPU)
    with torch.no_grad():
        assert torch.equal(log_probs, predictor(inputs))
    assert log_probs.shape == (64, 1000)


# -------------------------------------------------------------------------------------------- GMixout


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def gmixout_prepared(tmp_path, **options):
    method = GMixout(GMixoutConfig(**options))
    ctx = RunContext(tmp_path, CPU, 0, {}, [], log=quiet)
    return method.prepare(Tiny(), ctx), method


def train(model, method, steps: int) -> None:
    optimizer = torch.optim.SGD(method.parameter_groups(model, 0.0), lr=0.5)
    method.bind_optimizer(optimizer)
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(2))
    model.train()
    for step in range(steps):
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_step(model, step)


def test_gmixout_in_eval_mode_computes_w_mid_run_from_a_checkpoint_and_after_finalize(tmp_path):
    model, method = gmixout_prepared(tmp_path, p=0.5, k=4, ema=0.3)
    train(model, method, steps=6)  # mid-episode: values not yet written back into W
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        sub_network = model.train()(x)  # Phi = A + c M (W - A), what eval mode used to compute
        evaluated = model.eval()(x)
    fresh, _ = gmixout_prepared(tmp_path / "reload", p=0.5, k=4, ema=0.3)
    fresh.load_state_dict(model.state_dict())  # what last.pt holds
    with torch.no_grad():
        from_checkpoint = fresh.eval()(x)
        assert torch.equal(model.train()(x), sub_network)  # training still computes the sub-network
        plain_w = method.finalize(model, None)(x)  # merge_sparse: a plain model holding W
    assert not any("parametrizations" in name for name, _ in model.named_parameters())
    torch.testing.assert_close(evaluated, plain_w, atol=0, rtol=0)
    torch.testing.assert_close(from_checkpoint, plain_w, atol=0, rtol=0)
    former_difference = (sub_network - plain_w).abs().max().item()
    print(f"gmixout: eval logits - W logits, max |diff| {former_difference:.4f} before, 0 now")
    assert former_difference > 1e-3


# --------------------------------------------------------------------------------------------- Mixout


def test_mixout_paper_preset_backpropagates_grad_times_mask():
    config = MixoutConfig(preset="paper")
    assert config.gradient == "official"
    torch.manual_seed(0)
    layer = nn.Linear(40, 4)
    apply_mixout(layer, ["weight"], config.p, config.granularity, config.gradient == "official")
    weight, anchor = layer.parametrizations.weight.original, layer.parametrizations.weight[0].anchor
    x, upstream = torch.randn(5, 40), torch.randn(5, 4)
    torch.manual_seed(7)
    (layer(x) * upstream).sum().backward()
    torch.manual_seed(7)
    mask = sample_mask(weight.shape, 1 - config.p, config.granularity, weight)  # the mask that forward drew
    mixed = (anchor + mask * (weight.detach() - anchor) / (1 - config.p)).requires_grad_(True)
    (F.linear(x, mixed, layer.bias) * upstream).sum().backward()  # grad = dL/dW~
    torch.testing.assert_close(weight.grad, mask * mixed.grad)
    assert 0 < mask.sum() < mask.numel() and (weight.grad[:, mask[0] == 0] == 0).all()


# ------------------------------------------------------------------------------ masked counterfactuals


@pytest.mark.parametrize("rate", [0.75, 0.5, 0.3])
def test_random_no_fill_keeps_exactly_int_p_times_one_minus_rate_tokens(rate):
    mask = random_mask_exact((32, 7, 7), rate, generator=torch.Generator().manual_seed(0))
    kept = (~mask).flatten(1).sum(1)
    assert (kept == int(49 * (1 - rate))).all()
    assert mask.float().mean(0).std() > 0  # different patches per image


def timm_classifier() -> ImageClassifier:
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    return ImageClassifier(vit, nn.Linear(32, 5)).eval()


def open_clip_classifier() -> ImageClassifier:
    torch.manual_seed(0)
    visual = OpenClipViT(image_size=16, patch_size=4, width=32, layers=2, heads=2, mlp_ratio=2.0, output_dim=12)
    return ImageClassifier(OpenClipImageEncoder(visual), nn.Linear(12, 5), normalize_features=True).eval()


def embedding_of_kept_tokens(model: ImageClassifier, images: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """Reference: each image run alone on the sequence of its kept tokens (the tokens really removed)."""
    keep = kept_token_mask(dropped, 1)
    rows = []
    for i in range(len(images)):
        backbone = model.backbone
        if isinstance(backbone, VisionTransformer):
            tokens = backbone.norm_pre(backbone._pos_embed(backbone.patch_embed(images[i : i + 1])))
            tokens = backbone.norm(backbone.blocks(tokens[:, keep[i]]))
            rows.append(backbone.forward_head(tokens, pre_logits=True))
        else:
            visual = backbone.visual
            tokens = visual.transformer(visual._embeds(images[i : i + 1])[:, keep[i]])
            rows.append(visual._pool(tokens)[0] @ visual.proj)
    return torch.cat(rows)


@pytest.mark.parametrize("build", [timm_classifier, open_clip_classifier], ids=["timm", "open_clip"])
def test_token_dropping_no_fill_equals_removing_the_masked_tokens(build):
    model = build()
    images = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    dropped = torch.rand(6, 4, 4, generator=torch.Generator().manual_seed(2)) < 0.5  # ragged, as object masks
    dropped[0] = False
    with torch.no_grad():
        found = embedding_without_patches(model, images, dropped)
        expected = embedding_of_kept_tokens(model, images, dropped)
        blanked = model.image_embedding(
            images.masked_fill(dropped.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None], 0)
        )
    torch.testing.assert_close(found, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(found[0], model.image_embedding(images[:1])[0], atol=1e-5, rtol=1e-5)
    assert (found[1:] - blanked[1:]).abs().max() > 1e-3  # blanking pixels is a different input


def test_self_fill_allowed_lets_an_image_be_its_own_donor():
    generator = torch.Generator().manual_seed(0)
    allowed = torch.stack([single_fill_donors(4, True, generator=generator) for _ in range(200)])
    derangement = torch.stack([single_fill_donors(4, False, generator=generator) for _ in range(200)])
    own = torch.arange(4)
    assert (allowed == own).any() and not (derangement == own).any()
    assert all(sorted(row.tolist()) == [0, 1, 2, 3] for row in allowed)  # a permutation of the batch


def test_paper_no_fill_distils_the_embeddings_of_the_kept_tokens(tmp_path):
    from robustft.cam import make_counterfactuals, patch_layout
    from robustft.methods.masked_counterfactual import MaskedCounterfactual, MaskedCounterfactualConfig

    config = MaskedCounterfactualConfig(preset="paper", variant="rand_mask_no_fill")
    method = MaskedCounterfactual(config)
    student = method.prepare(timm_classifier().train(), RunContext(tmp_path, CPU, 0, {}, [], log=quiet))
    with torch.no_grad():  # the student moves away from the teacher, so the distillation term is not zero
        student.backbone.blocks[0].mlp.fc1.weight.add_(0.05)
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(3)
    _, logs = method.loss(student, (images, labels), 0)
    torch.manual_seed(3)
    made = make_counterfactuals(student, images, labels, config.spec(), patch_layout(student))
    assert ((~made.mask).flatten(1).sum(1) == int(16 * (1 - 0.75))).all()
    with torch.no_grad():
        expected = F.mse_loss(
            embedding_without_patches(student, images, made.mask),
            embedding_without_patches(method.teacher, images, made.mask),
        )
    torch.testing.assert_close(logs["loss_distill"], expected)
    assert expected > 0
