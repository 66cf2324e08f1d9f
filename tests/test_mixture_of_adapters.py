"""Mixture of adapters (MoA, arXiv:2310.11031): top-1 routing, train-only noise, balancing loss, frozen backbone."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from robustft.adapters import (
    CosineRouter,
    KAdaptationExperts,
    KroneckerRules,
    LoRAExperts,
    MixtureOfAdapters,
    inject_mixture,
    load_balancing_loss,
    mixture_layers,
    route_top1,
)
from robustft.adapters.mixture import MAX_LOG_TEMPERATURE, grouped_dispatch_supported
from robustft.backbones.checkpoint_files import load_state_dict_file
from robustft.demo import demo_config
from robustft.errors import ConfigError
from robustft.methods.mixture_of_adapters import MixtureOfAdaptersConfig, MixtureOfAdaptersMethod
from robustft.runner import FINAL_CHECKPOINT, fit


def quiet(message: str) -> None:
    pass


def moa_layer(kind: str = "lora", seed: int = 0) -> MixtureOfAdapters:
    torch.manual_seed(seed)
    base = nn.Linear(16, 32)
    ranks = (1, 2, 4, 8)
    lora = kind == "lora"
    experts = LoRAExperts(16, 32, ranks) if lora else KAdaptationExperts(16, 32, ranks, KroneckerRules(4))
    layer = MixtureOfAdapters(base, experts, len(ranks), projection_dim=8)
    for parameter in experts.parameters():
        nn.init.normal_(parameter, std=0.3)  # trained-looking experts: every one contributes
    return layer


def test_top1_routing_gives_one_expert_per_token_weighted_by_its_probability():
    logits = torch.randn(50, 4)
    routing = route_top1(logits, noise_std=0.0)
    assert torch.equal((routing.gates != 0).sum(dim=1), torch.ones(50, dtype=torch.long))
    probs = logits.softmax(-1)
    assert torch.equal(routing.expert, probs.argmax(-1))
    torch.testing.assert_close(routing.gates.sum(1), probs.max(-1).values)  # not renormalised to 1


@pytest.mark.parametrize("kind", ["lora", "kadaptation"])
def test_each_token_gets_exactly_its_chosen_experts_update(kind):
    layer = moa_layer(kind).eval()
    tokens = torch.randn(2, 7, 16)
    routing = route_top1(layer.router(tokens.reshape(-1, 16)), 0.0)
    matrices = layer.experts.expert_matrices()  # [E, in, out], explicit H_e (KAdaptation: sum_i R_i kron W_ei)
    expected = torch.stack([
        routing.gate[t] * tokens.reshape(-1, 16)[t] @ matrices[routing.expert[t]] for t in range(14)
    ])  # fmt: skip
    if kind == "kadaptation":
        expected = expected + layer.experts.bias
    with torch.no_grad():
        update = layer(tokens) - nn.functional.linear(tokens, layer.weight, layer.bias)
    torch.testing.assert_close(update.reshape(14, 32), expected, rtol=1e-4, atol=1e-5)


def test_kadaptation_expert_matrices_are_sums_of_kronecker_products():
    experts = moa_layer("kadaptation").experts
    rules = experts.rules.matrices()  # [n, n, n], R_i = u_i v_i^T
    left, right = experts.left[:, :, 1:3], experts.right[:, 1:3, :]  # expert 1 (rank 2)
    explicit = sum(torch.kron(rules[i], left[i] @ right[i]) for i in range(4))
    torch.testing.assert_close(experts.expert_matrices()[1], explicit)
    assert torch.linalg.matrix_rank(rules[0]) == 1


def test_noise_is_on_in_training_and_off_in_eval():
    layer = moa_layer()
    tokens = torch.randn(400, 16)
    layer.train()
    first = route_top1(layer.router(tokens), layer.noise_std).expert
    second = route_top1(layer.router(tokens), layer.noise_std).expert
    assert not torch.equal(first, second)  # noise of std 1/E changes some choices
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(tokens), layer(tokens), rtol=0, atol=0)
    assert layer.aux_loss is None  # nothing is stored for the loss outside training


def test_balancing_loss_is_zero_for_uniform_routing_and_grows_as_routing_collapses():
    tokens, experts = 64, 4
    uniform = torch.full((tokens, experts), 1 / experts)
    balanced_choice = torch.arange(tokens) % experts
    gate = uniform.max(-1).values
    assert load_balancing_loss(uniform, gate, 1 / experts) < 1e-6
    sharp = torch.nn.functional.one_hot(balanced_choice, experts).float() * 0.97 + 0.01
    assert load_balancing_loss(sharp, sharp.max(-1).values, 1 / experts) < 1e-6  # balanced hard routing
    collapsed = torch.tensor([0.97, 0.01, 0.01, 0.01]).expand(tokens, experts)
    half = torch.where(balanced_choice[:, None] < 2, sharp, collapsed)
    losses = [load_balancing_loss(p, p.max(-1).values, 1 / experts) for p in (sharp, half, collapsed)]
    assert losses[0] < losses[1] < losses[2]
    assert losses[2] > 1.0


def test_gradients_reach_the_router_through_the_gate_and_the_balancing_loss():
    layer = moa_layer().train()
    out = layer(torch.randn(3, 5, 16))
    (out.square().mean() + layer.aux_loss).backward()
    router = layer.router
    for parameter in (
        router.projection.weight,
        router.projection.bias,
        router.expert_embeddings,
        router.log_temperature,
    ):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    assert layer.weight.grad is not None  # (the method freezes it; the layer itself does not)


def test_blocks_option_and_shared_rules(digits_prepared):
    model = copy.deepcopy(digits_prepared.model)
    chosen = inject_mixture(model, "kadaptation", blocks="even")
    assert chosen == {i: f"backbone.blocks.{i}.attn.qkv" for i in (0, 2, 4)}
    rules = {id(layer.experts.rules) for layer in mixture_layers(model).values()}
    assert len(rules) == 1  # one set of rule matrices shared by every adapted layer
    other = copy.deepcopy(digits_prepared.model)
    assert list(inject_mixture(other, "lora", blocks=[1, 5])) == [1, 5]
    with pytest.raises(ConfigError, match="method.blocks"):
        inject_mixture(copy.deepcopy(digits_prepared.model), "lora", blocks=[6])
    with pytest.raises(ConfigError, match="method.kron_dim"):
        inject_mixture(copy.deepcopy(digits_prepared.model), "kadaptation", kron_dim=3)


def test_training_keeps_the_backbone_bit_identical_logs_router_stats_and_reloads(digits_prepared, tmp_path):
    config = demo_config("mixture_of_adapters", 0, tmp_path, steps=3, progress=False, log_every=1, optim={"lr": 1e-2})
    entry = fit(config, log=quiet, prepared=digits_prepared)["methods"]["mixture_of_adapters"]
    assert entry["adapted_blocks"] == [0, 2, 4]
    final = load_state_dict_file(tmp_path / "mixture_of_adapters" / FINAL_CHECKPOINT)
    start = digits_prepared.model.state_dict()
    for key, value in start.items():
        if key.startswith("head."):
            assert not torch.equal(final[key], value)
        else:
            assert torch.equal(final[key], value), key  # frozen backbone, incl. the wrapped qkv weights
    adapter_keys = [key for key in final if key not in start]
    assert any(".router." in key for key in adapter_keys) and any(".experts." in key for key in adapter_keys)
    records = [
        json.loads(line) for line in (tmp_path / "mixture_of_adapters" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(records) == 3
    for record in records:
        for block in (0, 2, 4):
            fractions = [record[f"router/block{block}/expert{e}"] for e in range(4)]
            assert sum(fractions) == pytest.approx(1.0)
        assert record["loss"] == pytest.approx(record["task_loss"] + 0.01 * record["balance_loss"], rel=1e-5)
    method = MixtureOfAdaptersMethod(MixtureOfAdaptersConfig())
    model = method.load_predictor(
        copy.deepcopy(digits_prepared.model), tmp_path / "mixture_of_adapters" / FINAL_CHECKPOINT, "digits_vit"
    )
    assert len(mixture_layers(model)) == 3
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(model.eval()(images), digits_prepared.model.eval()(images))


def _routed_grads(experts: KAdaptationExperts, tokens: torch.Tensor, logits: torch.Tensor, factored: bool):
    """Output and gradients (tokens, router logits, experts) of one routed update, grouped or factored."""
    experts.zero_grad()
    tokens, logits = tokens.detach().requires_grad_(True), logits.detach().requires_grad_(True)
    routing = route_top1(logits, 0.0)
    projected = torch.randn(tokens.shape[0], 32, generator=torch.Generator().manual_seed(1))
    if factored:
        out = projected + experts.factored_update(tokens, routing.gates)
    else:
        out = experts.add_update(tokens, routing, projected)
    out.square().sum().backward()
    return [out.detach(), tokens.grad, logits.grad] + [parameter.grad for parameter in experts.parameters()]


@pytest.mark.parametrize("empty_expert", [False, True])
def test_kadaptation_grouped_dispatch_matches_the_factored_update(empty_expert):
    """The explicit-H_e grouped GEMM over expert-sorted tokens is the same map as the factored Kronecker update:
    same outputs and gradients to 1e-6 (also when an expert receives no token)."""
    experts = moa_layer("kadaptation").experts.train()
    tokens, logits = torch.randn(27, 16), torch.randn(27, 4) * 3
    if empty_expert:
        logits[:, 2] = -100.0
    assert grouped_dispatch_supported(tokens, 16, 32)
    assert (2 in route_top1(logits, 0.0).expert) != empty_expert
    grouped, factored = _routed_grads(experts, tokens, logits, False), _routed_grads(experts, tokens, logits, True)
    for a, b in zip(grouped, factored, strict=True):
        assert a is not None and b is not None
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item())


@pytest.mark.parametrize("projection_dim, gram", [(8, False), (64, True)])
def test_router_logits_are_the_scaled_cosine_of_the_projection(projection_dim, gram):
    """Both forms of the router (projection; Gram matrix where D + E + 1 < projection_dim) give the plain
    ``normalize(P x + b) @ normalize(m) * exp(t)`` and its gradients to 1e-5."""
    torch.manual_seed(0)
    router = CosineRouter(16, 4, projection_dim=projection_dim)
    assert router.gram_form == gram
    with torch.no_grad():
        router.projection.bias.normal_()  # a bias as large as P x: the Gram form's cross term matters
        router.log_temperature.fill_(1.3)
    tokens = torch.randn(40, 16, requires_grad=True)
    cosine = nn.functional.normalize(router.projection(tokens), dim=-1) @ nn.functional.normalize(
        router.expert_embeddings, dim=0
    )
    expected = cosine * router.log_temperature.exp()
    torch.testing.assert_close(router(tokens), expected, rtol=1e-5, atol=1e-5)
    cotangent = torch.randn(40, 4)
    inputs = [tokens, *router.parameters()]
    ours, reference = (
        torch.autograd.grad(router(tokens), inputs, cotangent),
        torch.autograd.grad(expected, inputs, cotangent),
    )
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def _reference_mixture(layer: MixtureOfAdapters, tokens: torch.Tensor) -> torch.Tensor:
    """The layer written out token by token: ``W x + b + g x H_e (+ KAdaptation bias)``, with the router's
    scaled cosine, its clean softmax and top-1 (no noise), and ``H_e`` from ``expert_matrices``."""
    router = layer.router
    logits = nn.functional.normalize(router.projection(tokens), dim=-1) @ nn.functional.normalize(
        router.expert_embeddings, dim=0
    )
    probs = (logits * router.log_temperature.clamp(max=MAX_LOG_TEMPERATURE).exp()).softmax(-1)
    gate, expert = probs.max(-1)
    matrices = layer.experts.expert_matrices()
    update = torch.stack([gate[t] * tokens[t] @ matrices[expert[t]] for t in range(tokens.shape[0])])
    if isinstance(layer.experts, KAdaptationExperts):
        update = update + layer.experts.bias
    return nn.functional.linear(tokens, layer.weight, layer.bias) + update


@pytest.mark.parametrize("kind", ["lora", "kadaptation"])
@pytest.mark.parametrize("projection_dim", [8, 64])
def test_mixture_layer_output_and_gradients_match_a_token_by_token_reference(kind, projection_dim):
    """The whole adapted layer (router form, sorted grouped dispatch, in-place adds into the projection) is the
    same map as the straightforward per-token formula: outputs and the gradients of the input, the frozen weight
    and every router and expert parameter agree to 1e-5."""
    torch.manual_seed(0)
    base = nn.Linear(16, 32)
    experts = (
        LoRAExperts(16, 32, (1, 2, 4, 8))
        if kind == "lora"
        else KAdaptationExperts(16, 32, (1, 2, 4, 8), KroneckerRules(4))
    )
    layer = MixtureOfAdapters(base, experts, 4, projection_dim=projection_dim).eval()  # eval: no routing noise
    for parameter in [*experts.parameters(), layer.router.expert_embeddings]:
        nn.init.normal_(parameter, std=0.3)
    tokens = torch.randn(2, 30, 16, requires_grad=True)
    cotangent = torch.randn(2, 30, 32)
    inputs = [tokens, *layer.parameters()]
    ours = layer(tokens)
    expected = _reference_mixture(layer, tokens.reshape(-1, 16)).view(2, 30, 32)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert len(set(route_top1(layer.router(tokens.reshape(-1, 16)), 0.0).expert.tolist())) > 1
    for a, b in zip(
        torch.autograd.grad(ours, inputs, cotangent), torch.autograd.grad(expected, inputs, cotangent), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_frozen_backbone_gets_no_gradient_and_only_adapters_are_trained():
    """With the backbone frozen no weight gradient is computed for it (only router, experts and head get one)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=3)
    model.requires_grad_(False)
    inject_mixture(model, "kadaptation", kron_dim=8)
    model.head.requires_grad_(True)
    model.train()
    nn.functional.cross_entropy(model(torch.randn(2, 3, 16, 16)), torch.tensor([0, 2])).backward()
    for name, parameter in model.named_parameters():
        trained = name.startswith("head.") or ".router." in name or ".experts." in name
        assert parameter.requires_grad == trained, name
        assert (parameter.grad is not None) == trained, name
