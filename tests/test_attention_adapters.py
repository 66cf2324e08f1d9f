"""Adapters on OpenCLIP's ``nn.MultiheadAttention``: the fused ``in_proj`` and ``out_proj`` are real targets.

A tiny random OpenCLIP ViT-B-32 (same block types as the real one, tiny widths) is built in-process; nothing
is downloaded. LoRA, mixture-of-adapters, Mixout, GMixout and SAFT reach the attention's projections, the
merged methods end as a plain ``nn.MultiheadAttention`` with the pretrained model's state-dict keys.
"""

from __future__ import annotations

import copy
import json

import open_clip
import pytest
import torch
from torch import nn

from bad_input_support import cli_error, tree_bytes, write_config
from robustft.adapters import (
    DEFAULT_LORA_TARGETS,
    AdaptedMultiheadAttention,
    LoRAExperts,
    LoRAUpdate,
    MixtureOfAdapters,
    MixtureUpdate,
    adapt_multihead,
    apply_adapter,
    inject_lora,
    inject_mixture,
    lora_layers,
    merge_lora,
    mixture_layers,
    restore_multihead,
    save_adapter,
)
from robustft.backbones.checkpoint_files import load_state_dict_file
from robustft.config import parse_config
from robustft.demo import demo_config
from robustft.errors import UnsupportedModelError
from robustft.layout import FINAL_CHECKPOINT
from robustft.runner import fit, prepare_run

TINY_VIT_B = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def visual() -> nn.Module:
    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-32", pretrained=None, **TINY_VIT_B).visual.eval()


def images(count: int = 3) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("batch_first", [True, False])
def test_adapted_attention_computes_what_multihead_attention_computes(batch_first):
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    adapted = adapt_multihead(copy.deepcopy(reference))
    assert isinstance(adapted, AdaptedMultiheadAttention) and adapted.in_proj is None
    assert adapted.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    per_head = torch.randn(2 * 4, 5, 5)
    for mask in (None, causal, per_head):
        for need_weights, average in ((False, True), (True, True), (True, False)):
            options = {"need_weights": need_weights, "attn_mask": mask, "average_attn_weights": average}
            expected, expected_weights = reference(x, x, x, **options)
            out, weights = adapted(x, x, x, **options)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
            if need_weights:
                torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-5)
    with pytest.raises(UnsupportedModelError, match="self-attention only"):
        adapted(x, x.clone(), x)
    restore_multihead(adapted)
    assert type(adapted) is nn.MultiheadAttention and not hasattr(adapted, "in_proj")


def test_cross_attention_geometry_is_refused_with_the_layer_named():
    class Pooler(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, kdim=4, vdim=4)

    with pytest.raises(UnsupportedModelError, match=r"attn.in_proj belongs to an nn.MultiheadAttention with separate"):
        inject_lora(Pooler(), (r"attn\.in_proj$",), rank=2, alpha=2.0)


def test_lora_reaches_the_fused_in_proj_and_out_proj_and_merges_to_the_plain_model(visual, tmp_path):
    model = copy.deepcopy(visual)
    names = inject_lora(model, DEFAULT_LORA_TARGETS, rank=4, alpha=8.0)
    assert names == [f"transformer.resblocks.{i}.attn.{kind}" for i in range(2) for kind in ("in_proj", "out_proj")]
    attention = model.transformer.resblocks[0].attn
    assert isinstance(attention.in_proj, LoRAUpdate) and attention.in_proj.lora_B.shape == (3 * 64, 4)
    with torch.no_grad():
        torch.testing.assert_close(model(images()), visual(images()), rtol=0, atol=1e-6)  # B = 0: the pretrained model
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(std=0.05)
    model(images()).sum().backward()
    assert all(layer.lora_A.grad.abs().sum() > 0 for layer in lora_layers(model).values())  # every update is used
    with torch.no_grad():
        adapted = model(images())
        assert not torch.allclose(adapted, visual(images()), atol=1e-3)
        update = attention.in_proj
        expected_in_proj = attention.in_proj_weight + update.scale * update.lora_B @ update.lora_A
    save_adapter(model, tmp_path / "adapter.safetensors")
    merged = merge_lora(model)
    assert type(merged.transformer.resblocks[0].attn) is nn.MultiheadAttention and not lora_layers(merged)
    assert merged.state_dict().keys() == visual.state_dict().keys()
    torch.testing.assert_close(merged.transformer.resblocks[0].attn.in_proj_weight, expected_in_proj)
    with torch.no_grad():
        torch.testing.assert_close(merged(images()), adapted, rtol=1e-4, atol=1e-4)
    rebuilt = apply_adapter(copy.deepcopy(visual), tmp_path / "adapter.safetensors", merge=True)
    for key, value in rebuilt.state_dict().items():
        torch.testing.assert_close(value, merged.state_dict()[key], rtol=0, atol=1e-6)


