"""L2-SP (Li et al., ICML 2018): the penalty's gradient, what is anchored, and that it holds the backbone near W0."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from robustft.backbones.checkpoint_files import load_state_dict_file
from robustft.demo import demo_config
from robustft.methods.l2_sp import L2Sp, L2SpConfig, l2_sp_penalty
from robustft.runner import FINAL_CHECKPOINT, fit


def quiet(message: str) -> None:
    pass


def test_penalty_gradient_is_alpha_times_distance_and_beta_times_head() -> None:
    generator = torch.Generator().manual_seed(0)
    anchors = [torch.randn(4, 3, generator=generator), torch.randn(5, generator=generator)]
    weights = [(a + torch.randn(a.shape, generator=generator)).requires_grad_() for a in anchors]
    head = torch.randn(2, 3, generator=generator, requires_grad=True)
    alpha, beta = 0.3, 0.05
    penalty = l2_sp_penalty(weights, anchors, [head], alpha, beta)
    penalty.backward()
    for weight, anchor in zip(weights, anchors, strict=True):
        torch.testing.assert_close(weight.grad, alpha * (weight.detach() - anchor))
    torch.testing.assert_close(head.grad, beta * head.detach())
    by_hand = alpha / 2 * sum(((w - a) ** 2).sum() for w, a in zip(weights, anchors, strict=True))
    torch.testing.assert_close(penalty, by_hand + beta / 2 * (head**2).sum())
    # At W = W0 the anchored part is exactly zero and its gradient is zero, not NaN.
    at_anchor = [a.clone().requires_grad_() for a in anchors]
    l2_sp_penalty(at_anchor, anchors, [], alpha, beta).backward()
    assert all(torch.equal(w.grad, torch.zeros_like(w)) for w in at_anchor)


def test_prepare_anchors_backbone_shrinks_head_and_drops_weight_decay(digits_prepared) -> None:
    model = copy.deepcopy(digits_prepared.model)
    method = L2Sp(L2SpConfig(alpha=0.5, beta=0.2))
    method.prepare(model, digits_prepared.ctx)
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    assert len(method.anchored) == len(backbone) and method.shrunk == [model.head.weight, model.head.bias]
    assert all(a.data_ptr() != p.data_ptr() for a, p in zip(method.anchors, method.anchored, strict=True))
    groups = method.parameter_groups(model, weight_decay=0.1)
    assert [group["weight_decay"] for group in groups] == [0.0]
    assert sum(p.numel() for p in groups[0]["params"]) == sum(p.numel() for p in model.parameters())
    assert set(model.state_dict()) == set(digits_prepared.model.state_dict())  # W0 is not in the predictor

    images, labels = next(digits_prepared.ctx.iterate("train", batch_size=16))
    loss, logs = method.loss(model, (images, labels), step=0)
    head_penalty = 0.2 / 2 * (model.head.weight.square().sum() + model.head.bias.square().sum())
    torch.testing.assert_close(loss, F.cross_entropy(model(images), labels) + head_penalty)  # W = W0: no pull yet
    assert float(logs["l2_sp_penalty"]) == pytest.approx(float(head_penalty.detach()))
    anchored_head = L2Sp(L2SpConfig(anchor_head=True))
    anchored_head.prepare(model, digits_prepared.ctx)
    assert anchored_head.shrunk == [] and len(anchored_head.anchored) == len(backbone) + 2


def backbone_distance(run_dir, start: dict[str, torch.Tensor]) -> float:
    final = load_state_dict_file(run_dir / FINAL_CHECKPOINT)
    return sum(
        float((final[key] - value).square().sum()) for key, value in start.items() if key.startswith("backbone.")
    )


def test_l2_sp_keeps_the_backbone_closer_to_w0_than_finetune(digits_prepared, tmp_path) -> None:
    start = {key: value.detach().clone() for key, value in digits_prepared.model.state_dict().items()}
    sgd = {"name": "sgd", "lr": 0.05, "warmup_fraction": 0.0}
    distances = {}
    for method, options in (("finetune", {}), ("l2_sp", {"alpha": 10.0})):
        config = demo_config(method, 0, tmp_path, method_options=options, optim=sgd, steps=6, progress=False)
        fit(config, log=quiet, prepared=digits_prepared)
        distances[method] = backbone_distance(config.run_dir, start)
    assert 0 < distances["l2_sp"] < 0.5 * distances["finetune"]
