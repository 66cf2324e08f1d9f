"""The logit cache: keyed by predictor content, a hit is bit-identical to a fresh forward and costs no forward."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from posthoc_support import bits_equal, finetune, quiet, small_prepared
from robustft.evaluate import evaluate_splits, predict, predict_cached
from robustft.logit_cache import LogitCache, predictor_fingerprint
from robustft.methods.output_ensemble import OutputEnsemble


@pytest.fixture(scope="module")
def small(digits_prepared):
    return small_prepared(digits_prepared, size=48)


class Counted:
    """Counts the forward calls of a real module (a forward hook; the module is unchanged)."""

    def __init__(self, module: nn.Module) -> None:
        self.calls = 0
        self.handle = module.register_forward_hook(self._count)

    def _count(self, *_):
        self.calls += 1


def test_fingerprint_follows_content_not_identity(small):
    model = small.model
    twin = copy.deepcopy(model)
    assert predictor_fingerprint(model) == predictor_fingerprint(twin)
    head = copy.deepcopy(model)
    with torch.no_grad():
        head.head.weight[0, 0] += 1e-6  # the zero-shot head is part of the key (another prompt set, another head)
    assert predictor_fingerprint(head) != predictor_fingerprint(model)
    body = copy.deepcopy(model)
    with torch.no_grad():
        next(body.backbone.parameters()).view(-1)[0] += 1e-6
    assert predictor_fingerprint(body) != predictor_fingerprint(model)
    ensemble = OutputEnsemble(copy.deepcopy(model), copy.deepcopy(model), 0.5)
    other = OutputEnsemble(copy.deepcopy(model), copy.deepcopy(model), 0.25)
    assert predictor_fingerprint(ensemble) != predictor_fingerprint(other)  # a buffer


def test_fingerprint_sees_scalar_settings_and_unregistered_buffers():
    class Scaled(nn.Module):
        def __init__(self, scale: float) -> None:
            super().__init__()
            self.linear = nn.Linear(3, 2)
            self.scale = scale
            self.register_buffer("offset", torch.zeros(2), persistent=False)

        def forward(self, x):
            return self.linear(x) * self.scale + self.offset

    torch.manual_seed(0)
    a = Scaled(1.0)
    b = copy.deepcopy(a)
    assert predictor_fingerprint(a) == predictor_fingerprint(b)
    b.scale = 2.0
    assert predictor_fingerprint(a) != predictor_fingerprint(b)
    c = copy.deepcopy(a)
    c.offset += 1  # not in the state dict
    assert predictor_fingerprint(a) != predictor_fingerprint(c)
    d = copy.deepcopy(a)
    d.train(not a.training)  # scoring sets eval mode, so the mode is not part of the content
    assert predictor_fingerprint(a) == predictor_fingerprint(d)


def test_a_hit_is_bit_identical_and_runs_no_forward(small):
    cache = LogitCache()
    dataset = small.ctx.splits["id_test"]
    device = small.ctx.device
    fresh = predict(small.model, dataset, device, 16)
    first = predict_cached(small.model, dataset, device, 16, cache=cache, in_class_space=False)
    twin = copy.deepcopy(small.model)
    counter = Counted(twin)
    second = predict_cached(twin, dataset, device, 16, cache=cache, in_class_space=False)
    assert counter.calls == 0 and cache.hits == 1 and cache.misses == 1
    assert bits_equal(first[0], fresh[0]) and bits_equal(second[0], fresh[0]) and torch.equal(second[1], fresh[1])
    other_batch = predict_cached(twin, dataset, device, 32, cache=cache, in_class_space=False)
    assert counter.calls > 0 and cache.misses == 2  # the batch size is part of the key
    assert torch.allclose(other_batch[0], fresh[0], atol=1e-5)


def test_another_split_object_or_dtype_is_another_entry(small):
    cache = LogitCache()
    device = small.ctx.device
    dataset = small.ctx.splits["id_test"]
    predict_cached(small.model, dataset, device, 16, cache=cache)
    predict_cached(small.model, copy.copy(dataset), device, 16, cache=cache)
    predict_cached(small.model, dataset, device, 16, cache=cache, autocast_dtype=torch.bfloat16)
    assert cache.misses == 3 and cache.hits == 0


def test_least_recently_used_entries_leave_first(small):
    device = small.ctx.device
    splits = [small.ctx.splits[name] for name in ("id_val", "id_test", "ood_fonts")]
    one = predict(small.model, splits[0], device, 16)
    entry_bytes = one[0].numel() * 4 + one[1].numel() * 8
    cache = LogitCache(max_bytes=2 * entry_bytes)
    for dataset in splits:
        predict_cached(small.model, dataset, device, 16, cache=cache, in_class_space=False)
    assert len(cache.entries) == 2 and cache.num_bytes <= 2 * entry_bytes
    predict_cached(small.model, splits[0], device, 16, cache=cache, in_class_space=False)
    assert cache.misses == 4  # the first split was evicted


def test_evaluation_from_cache_equals_a_fresh_evaluation(small):
    cache = LogitCache()
    ctx = small.ctx
    fresh = evaluate_splits(small.model, ctx.splits, ctx.device, 16)
    evaluate_splits(small.model, ctx.splits, ctx.device, 16, cache=cache)
    twin = copy.deepcopy(small.model)
    counter = Counted(twin)
    again = evaluate_splits(twin, ctx.splits, ctx.device, 16, cache=cache)
    assert counter.calls == 0
    assert again == fresh  # every metric, temperature included, exactly


def test_an_output_ensemble_is_combined_from_its_parts_logits(small, tmp_path):
    ctx = small.ctx
    run = finetune(small, tmp_path)
    from robustft.posthoc import load_run_predictor

    tuned = load_run_predictor(copy.deepcopy(small.model), run, None).predictor
    ensemble = OutputEnsemble(copy.deepcopy(small.model), tuned, 0.3)
    fresh = evaluate_splits(ensemble, ctx.splits, ctx.device, 16)
    cache = LogitCache()
    for part in (ensemble.zero_shot, ensemble.finetuned):
        evaluate_splits(part, ctx.splits, ctx.device, 16, cache=cache)
    counters = [Counted(ensemble.zero_shot), Counted(ensemble.finetuned)]
    cached = evaluate_splits(ensemble, ctx.splits, ctx.device, 16, cache=cache)
    assert [counter.calls for counter in counters] == [0, 0]
    assert cached == fresh  # batch-wise forward and whole-split combination give the same numbers
    dataset = ctx.splits["ood_fonts"]
    combined = predict_cached(ensemble, dataset, ctx.device, 16, cache=cache)[0]
    assert bits_equal(combined, predict(ensemble, dataset, ctx.device, 16)[0])
    quiet("")


def test_wise_ft_scores_only_the_interior_alphas_when_its_endpoints_are_cached(small, tmp_path):
    import dataclasses

    from robustft.methods import get_method
    from robustft.posthoc import load_run_predictor

    run = finetune(small, tmp_path / "runs")
    cls = get_method("wise_ft")
    method = cls(cls.config_cls(finetuned_run=run, alphas=[0.0, 0.5, 1.0]))
    ctx = dataclasses.replace(small.ctx.for_run(tmp_path / "wise", 0, quiet), logit_cache=LogitCache())
    tuned = load_run_predictor(copy.deepcopy(small.model), run, None).predictor
    for scored in (small.model, tuned):  # what the zero-shot and fine-tune runs of a comparison leave in the cache
        evaluate_splits(scored, ctx.splits, ctx.device, ctx.eval_batch_size, cache=ctx.logit_cache)
    model = method.prepare(copy.deepcopy(small.model), ctx)
    calls = []
    model.register_forward_hook(lambda module, inputs, output: calls.append(len(output)))
    predictor = method.finalize(model, ctx)
    evaluated = sum(len(split) for name, split in ctx.splits.items() if name != "train")
    assert sum(calls) == evaluated  # alpha 0.5 only; 0 and 1 came from the cache
    calls.clear()
    final = evaluate_splits(predictor, ctx.splits, ctx.device, ctx.eval_batch_size, cache=ctx.logit_cache)
    chosen = next(point for point in ctx.extras["curve"] if point["alpha"] == ctx.extras["alpha"])
    assert calls == [] and final["id_test"]["accuracy"] == chosen["id"]  # the final evaluation reads the sweep's logits
