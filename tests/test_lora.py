"""LoRA (Hu et al., ICLR 2022): identity at init, exact merge, only adapters and head train, small adapter file."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from robustft.adapters import (
    ADAPTER_FILE,
    LoRALinear,
    apply_adapter,
    inject_lora,
    load_adapter,
    lora_layers,
    merge_lora,
)
from robustft.backbones.checkpoint_files import load_state_dict_file
from robustft.demo import demo_config
from robustft.errors import ConfigError
from robustft.runner import FINAL_CHECKPOINT, fit


def quiet(message: str) -> None:
    pass


def images(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def adapted(digits_prepared, **options) -> nn.Module:
    model = copy.deepcopy(digits_prepared.model).eval()
    inject_lora(model, options.pop("targets", (r"attn\.qkv$", r"attn\.proj$")), rank=4, alpha=8.0, **options)
    return model


def test_fused_layer_computes_w_x_plus_scaled_b_a_x():
    torch.manual_seed(0)
    base = nn.Linear(12, 20)
    layer = LoRALinear(base, rank=3, alpha=6.0)
    assert layer.weight is base.weight and layer.bias is base.bias  # shared, not copied
    nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 5, 12)
    expected = base(x) + 2.0 * x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.merged()(x), expected, rtol=1e-5, atol=1e-5)


def test_at_init_the_adapted_model_is_the_pretrained_model(digits_prepared):
    model = adapted(digits_prepared)
    layers = lora_layers(model)
    assert sorted(layers) == sorted(f"backbone.blocks.{i}.attn.{kind}" for i in range(6) for kind in ("qkv", "proj"))
    assert all(torch.count_nonzero(layer.lora_B) == 0 and layer.lora_A.abs().sum() > 0 for layer in layers.values())
    with torch.no_grad():
        torch.testing.assert_close(model(images()), digits_prepared.model.eval()(images()), rtol=0, atol=1e-6)


def test_merge_gives_a_plain_model_with_the_adapted_outputs(digits_prepared):
    model = adapted(digits_prepared)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(std=0.05)
        adapted_logits = model(images())
        assert not torch.allclose(adapted_logits, digits_prepared.model.eval()(images()), atol=1e-3)
        merged = merge_lora(model)
        assert not lora_layers(merged)
        assert type(merged.backbone.blocks[0].attn.qkv) is nn.Linear
        assert merged.state_dict().keys() == digits_prepared.model.state_dict().keys()
        torch.testing.assert_close(merged(images()), adapted_logits, rtol=1e-4, atol=1e-4)


def test_training_changes_only_adapters_and_head_and_the_adapter_file_rebuilds_the_run(digits_prepared, tmp_path):
    config = demo_config("lora", 0, tmp_path, steps=3, progress=False, optim={"lr": 1e-2})
    entry = fit(config, log=quiet, prepared=digits_prepared)["methods"]["lora"]
    assert entry["adapter_params"] == 6 * (8 * (128 + 384) + 8 * (128 + 128))  # rank 8 on qkv and proj
    assert entry["trainable_params"] == entry["adapter_params"] + 128 * 10 + 10  # + the head
    final = load_state_dict_file(tmp_path / "lora" / FINAL_CHECKPOINT)
    start = digits_prepared.model.state_dict()
    assert final.keys() == start.keys()  # a plain model of the run's architecture
    state, meta = load_adapter(tmp_path / "lora" / ADAPTER_FILE)
    assert meta["rank"] == 8 and meta["include"] == ["head"] and len(meta["layers"]) == 12
    assert sum(t.numel() for t in state.values()) == entry["trainable_params"]  # the small file: adapters + head
    for key, value in final.items():
        layer = key.rpartition(".")[0]
        if key.startswith("head."):
            assert not torch.equal(value, start[key])
        elif key.endswith(".weight") and layer in meta["layers"]:
            delta = (meta["alpha"] / meta["rank"]) * state[f"{layer}.lora_B"] @ state[f"{layer}.lora_A"]
            assert delta.abs().max() > 0
            torch.testing.assert_close(value, start[key] + delta, rtol=0, atol=1e-6)
        else:
            assert torch.equal(value, start[key]), key  # frozen: bit-identical
    rebuilt = apply_adapter(copy.deepcopy(digits_prepared.model), tmp_path / "lora" / ADAPTER_FILE, merge=True)
    for key, value in rebuilt.state_dict().items():
        torch.testing.assert_close(value, final[key], rtol=0, atol=1e-6)


def test_a_pattern_matching_nothing_is_a_config_error(digits_prepared, tmp_path):
    config = demo_config("lora", 0, tmp_path, steps=1, progress=False, method_options={"target_modules": ["nope$"]})
    with pytest.raises(ConfigError, match=r"method.target_modules: no nn.Linear layer .*nope"):
        fit(config, log=quiet, prepared=digits_prepared)


class MultiheadBlock(nn.Module):
    """OpenCLIP's default residual block keeps its attention in nn.MultiheadAttention."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))


def test_multihead_attention_projections_are_targets_by_name():
    assert inject_lora(MultiheadBlock(), (r"attn\.(qkv|in_proj)$",), rank=2, alpha=2.0) == ["attn.in_proj"]
    assert inject_lora(MultiheadBlock(), (r"out_proj$",), rank=2, alpha=2.0) == ["attn.out_proj"]
    assert inject_lora(MultiheadBlock(), (r"mlp\.0$",), rank=2, alpha=2.0) == ["mlp.0"]
    with pytest.raises(ConfigError, match=r"no nn.Linear layer or attention projection .*attn.in_proj, attn.out_proj"):
        inject_lora(MultiheadBlock(), (r"attn\.qkv$",), rank=2, alpha=2.0)