def test_the_in_proj_mixture_routes_like_the_linear_mixture():
    """``MixtureUpdate`` on a projection's output is ``MixtureOfAdapters`` of the same weights, token for token."""
    torch.manual_seed(0)
    base = nn.Linear(16, 48)
    torch.manual_seed(1)
    layer = MixtureOfAdapters(base, LoRAExperts(16, 48, (1, 2, 4)), 3, projection_dim=8).eval()
    torch.manual_seed(1)
    update = MixtureUpdate(16, 48, LoRAExperts(16, 48, (1, 2, 4)), 3, projection_dim=8).eval()
    assert layer.state_dict().keys() - {"weight", "bias"} == update.state_dict().keys()
    with torch.no_grad():
        layer.experts.lora_B.normal_()
        update.experts.lora_B.copy_(layer.experts.lora_B)
        x = torch.randn(2, 7, 16)
        torch.testing.assert_close(update(x, base(x)), layer(x))
        assert not torch.allclose(update(x, base(x)), base(x))


def test_mixture_of_adapters_on_the_fused_in_proj_changes_the_attention(visual):
    model = copy.deepcopy(visual)
    chosen = inject_mixture(model, "lora", (1, 2, 4, 8), "all", projection_dim=8)
    assert chosen == {i: f"transformer.resblocks.{i}.attn.in_proj" for i in range(2)}
    layers = mixture_layers(model)
    assert sorted(layers) == sorted(chosen.values())
    with torch.no_grad():
        torch.testing.assert_close(model(images()), visual(images()), rtol=0, atol=1e-6)  # LoRA experts start at B = 0
        for layer in layers.values():
            layer.experts.lora_B.normal_(std=0.1)
    model.train()
    out = model(images())
    assert all(
        layer.aux_loss is not None and layer.expert_fractions.sum() == pytest.approx(1.0) for layer in layers.values()
    )
    out.sum().backward()
    assert all(layer.router.projection.weight.grad.abs().sum() > 0 for layer in layers.values())
    assert not torch.allclose(out.detach(), visual(images()), atol=1e-3)


@pytest.fixture(scope="module")
def clip_prepared(tmp_path_factory):
    """The digits-shift benchmark on a tiny random OpenCLIP ViT-B-32 with a text zero-shot head."""
    root = tmp_path_factory.mktemp("clip_adapters")
    config_path = root / "robustft-test-attention-clip.json"
    config_path.write_text(json.dumps(TINY_VIT_B))
    raw = demo_config("zeroshot", 0, root).model_dump(mode="json")
    raw["model"] = {"source": "open_clip", "name": str(config_path), "templates": ["a photo of the number {}."]}
    torch.manual_seed(0)
    return raw, prepare_run(parse_config(raw), log=quiet)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("lora", {}),
        ("mixture_of_adapters", {"experts": "kadaptation", "kron_dim": 16, "router_dim": 8}),
        ("mixout", {"p": 0.5}),
        ("gmixout", {"k": 1}),
        ("saft", {"fraction": 0.05, "include": r"attn\."}),
    ],
)
def test_every_attention_method_trains_the_in_proj_of_an_open_clip_vit(clip_prepared, tmp_path, method, options):
    raw, prepared = clip_prepared
    raw = copy.deepcopy(raw)
    raw.update(name=method, output_dir=str(tmp_path), method={"name": method, **options})
    raw["train"] = {**raw["train"], "steps": 2, "progress": False}
    raw["optim"] = {**raw["optim"], "lr": 1e-2}
    fit(parse_config(raw), log=quiet, prepared=prepared)
    final = load_state_dict_file(tmp_path / method / FINAL_CHECKPOINT)
    start = prepared.model.state_dict()
    in_proj = "backbone.visual.transformer.resblocks.0.attn.in_proj_weight"
    if method == "mixture_of_adapters":  # routed: not mergeable, the predictor keeps the adapters
        router = "backbone.visual.transformer.resblocks.0.attn.in_proj.router.projection.weight"
        assert router in final and torch.equal(final[in_proj], start[in_proj])  # the backbone stays frozen
        return
    assert final.keys() == start.keys()  # merged: the pretrained model's keys
    assert not torch.equal(final[in_proj], start[in_proj])


def test_a_target_matching_nothing_is_one_error_line_before_training(tmp_path, monkeypatch, capsys):
    config = write_config(tmp_path, "lora_run", method="lora")
    before = tree_bytes(tmp_path)
    line = cli_error(monkeypatch, capsys, "fit", str(config), "--set", "method.target_modules=['attn.qkvx$']")
    assert "method.target_modules: no nn.Linear layer or attention projection" in line and "qkvx" in line
    assert tree_bytes(tmp_path) == before
