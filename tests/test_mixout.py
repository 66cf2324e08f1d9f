"""Mixout (Lee et al., ICLR 2020): unbiased mixing, masked gradients, eval uses W, plain model after."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from robustft.backbones.checkpoint_files import load_state_dict_file
from robustft.demo import demo_config
from robustft.methods.mixout import (
    MixoutParametrization,
    apply_mixout,
    mask_shape,
    mixout_weight,
    remove_mixout,
    sample_mask,
)
from robustft.runner import FINAL_CHECKPOINT, fit


def quiet(message: str) -> None:
    pass


def mixed_linear(p: float, granularity: str = "element") -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    anchor = layer.weight.detach().clone()
    apply_mixout(layer, ["weight"], p, granularity)
    with torch.no_grad():
        layer.parametrizations.weight.original.add_(torch.randn_like(anchor))  # training moved W away from W0
    return layer, anchor, layer.parametrizations.weight.original.detach().clone()


@pytest.mark.parametrize("granularity", ["element", "input", "output"])
def test_mean_of_sampled_weights_is_w(granularity):
    p, samples = 0.7, 4000
    layer, anchor, trained = mixed_linear(p, granularity)
    mean = torch.stack([layer.weight.detach() for _ in range(samples)]).mean(0)
    std_error = (trained - anchor).abs() * (p / (1 - p) / samples) ** 0.5
    assert ((mean - trained).abs() <= 5 * std_error + 1e-6).all()
    assert not torch.allclose(layer.weight.detach(), layer.weight.detach())  # a new mask each forward


def test_masked_coordinates_get_zero_gradient():
    torch.manual_seed(1)
    weight, anchor = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6)
    mask, p = sample_mask(weight.shape, 0.5, "input", weight), 0.5
    upstream = torch.randn(4, 6)
    (mixout_weight(weight, anchor, mask, p) * upstream).sum().backward()
    assert torch.equal(weight.grad == 0, (mask == 0).expand(4, 6))
    torch.testing.assert_close(weight.grad, mask * upstream / (1 - p))
    weight.grad = None
    official = mixout_weight(weight, anchor, mask, p, official_gradient=True)
    torch.testing.assert_close(official, mixout_weight(weight, anchor, mask, p))
    (official * upstream).sum().backward()
    torch.testing.assert_close(weight.grad, mask * upstream)  # bloodwass/mixout's backward: (1-p) x smaller


def test_input_granularity_shares_the_mask_across_output_rows():
    assert mask_shape(torch.Size([4, 6]), "input") == (1, 6)
    assert mask_shape(torch.Size([4, 6]), "output") == (4, 1)
    assert mask_shape(torch.Size([6]), "input") == (6,)
    layer, anchor, trained = mixed_linear(0.5, "input")
    weight = layer.weight.detach()
    kept = ~torch.isclose(weight, anchor)
    assert torch.equal(kept, kept[:1].expand_as(kept))  # whole columns kept or mixed out


def test_eval_uses_w_and_removal_leaves_the_trained_weights():
    layer, anchor, trained = mixed_linear(0.9)
    layer.eval()
    assert torch.equal(layer.weight, trained)
    layer.train()
    assert not torch.equal(layer.weight, trained)
    remove_mixout(layer)
    assert type(layer) is nn.Linear and torch.equal(layer.weight, trained)


def test_mixout_on_digits_mixes_backbone_linear_weights_and_saves_a_plain_model(digits_prepared, tmp_path):
    results = fit(demo_config("mixout", 0, tmp_path, steps=3, progress=False), log=quiet, prepared=digits_prepared)
    entry = results["methods"]["mixout"]
    linear = sum(m.weight.numel() for m in digits_prepared.model.backbone.modules() if isinstance(m, nn.Linear))
    assert entry["mixed_params"] == linear
    assert entry["trainable_params"] == sum(p.numel() for p in digits_prepared.model.parameters())
    assert entry["active_params"] < entry["trainable_params"]
    fresh = copy.deepcopy(digits_prepared.model)
    fresh.load_state_dict(load_state_dict_file(tmp_path / "mixout" / FINAL_CHECKPOINT), strict=True)


def test_mixout_only_wraps_the_chosen_tensors(digits_prepared):
    model = copy.deepcopy(digits_prepared.model)
    apply_mixout(model, ["backbone.blocks.0.mlp.fc1.weight"], 0.9)
    wrapped = [m for m in model.modules() if isinstance(m, MixoutParametrization)]
    assert len(wrapped) == 1
    assert not hasattr(model.backbone.blocks[0].mlp.fc1.parametrizations, "bias")


@pytest.mark.parametrize("method", ["mixout", "gmixout"])
def test_a_scope_matching_no_tensor_is_a_config_error(tmp_path, digits_prepared, method):
    from robustft.demo import demo_config
    from robustft.errors import ConfigError
    from robustft.runner import fit

    config = demo_config(method, 0, tmp_path, steps=1, progress=False)
    config.method.include = "^no_such_layer$"
    with pytest.raises(ConfigError, match="method.scope / method.include"):
        fit(config, log=lambda message: None, prepared=digits_prepared)
