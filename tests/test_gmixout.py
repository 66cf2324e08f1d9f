"""GMixout (arXiv:2510.06982): Mixout as the lambda=0, k=1 case, k-step episodes, the EMA anchor, sparse state."""

from __future__ import annotations

import copy

import torch
from torch import nn

from robustft.backbones.checkpoint_files import load_state_dict_file
from robustft.demo import demo_config
from robustft.methods.base import RunContext
from robustft.methods.gmixout import GMixout, GMixoutConfig, base_of, sample_active, sample_active_sets
from robustft.methods.mixout import mixout_weight
from robustft.runner import FINAL_CHECKPOINT, fit
from robustft.sparse import optimizer_state_bytes, sparse_updates


def quiet(message: str) -> None:
    pass


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def data():
    generator = torch.Generator().manual_seed(2)
    return torch.randn(32, 6, generator=generator), torch.randint(0, 3, (32,), generator=generator)


def prepared(tmp_path, **options) -> tuple[nn.Module, GMixout]:
    method = GMixout(GMixoutConfig(**options))
    ctx = RunContext(tmp_path, torch.device("cpu"), 0, {}, [], log=quiet)
    return method.prepare(Tiny(), ctx), method


def run(model, method, optimizer_cls, steps: int, record=None, **optimizer_options):
    optimizer = optimizer_cls(method.parameter_groups(model, 0.0), **optimizer_options)
    method.bind_optimizer(optimizer)
    x, y = data()
    for step in range(steps):
        if record is not None:
            record(step)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_step(model, step)
    return optimizer


