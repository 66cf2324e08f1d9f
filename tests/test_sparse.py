"""The sparse-update core: only active coordinates train, optimiser state is |active|, merge is exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustft.sparse import (
    SparseUpdate,
    count_active,
    merge_sparse,
    optimizer_state_bytes,
    remap_optimizer_state,
    select_parameters,
    sparse_parameter_groups,
    sparse_updates,
    sparsify,
)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(16, 6, generator=generator), torch.randint(0, 3, (16,), generator=generator)


def train(model: nn.Module, steps: int = 5, weight_decay: float = 0.5) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW(sparse_parameter_groups(model, weight_decay), lr=0.05)
    x, y = batch()
    for _ in range(steps):
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer


def sparse_tiny():
    model = tiny_model()
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    model.requires_grad_(False)
    indices = {"0.weight": torch.tensor([0, 7, 29]), "2.bias": torch.tensor([1])}
    updates = sparsify(model, indices)
    return model, pretrained, indices, updates


def test_select_parameters_scopes_and_patterns():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    assert select_parameters(model, "linear") == ["2.weight"]
    assert select_parameters(model, "matrices") == ["0.weight", "2.weight"]
    assert select_parameters(model, "all", include=r"^2\.") == ["2.weight", "2.bias"]
    assert select_parameters(model, "all", exclude="bias") == ["0.weight", "2.weight"]


def test_only_active_coordinates_change_with_weight_decay_on():
    model, pretrained, indices, _ = sparse_tiny()
    train(model, weight_decay=0.5)
    merge_sparse(model)
    after = model.state_dict()
    for name, before in pretrained.items():
        changed = (after[name] != before).reshape(-1).nonzero().flatten()
        allowed = indices.get(name, torch.tensor([], dtype=torch.long))
        assert set(changed.tolist()) <= set(allowed.tolist()), name
    assert (after["0.weight"].reshape(-1)[indices["0.weight"]] != pretrained["0.weight"].reshape(-1)[[0, 7, 29]]).all()


def test_values_gradient_is_the_dense_gradient_at_the_indices():
    dense = tiny_model()
    model, _, indices, updates = sparse_tiny()
    x, y = batch()
    nn.functional.cross_entropy(dense(x), y).backward()
    nn.functional.cross_entropy(model(x), y).backward()
    expected = dense[0].weight.grad.reshape(-1)[indices["0.weight"]]
    torch.testing.assert_close(updates["0.weight"].values.grad, expected)
    assert model[0].parametrizations.weight.original.grad is None


def test_optimizer_state_scales_with_the_active_count():
    model, _, indices, _ = sparse_tiny()
    optimizer = train(model)
    active = sum(index.numel() for index in indices.values())
    assert count_active(model) == active
    moments = [t for s in optimizer.state.values() for k, t in s.items() if k != "step"]
    assert sum(t.numel() for t in moments) == 2 * active
    steps = sum(s["step"].numel() * s["step"].element_size() for s in optimizer.state.values())
    assert optimizer_state_bytes(optimizer) == 2 * active * 4 + steps


def test_values_follow_the_weight_decay_rule_of_their_tensor():
    model, _, _, updates = sparse_tiny()
    model[2].weight.requires_grad_(True)
    groups = sparse_parameter_groups(model, 0.1)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(updates["0.weight"].values) in decayed  # a matrix's entries decay, though values are 1-D
    assert id(updates["2.bias"].values) not in decayed
    assert id(model[2].weight) in decayed


def test_merge_gives_a_plain_model_with_the_same_outputs():
    model, _, _, _ = sparse_tiny()
    train(model)
    x, _ = batch()
    with torch.no_grad():
        sparse_out = model(x)
    merge_sparse(model)
    assert not sparse_updates(model)
    assert type(model[0]) is nn.Linear
    fresh = tiny_model()
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), sparse_out, rtol=0, atol=0)


def test_scaled_update_mixes_values_with_the_base():
    update = SparseUpdate(torch.tensor([1, 3]), torch.tensor([2.0, 4.0]), scale=0.5)
    base = torch.zeros(2, 2)
    assert torch.equal(update(base), torch.tensor([[0.0, 1.0], [0.0, 2.0]]))


def test_sparsify_rejects_out_of_range_indices():
    with pytest.raises(ValueError, match="out of range"):
        sparsify(tiny_model(), {"0.weight": torch.tensor([30])})


def test_remap_keeps_moments_of_coordinates_that_stay_active():
    parameter = nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([parameter])
    optimizer.state[parameter] = {"step": torch.tensor(4.0), "exp_avg": torch.tensor([1.0, 2.0, 3.0])}
    remap_optimizer_state(optimizer, parameter, old=torch.tensor([2, 5, 9]), new=torch.tensor([1, 5, 9]))
    assert torch.equal(optimizer.state[parameter]["exp_avg"], torch.tensor([0.0, 2.0, 3.0]))
    assert optimizer.state[parameter]["step"] == 4


def test_report_shows_active_params_only_when_a_method_has_them():
    from robustft.report import results_table

    entry = {"id": 90.0, "ood": {"ood_a": 80.0}, "ood_avg": 80.0, "trainable_params": 1000}
    header, _ = results_table({"benchmark": "b", "methods": {"finetune": entry}})
    assert "active params" not in header
    methods = {"finetune": entry, "saft": {**entry, "active_params": 8}}
    header, rows = results_table({"benchmark": "b", "methods": methods})
    assert header[-1] == "active params" and [row[-1] for row in rows] == ["-", "8"]


@pytest.mark.parametrize("name", ["mixout", "gmixout", "saft"])
def test_a_selection_that_matches_nothing_is_named_before_training(name):
    """Mixout, GMixout and SAFT refuse ``include`` / ``scope`` picking no tensor in ``check_model`` (the preflight,
    before any run starts) and in ``prepare``, with the same line."""
    from robustft.errors import ConfigError
    from robustft.methods import get_method

    method_class = get_method(name)
    method = method_class(method_class.config_cls(include=r"no_such_tensor$"))
    problem = method.check_model(tiny_model(), {})
    assert problem is not None and problem.startswith(f"method.scope / method.include: {name} found no tensor"), problem
    assert "include='no_such_tensor$' exclude=" in problem, problem
    with pytest.raises(ConfigError, match=f"{name} found no tensor"):
        method.prepare(tiny_model(), None)
    assert method_class(method_class.config_cls(include="")).check_model(tiny_model(), {}) is None