def test_lambda_zero_k_one_is_mixouts_update(tmp_path):
    """Each SGD step equals Mixout's (anchor W0, rescale 1/(1-p)) under the same mask."""
    p, lr = 0.6, 0.5
    model, method = prepared(tmp_path, p=p, k=1, ema=0.0, train_others=False)
    reference = Tiny()
    names = list(sparse_updates(model))
    pretrained = {name: reference.get_parameter(name).detach().clone() for name in names}
    masks = []

    def mixout_step(step: int) -> None:
        updates = sparse_updates(model)
        mask = {name: torch.zeros(u.weights.numel()).index_fill_(0, u.indices, 1.0) for name, u in updates.items()}
        masks.append(mask)
        weights = {name: reference.get_parameter(name) for name in names}
        x, y = data()
        mixed = {name: mixout_weight(w, pretrained[name], mask[name].view_as(w), p) for name, w in weights.items()}
        logits = torch.func.functional_call(reference, mixed, (x,))
        grads = torch.autograd.grad(nn.functional.cross_entropy(logits, y), list(weights.values()))
        with torch.no_grad():
            for weight, grad in zip(weights.values(), grads, strict=True):
                weight.sub_(lr * grad)

    run(model, method, torch.optim.SGD, steps=4, record=mixout_step, lr=lr)
    assert len({tuple(m[names[0]].tolist()) for m in masks}) == 4  # k=1: a new mask every step
    assert all(torch.equal(base_of(model, name), pretrained[name]) for name in names)  # lambda=0: A stays W0
    final = method.finalize(model, None)
    for name in names:
        torch.testing.assert_close(final.get_parameter(name), reference.get_parameter(name), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(final.get_parameter(names[0]), pretrained[names[0]])


def test_mask_changes_exactly_every_k_steps(tmp_path):
    model, method = prepared(tmp_path, k=3, p=0.5)
    name = next(iter(sparse_updates(model)))
    seen = []
    run(
        model,
        method,
        torch.optim.AdamW,
        steps=8,
        record=lambda step: seen.append(sparse_updates(model)[name].indices.clone()),
        lr=1e-2,
    )
    changed = [not torch.equal(seen[i], seen[i - 1]) for i in range(1, len(seen))]
    assert changed == [False, False, True, False, False, True, False]


def test_ema_anchor_follows_its_formula(tmp_path):
    rate = 0.3
    model, method = prepared(tmp_path, k=2, p=0.5, ema=rate)
    name = next(iter(sparse_updates(model)))
    update = sparse_updates(model)[name]
    anchor_before = base_of(model, name).detach().clone()
    optimizer = run(model, method, torch.optim.AdamW, steps=1, lr=1e-1)
    weights = update.weights.clone()
    weights.view(-1)[update.indices] = update.values.detach()
    assert not torch.equal(weights, anchor_before)
    nn.functional.cross_entropy(model(data()[0]), data()[1]).backward()
    optimizer.step()
    weights.view(-1)[update.indices] = update.values.detach()
    method.after_step(model, 1)  # end of the 2-step episode
    torch.testing.assert_close(base_of(model, name), (1 - rate) * anchor_before + rate * weights)
    torch.testing.assert_close(update.weights, weights)
    assert torch.equal(update.values.detach(), weights.view(-1)[update.indices])


def test_only_the_active_fraction_has_optimizer_state(tmp_path):
    p = 0.75
    model, method = prepared(tmp_path, p=p, k=2, train_others=False)
    optimizer = run(model, method, torch.optim.AdamW, steps=5, lr=1e-2)
    mixed = sum(u.weights.numel() for u in sparse_updates(model).values())
    active = sum(u.num_active for u in sparse_updates(model).values())
    assert active == round((1 - p) * 48) + round((1 - p) * 64)
    assert optimizer_state_bytes(optimizer) == 2 * active * 4 + 4 * len(optimizer.state)
    assert active < mixed / 3


def test_moments_of_coordinates_that_stay_active_are_carried_over(tmp_path):
    model, method = prepared(tmp_path, p=0.5, k=1)
    update = sparse_updates(model)["backbone.0.weight"]
    optimizer = run(model, method, torch.optim.AdamW, steps=1, lr=1e-2)
    # after_step(0) resampled: re-run one step to compare the state layout with the index sets
    old_indices = update.indices.clone()
    x, y = data()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    moments = optimizer.state[update.values]["exp_avg"].clone()
    method.after_step(model, 1)
    new_moments = optimizer.state[update.values]["exp_avg"]
    stay = torch.isin(update.indices, old_indices)
    assert stay.any() and (~stay).any()
    assert (new_moments[~stay] == 0).all()
    position = torch.searchsorted(old_indices, update.indices[stay])
    assert torch.equal(new_moments[stay], moments[position])


def test_output_granularity_draws_whole_rows():
    indices = sample_active(torch.Size([6, 4]), 0.5, "output", torch.device("cpu"))
    rows = indices.view(-1, 4) // 4
    assert indices.numel() == 12 and (rows == rows[:, :1]).all()


def test_one_draw_for_all_tensors_gives_uniform_sets_of_fixed_size():
    """Every set is sorted, unique, of size round((1-p) n); tensors of one shape get different sets; over many
    draws each coordinate is active with probability 1 - p (the fixed-size uniform subset of a permutation)."""
    shapes = [torch.Size([6, 5]), torch.Size([6, 5]), torch.Size([7]), torch.Size([4, 3])]
    generator = torch.Generator().manual_seed(0)
    counts = [torch.zeros(shape.numel()) for shape in shapes]
    draws = 4000
    for _ in range(draws):
        sets = sample_active_sets(shapes, 0.7, "element", torch.device("cpu"), generator)
        for count, shape, index in zip(counts, shapes, sets, strict=True):
            assert index.numel() == round(0.3 * shape.numel()) and torch.equal(index, index.unique())
            count[index] += 1
    assert not torch.equal(sets[0], sets[1])
    for count in counts:
        expected = round(0.3 * count.numel()) / count.numel()
        assert ((count / draws) - expected).abs().max() < 0.035, count  # about 4.5 binomial standard deviations
    rows = sample_active_sets([torch.Size([6, 4]), torch.Size([6, 2])], 0.5, "output", torch.device("cpu"), generator)
    assert [index.numel() for index in rows] == [12, 6]
    assert (rows[1].view(-1, 2) // 2 == (rows[1].view(-1, 2) // 2)[:, :1]).all()


def test_gmixout_on_digits_trains_sparsely_and_saves_a_plain_model(digits_prepared, tmp_path):
    results = fit(demo_config("gmixout", 0, tmp_path, steps=3, progress=False), log=quiet, prepared=digits_prepared)
    entry = results["methods"]["gmixout"]
    dense_others = entry["trainable_params"] - round(0.1 * entry["mixed_params"])
    assert abs(dense_others - (sum(p.numel() for p in digits_prepared.model.parameters()) - entry["mixed_params"])) < 50
    assert entry["active_params"] == entry["trainable_params"] < 0.15 * 811146
    final = load_state_dict_file(tmp_path / "gmixout" / FINAL_CHECKPOINT)
    fresh = copy.deepcopy(digits_prepared.model)
    fresh.load_state_dict(final, strict=True)
    pretrained = digits_prepared.model.state_dict()
    changed = (final["backbone.blocks.0.mlp.fc1.weight"] != pretrained["backbone.blocks.0.mlp.fc1.weight"]).float()
    assert 0 < changed.mean() <= 0.1 * 3 + 1e-6  # at most one 10% mask per step (k=10 > 3 steps: exactly one)


def test_resume_mid_run_matches_an_uninterrupted_run(digits_prepared, tmp_path):
    """Masks, anchors and the remapped optimiser state all survive a checkpoint (k=2: resampled 3 times)."""

    def config(name, **train):
        return demo_config(
            "gmixout",
            0,
            tmp_path,
            name=name,
            method_options={"k": 2, "ema": 0.5},
            steps=6,
            checkpoint_every=3,
            progress=False,
            **train,
        )

    fit(config("full"), log=quiet, prepared=digits_prepared)
    assert fit(config("resumed", stop_after=3), log=quiet, prepared=digits_prepared) == {}
    fit(config("resumed"), resume=True, log=quiet, prepared=digits_prepared)
    full = load_state_dict_file(tmp_path / "full" / FINAL_CHECKPOINT)
    resumed = load_state_dict_file(tmp_path / "resumed" / FINAL_CHECKPOINT)
    assert all(torch.equal(full[key], resumed[key]) for key in full)
